"""The TransIP model: a plain (non-equivariant) Transformer over atoms with neighbour attention.

See docs/model.md for the formulation. Shapes: N atoms, E neighbour edges (receiver i, sender j), B
structures, H heads, D = d_model / H. Units: Angstrom, eV.

Forces and virial come from one gradient: the energy depends on positions only through the edge
displacements r_e = x_j - x_i + shift_e, so with g_e = dE/dr_e

    F_i = sum_{e: receiver i} g_e - sum_{e: sender i} g_e,      virial_ab = -sum_e g_e,a r_e,b

(the edge geometry modules of transip.kernels for the forces, `edge_virial`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import analytic, native
from .elements import ELEMENT_SYMBOLS  # the one element table (transip/elements.py); others import it from here
from .kernels import (EdgeWeights, attention_module, edge_encoder_module, edge_features, edge_geometry_module,
                      reference_edge_embedding, smooth_step_down)
from .repulsion import (REPULSIONS, repulsion_tables, zbl_pair_energy, zbl_screening_function,
                        zbl_switched_derivatives)


@dataclasses.dataclass
class ModelConfig:
    """Sizes and physical settings of a TransIP model (everything needed to rebuild it)."""

    elements: List[int]  # atomic numbers the model knows, e.g. [1, 6, 7, 8]
    cutoff: float = 6.0  # Angstrom
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    ffn_multiplier: int = 2
    num_rbf: int = 16
    edge_hidden: int = 32
    max_abs_charge: int = 4
    max_multiplicity: int = 6
    avg_num_neighbors: float = 12.0  # normalises the neighbour sum in the initial tokens
    # Screened nuclear repulsion added to the energy ("zbl" or "none"; see transip/repulsion.py), switched off
    # smoothly at repulsion_range x the sum of the two atoms' covalent radii.
    repulsion: str = "zbl"
    repulsion_range: float = 1.0
    # Every block's attention also averages its edges' features [r / cutoff, radial basis] with the attention
    # weights and projects them into each head's values, so messages keep direction after the first block.
    block_geometry: bool = True

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {self.cutoff}")
        if not self.elements:
            raise ValueError("a model needs at least one element")
        for z in self.elements:
            if not 1 <= int(z) < len(ELEMENT_SYMBOLS):
                raise ValueError(f"unknown atomic number {z} in model elements")
        if self.repulsion not in REPULSIONS:
            raise ValueError(f"repulsion must be one of {REPULSIONS}, got {self.repulsion!r}")
        if self.repulsion != "none":
            table = repulsion_tables(self.elements, self.repulsion_range)[2]
            widest = int(table.argmax()) // len(self.elements)  # the element of the widest (diagonal) pair
            symbol = ELEMENT_SYMBOLS[int(self.elements[widest])]
            if not 0 < float(table.max()) <= self.cutoff:
                raise ValueError(f"repulsion_range={self.repulsion_range} switches the repulsion off at "
                                 f"{float(table.max()):.2f} A ({symbol}-{symbol}), which must lie within the cutoff "
                                 f"{self.cutoff} A")

    @property
    def receptive_field(self) -> float:
        """How far an atom's energy reaches: one cutoff for the neighbour sum in the initial tokens, plus one
        per attention block."""
        return (self.num_layers + 1) * self.cutoff


class MLP(nn.Module):
    def __init__(self, sizes: List[int]):
        super().__init__()
        layers: List[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionBlock(nn.Module):
    """Pre-norm Transformer block: neighbour multi-head attention, then a feed-forward layer."""

    def __init__(self, d_model: int, num_heads: int, edge_hidden: int, ffn_multiplier: int, kernel: str,
                 geometry_width: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        # Per head, the projection (head_dim, F) of the attention-weighted mean of the edge features into the
        # head's output: sum_j a_ij P e_ij = P (sum_j a_ij e_ij), so the attention only averages e_ij per row.
        if geometry_width > 0:
            bound = 1.0 / geometry_width ** 0.5
            self.geometry = nn.Parameter(torch.empty(num_heads, self.head_dim, geometry_width).uniform_(-bound, bound))
        else:
            self.register_parameter("geometry", None)
        self.norm_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.edge_bias = nn.Linear(edge_hidden, num_heads)
        self.out = nn.Linear(d_model, d_model)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = MLP([d_model, ffn_multiplier * d_model, d_model])
        self.attention = attention_module(kernel)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, edge_envelope: torch.Tensor, self_bias: torch.Tensor,
                receivers: torch.Tensor, senders: torch.Tensor, row_ptr: torch.Tensor, num_updated: int,
                edge_values: torch.Tensor, self_values: torch.Tensor) -> torch.Tensor:
        """`bias` (edges, heads) and `self_bias` (heads,) are this block's `edge_bias` of the neighbour edges
        and of the self edge (computed for all blocks at once by the model); `edge_values` (edges, F) and
        `self_values` (F,) the edge features the block averages (F = 0 without block geometry). Edges are
        grouped by receiver and `row_ptr` has a row for every atom of `h`; only the first `num_updated` atoms are
        updated and returned (the rest only send; their rows may be empty)."""
        n = h.shape[0]
        # unbind and split, not indexing and slicing: their backward builds each gradient in one piece, where
        # every index or slice would allocate a zero tensor of the whole input and copy its part in.
        q, k, v = self.qkv(self.norm_attn(h)).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        geometry = self.geometry
        if geometry is None:  # this block does not read the edge values: do not average them
            edge_values, self_values = edge_values[:, :0], self_values[:0]
        attended = self.attention(q, k, v, bias, edge_envelope, self_bias, receivers, senders, row_ptr, edge_values,
                                  self_values)
        if num_updated < n:  # atoms that only send (halo): their rows are not needed
            attended, h = attended[:num_updated], h[:num_updated]
        if geometry is None:
            heads = attended
        else:
            heads, averaged = attended.split([self.head_dim, edge_values.shape[1]], dim=2)
            heads = heads + torch.einsum("nhf,hdf->nhd", averaged, geometry)
        # Explicit width, not -1: reshape cannot infer it when no atom is updated (zero atoms).
        h = h + self.out(heads.reshape(num_updated, self.num_heads * self.head_dim))
        return h + self.ffn(self.norm_ffn(h))


class TransIP(nn.Module):
    """The model. `kernel` picks the implementation of the per-edge work (see transip.native): 'fused',
    'reference' or 'auto' (fused when the native library is loaded); None (default) takes
    `native.default_kernel()`, i.e. the TRANSIP_KERNEL environment variable, else auto. Both kernels compute the
    same function; `set_kernel` switches an existing model."""

    __jit_unused_properties__ = ["kernel"]

    def __init__(self, config: ModelConfig, kernel: Optional[str] = None):
        super().__init__()
        self.config = config
        c = config
        self.cutoff = float(c.cutoff)
        self.num_rbf = int(c.num_rbf)
        self.max_abs_charge = int(c.max_abs_charge)
        self.max_multiplicity = int(c.max_multiplicity)
        self.avg_num_neighbors = float(c.avg_num_neighbors)
        species_of_z = torch.full((len(ELEMENT_SYMBOLS),), -1, dtype=torch.long)
        for index, z in enumerate(c.elements):
            species_of_z[int(z)] = index
        self.register_buffer("species_of_z", species_of_z)
        self.register_buffer("rbf_centers", torch.linspace(0.0, c.cutoff, c.num_rbf))
        self.rbf_width = float(c.cutoff / c.num_rbf)
        num_species = len(c.elements)
        self.element_embedding = nn.Embedding(num_species, c.d_model)
        self.neighbor_element_embedding = nn.Embedding(num_species, c.d_model)
        self.charge_embedding = nn.Embedding(2 * c.max_abs_charge + 1, c.d_model)
        self.spin_embedding = nn.Embedding(c.max_multiplicity, c.d_model)
        self.edge_mlp = MLP([3 + c.num_rbf, c.edge_hidden, c.edge_hidden])
        self.edge_message = nn.Linear(c.edge_hidden, c.d_model)
        kernel = native.default_kernel() if kernel is None else native.resolve_kernel(kernel)
        self.edge_encoder = edge_encoder_module(kernel)
        self.edge_geometry = edge_geometry_module(kernel)
        self.analytic_derivatives = False  # per-edge terms through transip.analytic (set_kernel, for training)
        self.geometry_width = 3 + c.num_rbf if c.block_geometry else 0
        self.blocks = nn.ModuleList([AttentionBlock(c.d_model, c.num_heads, c.edge_hidden, c.ffn_multiplier, kernel,
                                                    self.geometry_width) for _ in range(c.num_layers)])
        self.final_norm = nn.LayerNorm(c.d_model)
        self.readout = MLP([c.d_model, c.d_model, 1])
        # Per-element reference energies and the scale of the learned residual, fitted on training data.
        self.register_buffer("reference_energy", torch.zeros(num_species))
        # Energy offsets of a whole structure by total charge and by spin multiplicity (ionisation and
        # spin-pairing energies do not scale with size). Added to the total, not to atom energies: it belongs to
        # the structure, not to any atom.
        self.register_buffer("charge_reference", torch.zeros(2 * c.max_abs_charge + 1))
        self.register_buffer("spin_reference", torch.zeros(c.max_multiplicity))
        self.register_buffer("energy_scale", torch.ones(()))
        # Pair tables of the repulsion (species x species), rebuilt from the config, so not saved in state dicts.
        self.repulsion = c.repulsion != "none"
        charge_product, inverse_screening, switch_off = repulsion_tables(c.elements, c.repulsion_range)
        self.register_buffer("repulsion_charge_product", charge_product, persistent=False)
        self.register_buffer("repulsion_inverse_screening", inverse_screening, persistent=False)
        self.register_buffer("repulsion_switch_off", switch_off, persistent=False)
        self.repulsion_reach = float(switch_off.max()) if switch_off.numel() > 0 else 0.0  # the widest pair's switch-off (A)
        coefficients, exponents = zbl_screening_function()
        self.register_buffer("repulsion_coefficients", coefficients, persistent=False)
        self.register_buffer("repulsion_exponents", exponents, persistent=False)

    @torch.jit.unused
    def set_kernel(self, kernel: str, twice_differentiable: bool = False) -> "TransIP":
        """Switch the edge encoder and every attention layer to 'fused', 'reference' or 'auto' (fused when the
        native library is loaded); returns the model. `twice_differentiable` (training with a force loss, which
        differentiates the forces): the fused attention is differentiable twice, the edge encoder becomes
        TrainingEdgeEncoder (native weight gradients and double backward, the block geometry's features
        included), and the repulsion runs with hand-derived second derivatives (transip.analytic)."""
        resolved = native.resolve_kernel(kernel)
        for block in self.blocks:
            block.attention = attention_module(resolved)
        self.edge_encoder = edge_encoder_module(resolved, twice_differentiable)
        self.edge_geometry = edge_geometry_module(resolved)
        self.analytic_derivatives = twice_differentiable and resolved == "fused"
        return self

    @property
    def kernel(self) -> str:
        return self.blocks[0].attention.kernel if len(self.blocks) else "reference"

    # ---------------------------------------------------------------- features
    def edge_weights(self) -> EdgeWeights:
        """The parameters of the per-edge work, as the edge encoders take them (attention-bias layers of every
        block stacked: one product gives all blocks' biases)."""
        weights: List[torch.Tensor] = []
        offsets: List[torch.Tensor] = []
        for block in self.blocks:
            weights.append(block.edge_bias.weight)
            offsets.append(block.edge_bias.bias)
        first, second = self.edge_mlp.net[0], self.edge_mlp.net[2]
        return EdgeWeights(self.rbf_centers, self.rbf_width, self.cutoff, first.weight, first.bias, second.weight,
                           second.bias, torch.cat(weights), torch.cat(offsets), len(self.blocks),
                           self.edge_message.weight, self.edge_message.bias, self.neighbor_element_embedding.weight)

    def self_edge_bias(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Attention biases (1, layers * heads) of the self edge (zero displacement), built from constants so
        that no gradient passes through |0|."""
        weights = self.edge_weights()
        zero = torch.zeros(1, 3, dtype=dtype, device=device)
        embedding = reference_edge_embedding(zero, zero[:, 0], weights)
        return torch.nn.functional.linear(embedding, weights.w_bias, weights.b_bias)

    def edge_lengths(self, edge_vectors: torch.Tensor) -> torch.Tensor:
        if self.analytic_derivatives and not torch.jit.is_scripting():
            return analytic_lengths(edge_vectors)
        return torch.linalg.norm(edge_vectors, dim=1)

    def self_edge_values(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The edge features of the self edge (zero displacement, (3 + num_rbf,), or (0,) without block
        geometry): constants, so no gradient passes through |0|. The other edges' come from the edge encoder."""
        zero = torch.zeros(1, 3, dtype=dtype, device=device)
        if self.geometry_width == 0:
            return zero[0, :0]
        return edge_features(zero, zero[:, 0], self.rbf_centers, self.rbf_width, self.cutoff)[0]

    def species(self, numbers: torch.Tensor) -> torch.Tensor:
        if bool((numbers < 1).any()) or bool((numbers >= self.species_of_z.shape[0]).any()):
            raise ValueError("atomic numbers must lie in 1.." + str(self.species_of_z.shape[0] - 1))
        species = self.species_of_z[numbers]
        if bool((species < 0).any()):
            bad = int(numbers[species < 0][0])
            raise ValueError("element with atomic number " + str(bad) + " is not known to this model")
        return species

    def initial_tokens(self, edge_vectors: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
                       species: torch.Tensor, charge: torch.Tensor, spin: torch.Tensor, token_batch: torch.Tensor,
                       num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial tokens (num_tokens, d) of the first `num_tokens` atoms, and the per-edge work of every block:
        attention biases (layers, E, heads), envelope (E,) and the edge values every block reads (E, 3 + num_rbf;
        (E, 0) without block geometry), all from one pass of the edge encoder. Every receiver must be below `num_tokens`;
        senders index `species`, which may hold more atoms (atoms that only send)."""
        # The message names the value: callers show it as the reason a model call failed.
        if bool((charge.abs() > self.max_abs_charge).any()):
            bad = int(charge[charge.abs() > self.max_abs_charge][0])
            raise ValueError("total charge " + str(bad) + " is outside the model's range -" + str(self.max_abs_charge)
                             + ".." + str(self.max_abs_charge))
        if bool((spin < 1).any()) or bool((spin > self.max_multiplicity).any()):
            bad = int(spin[(spin < 1) | (spin > self.max_multiplicity)][0])
            raise ValueError("spin multiplicity " + str(bad) + " is outside the model's range 1.."
                             + str(self.max_multiplicity))
        edge_bias, messages, env, values = self.edge_encoder(edge_vectors, receivers, senders, species, num_tokens,
                                                             self.edge_weights(), self.geometry_width > 0)
        h = (self.element_embedding(species[:num_tokens])
             + self.charge_embedding(charge + self.max_abs_charge)[token_batch]
             + self.spin_embedding(spin - 1)[token_batch] + messages / self.avg_num_neighbors)
        return h, edge_bias, env, values

    def apply_block(self, layer: int, h: torch.Tensor, bias: torch.Tensor, env: torch.Tensor, values: torch.Tensor,
                    receivers: torch.Tensor, senders: torch.Tensor, row_ptr: torch.Tensor,
                    num_updated: int) -> torch.Tensor:
        """Block number `layer` (see AttentionBlock.forward) with the edge values `values` (`initial_tokens`);
        every atom also attends to itself (zero displacement, envelope 1)."""
        # TorchScript workarounds, both cheap: a ModuleList cannot be indexed with a run-time integer
        # (`self.blocks[layer]` does not compile; enumerating does), so the loop picks the block; and every
        # block's self-edge bias is recomputed here, on each call, so that this method stands alone for callers
        # that call it block by block (a one-row product next to a block over all atoms).
        self_bias = self.self_edge_bias(h.dtype, h.device).view(len(self.blocks), -1)
        self_values = self.self_edge_values(h.dtype, h.device)
        for index, block in enumerate(self.blocks):
            if index == layer:
                h = block(h, bias, env, self_bias[layer], receivers, senders, row_ptr, num_updated, values,
                          self_values)
        return h

    def repulsion_energies(self, edge_vectors: torch.Tensor, receivers: torch.Tensor, senders: torch.Tensor,
                           species: torch.Tensor, num_atoms: int) -> torch.Tensor:
        """Per-atom share (num_atoms,) of the screened nuclear repulsion: each directed edge gives half of its
        pair's energy to its receiver, so that a pair seen from both ends (every neighbour list here, and
        LAMMPS ranks that each own one end) counts once. Zeros when the model has no repulsion."""
        energies = torch.zeros(num_atoms, dtype=edge_vectors.dtype, device=edge_vectors.device)
        if not self.repulsion or edge_vectors.shape[0] == 0:
            return energies
        # Only edges inside their pair's switch-off distance (a few per cent of the neighbour list) contribute:
        # beyond it the term and all its derivatives are exactly zero, so the others are left out before any
        # arithmetic, in every path. The filter is the widest pair's distance (one comparison per edge, no
        # per-pair lookup over the whole list); edges kept beyond their own pair's distance add exact zeros.
        squared = edge_vectors.detach().square().sum(1)
        near = torch.nonzero(squared < self.repulsion_reach * self.repulsion_reach).squeeze(1)
        edge_vectors, receivers = edge_vectors.index_select(0, near), receivers.index_select(0, near)
        s_i, s_j = species.index_select(0, receivers), species.index_select(0, senders.index_select(0, near))
        lengths = self.edge_lengths(edge_vectors)
        if self.analytic_derivatives and not torch.jit.is_scripting():
            share = analytic_zbl(lengths, self.repulsion_charge_product[s_i, s_j],
                                 self.repulsion_inverse_screening[s_i, s_j], self.repulsion_switch_off[s_i, s_j],
                                 self.repulsion_coefficients, self.repulsion_exponents)
            return energies.index_add(0, receivers, share)
        pair_energy = zbl_pair_energy(lengths, self.repulsion_charge_product[s_i, s_j],
                                      self.repulsion_inverse_screening[s_i, s_j], self.repulsion_coefficients,
                                      self.repulsion_exponents)
        switch = smooth_step_down(lengths / self.repulsion_switch_off[s_i, s_j])
        return energies.index_add(0, receivers, 0.5 * pair_energy * switch)

    def atom_energies(self, h: torch.Tensor, species: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies and latent vectors from the last block's tokens."""
        latent = self.final_norm(h)
        return self.readout(latent).squeeze(-1) * self.energy_scale + self.reference_energy[species], latent

    def energy_from_edges(self, edge_vectors: torch.Tensor, numbers: torch.Tensor, charge: torch.Tensor,
                          spin: torch.Tensor, batch: torch.Tensor, receivers: torch.Tensor,
                          senders: torch.Tensor, num_structures: int) -> Dict[str, torch.Tensor]:
        """Energy per structure, per-atom energies and per-atom latent vectors from edge displacements."""
        n = numbers.shape[0]
        species = self.species(numbers)
        # Edges grouped by receiver (CSR), as the fused attention reads them; neighbour lists from
        # transip.neighbors already are, other callers' lists may not be.
        if receivers.numel() > 1 and not bool((receivers[1:] >= receivers[:-1]).all()):
            order = torch.argsort(receivers, stable=True)
            edge_vectors, receivers, senders = edge_vectors[order], receivers[order], senders[order]
        row_ptr = csr_row_ptr(receivers, n)
        h, edge_bias, env, values = self.initial_tokens(edge_vectors, receivers, senders, species, charge, spin,
                                                        batch, n)
        for layer, bias in enumerate(edge_bias.unbind(0)):  # unbind: one gradient piece, not a zero tensor per layer
            h = self.apply_block(layer, h, bias, env, values, receivers, senders, row_ptr, n)
        atom_energy, latent = self.atom_energies(h, species)
        atom_energy = atom_energy + self.repulsion_energies(edge_vectors, receivers, senders, species, n)
        energy = torch.zeros(num_structures, dtype=atom_energy.dtype,
                             device=atom_energy.device).index_add(0, batch, atom_energy)
        energy = energy + self.charge_reference[charge + self.max_abs_charge] + self.spin_reference[spin - 1]
        return {"energy": energy, "atom_energy": atom_energy, "latent": latent}

    def forward(self, positions: torch.Tensor, numbers: torch.Tensor, charge: torch.Tensor, spin: torch.Tensor,
                batch: torch.Tensor, edge_index: torch.Tensor, shift_vectors: torch.Tensor, num_structures: int,
                compute_forces: bool = True, compute_virial: bool = False,
                create_graph: bool = False) -> Dict[str, torch.Tensor]:
        """Energy (B), atom energies (N), latent (N, d); forces (N, 3) and virial (B, 3, 3) on request.

        `edge_index` is (2, E) as [receiver, sender]; `shift_vectors` (E, 3) the Cartesian periodic shift.
        """
        receivers, senders = edge_index[0], edge_index[1]
        edge_vectors = self.edge_geometry.vectors(positions, receivers, senders, shift_vectors)
        if compute_forces or compute_virial:
            if not edge_vectors.requires_grad:
                edge_vectors.requires_grad_(True)
        out = self.energy_from_edges(edge_vectors, numbers, charge, spin, batch, receivers, senders,
                                     num_structures)
        if compute_forces or compute_virial:
            grads = torch.autograd.grad([out["energy"].sum()], [edge_vectors], create_graph=create_graph,
                                        allow_unused=True)
            g = grads[0]
            if g is None:  # no edges at all
                g = torch.zeros_like(edge_vectors)
            if compute_forces:
                out["forces"] = self.edge_geometry.forces(g, receivers, senders, positions.shape[0])
            if compute_virial:
                out["virial"] = edge_virial(g, edge_vectors, receivers, batch, num_structures)
        return out


@torch.jit.unused
def analytic_lengths(vectors: torch.Tensor) -> torch.Tensor:
    """|r| per edge with hand-derived second derivatives (training; never compiled into an artifact)."""
    return analytic.lengths(vectors)


@torch.jit.unused
def analytic_zbl(lengths: torch.Tensor, charge_product: torch.Tensor, inverse_screening: torch.Tensor,
                 switch_off: torch.Tensor, coefficients: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """Each edge's share of the switched repulsion with hand-derived second derivatives (training)."""
    with torch.no_grad():
        derivatives = zbl_switched_derivatives(lengths, charge_product, inverse_screening, switch_off, coefficients,
                                               exponents)
    return analytic.radial(lengths, *derivatives)


def edge_virial(g: torch.Tensor, edge_vectors: torch.Tensor, receivers: torch.Tensor, batch: torch.Tensor,
                num_structures: int) -> torch.Tensor:
    """Virial (num_structures, 3, 3) from the edge gradients g_e = dE/dr_e, as the module docstring derives it;
    `batch` (num_atoms,) is the structure of each atom (forces: the edge geometry modules of transip.kernels)."""
    if num_structures == 1:  # every engine call: one matrix product instead of a scatter of (E, 3, 3)
        return -(g.t() @ edge_vectors)[None]
    per_edge = -g[:, :, None] * edge_vectors[:, None, :]
    return torch.zeros(num_structures, 3, 3, dtype=g.dtype, device=g.device).index_add(
        0, batch.index_select(0, receivers), per_edge)  # each edge's structure is its receiver's


def csr_row_ptr(receivers: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row offsets (num_rows + 1) of edges grouped by receiver."""
    row_ptr = torch.zeros(num_rows + 1, dtype=torch.long, device=receivers.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(receivers, minlength=num_rows), 0)
    return row_ptr


class TransformationNetwork(nn.Module):
    """T(h, R): predicts the latent vector of the rotated structure from the latent of the original one."""

    def __init__(self, d_model: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or 2 * d_model
        self.net = MLP([d_model + 9, hidden, hidden, d_model])

    def forward(self, latent: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        rot = rotation.reshape(1, 9).to(latent.dtype).expand(latent.shape[0], 9)
        return latent + self.net(torch.cat([latent, rot], dim=1))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rotation_from_quaternion(q: torch.Tensor) -> torch.Tensor:
    a, b, c, d = (q / torch.linalg.norm(q)).unbind()
    return torch.stack([
        torch.stack([a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)]),
        torch.stack([2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)]),
        torch.stack([2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]),
    ])


def random_rotation(generator: Optional[torch.Generator] = None, dtype=torch.float64) -> torch.Tensor:
    """Uniform (Haar) random rotation: a normalised Gaussian quaternion is uniform on the sphere."""
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    return rotation_from_quaternion(q).to(dtype)

"""The TransIP model: a plain (non-equivariant) Transformer over atoms with neighbour attention.

See docs/model.md for the formulation. Shapes: N atoms, E neighbour edges (receiver i, sender j), B
structures, H heads, D = d_model / H. Units: Angstrom, eV.

Forces and virial come from one gradient: the energy depends on positions only through the edge
displacements r_e = x_j - x_i + shift_e, so with g_e = dE/dr_e

    F_i = sum_{e: receiver i} g_e - sum_{e: sender i} g_e,      virial_ab = -sum_e g_e,a r_e,b.

The same expression serves engines that pass ghost atoms (LAMMPS): forces land on whichever atom is the
sender, local or ghost.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import native
from .elements import ELEMENT_SYMBOLS  # the one element table (transip/elements.py); others import it from here
from .kernels import attention_module, edge_encoder_module, reference_edge_embedding


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

    @property
    def receptive_field(self) -> float:
        """How far an atom's energy reaches: one cutoff for the neighbour sum in the initial tokens, plus one
        per attention block. Engines with ghost atoms need ghosts out to this distance."""
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

    def __init__(self, d_model: int, num_heads: int, edge_hidden: int, ffn_multiplier: int, kernel: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.norm_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.edge_bias = nn.Linear(edge_hidden, num_heads)
        self.out = nn.Linear(d_model, d_model)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = MLP([d_model, ffn_multiplier * d_model, d_model])
        self.attention = attention_module(kernel)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, edge_envelope: torch.Tensor, self_bias: torch.Tensor,
                receivers: torch.Tensor, senders: torch.Tensor, row_ptr: torch.Tensor,
                num_updated: int) -> torch.Tensor:
        """`bias` (edges, heads) and `self_bias` (heads,) are this block's `edge_bias` of the neighbour edges
        and of the self edge (computed for all blocks at once by the model). Edges are grouped by receiver and
        `row_ptr` has a row for every atom of `h`; only the first `num_updated` atoms are updated and returned
        (the rest only send; their rows may be empty)."""
        n = h.shape[0]
        qkv = self.qkv(self.norm_attn(h)).view(n, 3, self.num_heads, self.head_dim)
        attended = self.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], bias, edge_envelope, self_bias, receivers,
                                  senders, row_ptr)
        # Explicit width, not -1: reshape cannot infer it when no atom is updated (an MPI rank without atoms).
        h = h[:num_updated] + self.out(attended[:num_updated].reshape(num_updated, self.num_heads * self.head_dim))
        return h + self.ffn(self.norm_ffn(h))


class TransIP(nn.Module):
    """The model. `kernel` picks the attention implementation (see transip.native): 'auto' (default: the
    TRANSIP_KERNEL environment variable, else fused when the native library is loaded), 'fused' or
    'reference'. Both compute the same function; `set_kernel` switches an existing model."""

    __jit_unused_properties__ = ["kernel"]

    def __init__(self, config: ModelConfig, kernel: str = "auto"):
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
        kernel = native.default_kernel() if kernel == "auto" else native.resolve_kernel(kernel)
        self.edge_encoder = edge_encoder_module(kernel)
        self.blocks = nn.ModuleList([AttentionBlock(c.d_model, c.num_heads, c.edge_hidden, c.ffn_multiplier, kernel)
                                     for _ in range(c.num_layers)])
        self.final_norm = nn.LayerNorm(c.d_model)
        self.readout = MLP([c.d_model, c.d_model, 1])
        # Per-element reference energies and the scale of the learned residual, fitted on training data.
        self.register_buffer("reference_energy", torch.zeros(num_species))
        # Energy offsets of a whole structure by total charge and by spin multiplicity (ionisation and
        # spin-pairing energies do not scale with size). Added to the total, not to atom energies, so that
        # engines splitting atoms over ranks add it exactly once.
        self.register_buffer("charge_reference", torch.zeros(2 * c.max_abs_charge + 1))
        self.register_buffer("spin_reference", torch.zeros(c.max_multiplicity))
        self.register_buffer("energy_scale", torch.ones(()))

    @torch.jit.unused
    def set_kernel(self, kernel: str) -> "TransIP":
        """Switch every attention layer to 'fused', 'reference' or 'auto'; returns the model."""
        resolved = native.default_kernel() if kernel == "auto" else native.resolve_kernel(kernel)
        for block in self.blocks:
            block.attention = attention_module(resolved)
        self.edge_encoder = edge_encoder_module(resolved)
        return self

    @property
    def kernel(self) -> str:
        return self.blocks[0].attention.kernel if len(self.blocks) else "reference"

    # ---------------------------------------------------------------- features
    def bias_parameters(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The attention-bias layers of every block stacked: one product gives all blocks' biases."""
        weights: List[torch.Tensor] = []
        offsets: List[torch.Tensor] = []
        for block in self.blocks:
            weights.append(block.edge_bias.weight)
            offsets.append(block.edge_bias.bias)
        return torch.cat(weights), torch.cat(offsets)

    def self_edge_bias(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Attention biases (1, layers * heads) of the self edge (zero displacement), built from constants so
        that no gradient passes through |0|."""
        first, second = self.edge_mlp.net[0], self.edge_mlp.net[2]
        zero = torch.zeros(1, 3, dtype=dtype, device=device)
        embedding = reference_edge_embedding(zero, zero[:, 0], self.rbf_centers, self.rbf_width, self.cutoff,
                                             first.weight, first.bias, second.weight, second.bias)
        weight, offset = self.bias_parameters()
        return torch.nn.functional.linear(embedding, weight, offset)

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
                       num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial tokens (num_tokens, d) of the first `num_tokens` atoms, and the per-edge work of every block:
        attention biases (layers, E, heads) and envelope (E,). Every receiver must be below `num_tokens`;
        senders index `species` (which may hold more atoms, e.g. ghosts)."""
        # Named with the value: engines show this text when a model call fails (pair_style transip does).
        if bool((charge.abs() > self.max_abs_charge).any()):
            bad = int(charge[charge.abs() > self.max_abs_charge][0])
            raise ValueError("total charge " + str(bad) + " is outside the model's range -" + str(self.max_abs_charge)
                             + ".." + str(self.max_abs_charge))
        if bool((spin < 1).any()) or bool((spin > self.max_multiplicity).any()):
            bad = int(spin[(spin < 1) | (spin > self.max_multiplicity)][0])
            raise ValueError("spin multiplicity " + str(bad) + " is outside the model's range 1.."
                             + str(self.max_multiplicity))
        first, second = self.edge_mlp.net[0], self.edge_mlp.net[2]
        bias_weight, bias_offset = self.bias_parameters()
        edge_bias, messages, env = self.edge_encoder(
            edge_vectors, receivers, senders, species, num_tokens, self.rbf_centers, self.rbf_width, self.cutoff,
            first.weight, first.bias, second.weight, second.bias, bias_weight, bias_offset, len(self.blocks),
            self.edge_message.weight, self.edge_message.bias, self.neighbor_element_embedding.weight)
        h = (self.element_embedding(species[:num_tokens])
             + self.charge_embedding(charge + self.max_abs_charge)[token_batch]
             + self.spin_embedding(spin - 1)[token_batch] + messages / self.avg_num_neighbors)
        return h, edge_bias, env

    def apply_block(self, layer: int, h: torch.Tensor, bias: torch.Tensor, env: torch.Tensor,
                    receivers: torch.Tensor, senders: torch.Tensor, row_ptr: torch.Tensor,
                    num_updated: int) -> torch.Tensor:
        """Block number `layer` (see AttentionBlock.forward); every atom also attends to itself (zero
        displacement, envelope 1)."""
        self_bias = self.self_edge_bias(h.dtype, h.device).view(len(self.blocks), -1)
        for index, block in enumerate(self.blocks):
            if index == layer:
                h = block(h, bias, env, self_bias[layer], receivers, senders, row_ptr, num_updated)
        return h

    def atom_energies(self, h: torch.Tensor, species: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies and latent vectors from the last block's tokens."""
        latent = self.final_norm(h)
        return self.readout(latent).squeeze(-1) * self.energy_scale + self.reference_energy[species], latent

    def energy_from_edges(self, edge_vectors: torch.Tensor, numbers: torch.Tensor, charge: torch.Tensor,
                          spin: torch.Tensor, batch: torch.Tensor, receivers: torch.Tensor,
                          senders: torch.Tensor, num_structures: int,
                          depth_counts: Optional[List[int]] = None) -> Dict[str, torch.Tensor]:
        """Energy per structure, per-atom energies and per-atom latent vectors from edge displacements.

        `depth_counts` (see `receptive_order`) restricts the work to what the first `depth_counts[0]` atoms'
        energies need: atoms sorted by graph distance from them, `depth_counts[k]` of them within k hops. The
        initial tokens are then built for atoms within `layers` hops, block l updates atoms within
        `layers - l` hops, and energies are returned for the first `depth_counts[0]` atoms only. Without it,
        every atom is computed (`depth_counts` = [N] * (layers + 2))."""
        n = numbers.shape[0]
        layers = len(self.blocks)
        counts = depth_counts if depth_counts is not None else [n] * (layers + 2)
        if len(counts) != layers + 2 or counts[layers + 1] != n:
            raise ValueError("depth_counts must have layers + 2 entries ending with the number of atoms")
        species = self.species(numbers)
        # Edges grouped by receiver (CSR), as the fused attention reads them; neighbour lists from
        # transip.neighbors already are, engines' lists may not be.
        if receivers.numel() > 1 and not bool((receivers[1:] >= receivers[:-1]).all()):
            order = torch.argsort(receivers, stable=True)
            edge_vectors, receivers, senders = edge_vectors[order], receivers[order], senders[order]
        row_ptr = csr_row_ptr(receivers, n)

        # Initial tokens only for the atoms that need them: their edges are a prefix, as edges are grouped.
        tokens = counts[layers]
        edges = int(row_ptr[tokens])
        edge_vectors, receivers, senders = edge_vectors[:edges], receivers[:edges], senders[:edges]
        h, edge_bias, env = self.initial_tokens(edge_vectors, receivers, senders, species, charge, spin,
                                                batch[:tokens], tokens)
        for layer in range(layers):
            # Block `layer` reads the atoms within `layers - layer` hops and updates those within one hop fewer.
            rows, updated = counts[layers - layer], counts[layers - layer - 1]
            block_edges = int(row_ptr[updated])
            block_row_ptr = torch.cat([row_ptr[:updated + 1], row_ptr[updated:updated + 1].expand(rows - updated)])
            h = self.apply_block(layer, h, edge_bias[layer, :block_edges], env[:block_edges],
                                 receivers[:block_edges], senders[:block_edges], block_row_ptr, updated)

        atom_energy, latent = self.atom_energies(h, species[:counts[0]])
        energy = torch.zeros(num_structures, dtype=atom_energy.dtype,
                             device=atom_energy.device).index_add(0, batch[:counts[0]], atom_energy)
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
        edge_vectors = positions.index_select(0, senders) - positions.index_select(0, receivers) + shift_vectors
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
                forces = torch.zeros_like(positions).index_add(0, receivers, g).index_add(0, senders, -g)
                out["forces"] = forces
            if compute_virial:
                per_edge = -g[:, :, None] * edge_vectors[:, None, :]
                virial = torch.zeros(num_structures, 3, 3, dtype=g.dtype, device=g.device)
                out["virial"] = virial.index_add(0, batch.index_select(0, receivers), per_edge)
        return out


def csr_row_ptr(receivers: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row offsets (num_rows + 1) of edges grouped by receiver."""
    row_ptr = torch.zeros(num_rows + 1, dtype=torch.long, device=receivers.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(receivers, minlength=num_rows), 0)
    return row_ptr


def receptive_order(receivers: torch.Tensor, senders: torch.Tensor, num_atoms: int, num_centres: int,
                    layers: int) -> Tuple[torch.Tensor, List[int]]:
    """Which atoms the energies of the first `num_centres` atoms depend on, and in what order to compute them.

    An atom's energy reads the tokens of its neighbours after `layers - 1` blocks, theirs read their
    neighbours', and the initial tokens sum over neighbours once more: so it depends on atoms up to
    `layers + 1` edge hops away, and block l is needed only for atoms within `layers - l` hops. Returns the
    atoms within `layers + 1` hops sorted by hop count (the centres first, in their order) and the counts
    within 0, 1, ..., layers + 1 hops, the `depth_counts` of `TransIP.energy_from_edges`. Engines with ghost
    atoms (LAMMPS) pass ghosts out to the receptive field, most of which only feed the outer hops."""
    unreached = layers + 2
    depth = torch.full((num_atoms,), unreached, dtype=torch.long, device=receivers.device)
    depth[:num_centres] = 0
    for hop in range(1, layers + 2):
        from_frontier = depth.index_select(0, receivers) == hop - 1
        reached = torch.zeros(num_atoms, dtype=torch.bool, device=receivers.device)
        reached[senders[from_frontier]] = True
        depth = torch.where(reached & (depth > hop), torch.full_like(depth, hop), depth)
    order = torch.argsort(depth, stable=True)
    counts = torch.cumsum(torch.bincount(depth, minlength=unreached + 1), 0)
    depth_counts: List[int] = []
    for hops in range(layers + 2):
        depth_counts.append(int(counts[hops]))
    return order[:depth_counts[layers + 1]], depth_counts


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

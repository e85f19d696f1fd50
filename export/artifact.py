"""Checkpoint -> one TorchScript artifact with its metadata inside, for Python, C++, OpenMM and LAMMPS.

The artifact is a scripted `TransIPArtifact` (Angstrom and eV in, eV and eV/A out, the dtype chosen at
export) with three whole-structure methods, and the halo methods further down for engines that exchange each
block's tokens between domains (docs/artifact.md):

- `compute(positions, numbers, cell, pbc, charge, spin, compute_virial)`: one structure; the artifact builds
  its own neighbour list (native cell list for the fused kernel, the all-pairs reference otherwise). Returns
  energy (scalar), forces (N, 3), atom_energies (N,), virial (3, 3).
- `compute_with_neighbors(positions, numbers, edge_index, shift_vectors, num_local, charge, spin,
  include_offsets, compute_virial)`: for engines that own the neighbour list and ghost atoms.
  `positions` holds local atoms first, then ghosts; `edge_index` (2, E) is [receiver, sender] over that
  array and `shift_vectors` (E, 3) the Cartesian periodic shifts (zeros when ghosts are explicit images).
  The energy is the sum over local atoms (plus the structure's charge/spin offsets when `include_offsets`,
  so that exactly one rank adds them); forces act on every atom, ghosts included (the engine sums ghost
  forces back onto their owners); the virial is -sum_e g_e (x) r_e over all edges.
- `edge_energy_gradients(edge_vectors, numbers, receivers, senders, charge, spin)`: per-atom energies and
  dE/d(edge vector) from edges the engine has already formed (LAMMPS on one rank, images folded onto owners).

Metadata (format version, elements, cutoff, layers, receptive field, units, dtype, charge/spin ranges,
native ops and their version, provenance, metrics, creation time) is a JSON extra file,
`transip_metadata.json`, readable without running the model (`torch.jit.load(..., _extra_files=...)` in
Python, `torch::jit::load(path, device, extra_files)` in C++).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from transip import __version__, native
from transip.checkpoint import load_checkpoint, model_from_checkpoint
from transip.domain import trained_domain
from transip.files import write_atomically
from transip.model import ELEMENT_SYMBOLS, TransIP, csr_row_ptr, receptive_order
from transip.neighbors import reference_neighbors

FORMAT = "transip-artifact"
FORMAT_VERSION = 1
METADATA_FILE = "transip_metadata.json"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Ops a fused artifact calls; the library version must match at load time.
FUSED_OPS = ["transip::neighbor_list", "transip::edge_encoder", "transip::neighbor_attention"]


class NativeNeighborList(nn.Module):
    """Cell list (`torch.ops.transip.neighbor_list`), linear in atoms."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if bool(pbc.any()):
            return torch.ops.transip.neighbor_list(positions, cell, pbc, self.cutoff)
        return torch.ops.transip.neighbor_list(positions, None, None, self.cutoff)


class ReferenceNeighborList(nn.Module):
    """All pairs in plain TorchScript: an artifact with it needs no native library."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return reference_neighbors(positions, self.cutoff, cell, pbc)


class TransIPArtifact(nn.Module):
    def __init__(self, model: TransIP, native_neighbors: bool):
        super().__init__()
        self.model = model
        self.cutoff = float(model.cutoff)
        self.max_abs_charge = int(model.max_abs_charge)
        self.max_multiplicity = int(model.max_multiplicity)
        # A submodule, not a flag: TorchScript compiles only the chosen one, so a reference artifact never
        # names a native op.
        self.neighbors = (NativeNeighborList if native_neighbors else ReferenceNeighborList)(self.cutoff)

    @torch.jit.export
    def compute(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                charge: int = 0, spin: int = 1, compute_virial: bool = True) -> Dict[str, torch.Tensor]:
        dtype = self.model.reference_energy.dtype
        positions = positions.to(dtype)
        cell = cell.to(dtype)
        edge_index, shifts = self.neighbors(positions, cell, pbc)
        shift_vectors = shifts.to(dtype) @ cell
        n = positions.shape[0]
        out = self.model(positions, numbers, torch.tensor([charge]), torch.tensor([spin]),
                         torch.zeros(n, dtype=torch.long), edge_index, shift_vectors, 1, True, compute_virial)
        energy = out["energy"][0]
        if n == 0:
            # An empty structure has no energy: the charge/spin offset belongs to a structure's atoms. (The model
            # still ran, so a charge or spin outside its range fails here as it would with atoms.)
            energy = torch.zeros_like(energy)
        result = {"energy": energy, "forces": out["forces"], "atom_energies": out["atom_energy"]}
        if compute_virial:
            result["virial"] = out["virial"][0]
        return result

    def forward(self, positions: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                charge: int = 0, spin: int = 1, compute_virial: bool = True) -> Dict[str, torch.Tensor]:
        return self.compute(positions, numbers, cell, pbc, charge, spin, compute_virial)

    @torch.jit.export
    def compute_with_neighbors(self, positions: torch.Tensor, numbers: torch.Tensor, edge_index: torch.Tensor,
                               shift_vectors: torch.Tensor, num_local: int, charge: int = 0, spin: int = 1,
                               include_offsets: bool = True, compute_virial: bool = True,
                               compute_atom_virial: bool = False) -> Dict[str, torch.Tensor]:
        dtype = self.model.reference_energy.dtype
        n = positions.shape[0]
        # Only the atoms and edges the local energies depend on, sorted so that each block's work is a prefix
        # (most ghosts out at the receptive field only feed the initial tokens of nearer atoms).
        layers = len(self.model.blocks)
        if num_local < n:
            kept, depth_counts = receptive_order(edge_index[0], edge_index[1], n, num_local, layers)
        else:
            kept, depth_counts = torch.arange(n), [n] * (layers + 2)
        new_index = torch.full((n,), -1, dtype=torch.long)
        new_index[kept] = torch.arange(kept.shape[0])
        receivers, senders = new_index[edge_index[0]], new_index[edge_index[1]]
        needed = (receivers >= 0) & (receivers < depth_counts[layers])
        receivers, senders, shifts = receivers[needed], senders[needed], shift_vectors.to(dtype)[needed]
        positions = positions.to(dtype)[kept]
        edge_vectors = positions.index_select(0, senders) - positions.index_select(0, receivers) + shifts
        atom_energies, g = self.edge_energy_gradients(edge_vectors, numbers[kept], receivers, senders, charge, spin,
                                                      depth_counts)
        edge_vectors = edge_vectors.detach()
        energy = atom_energies.sum()
        if include_offsets:
            energy = energy + self.energy_offset(charge, spin)
        # Back to the caller's atoms; those the energy does not depend on get zero.
        kept_forces = torch.zeros_like(positions).index_add(0, receivers, g).index_add(0, senders, -g)
        forces = torch.zeros(n, 3, dtype=dtype).index_copy(0, kept, kept_forces)
        result = {"energy": energy, "forces": forces, "atom_energies": atom_energies}
        if compute_virial:
            result["virial"] = -(g.t() @ edge_vectors)
        if compute_atom_virial:
            # Each edge's virial -g (x) r shared equally by its two atoms; the atoms' sum is the virial.
            half = -0.5 * g[:, :, None] * edge_vectors[:, None, :]
            result["atom_virial"] = torch.zeros(n, 3, 3, dtype=g.dtype).index_add(0, kept[receivers], half).index_add(
                0, kept[senders], half)
        return result

    @torch.jit.export
    def edge_energy_gradients(self, edge_vectors: torch.Tensor, numbers: torch.Tensor, receivers: torch.Tensor,
                              senders: torch.Tensor, charge: int = 0, spin: int = 1,
                              depth_counts: Optional[List[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies (charge/spin offset not included) and dE/d(edge vector), in one pass, over a graph
        whose atoms include every sender: periodic images folded onto their owners (LAMMPS on one rank), or
        explicit ghosts pruned by `depth_counts` (`compute_with_neighbors`; see `TransIP.energy_from_edges`).
        Edges grouped by receiver; `edge_vectors` = x_sender - x_receiver."""
        dtype = self.model.reference_energy.dtype
        edge_vectors = edge_vectors.detach().to(dtype).requires_grad_(True)
        n = numbers.shape[0]
        out = self.model.energy_from_edges(edge_vectors, numbers, torch.tensor([charge]), torch.tensor([spin]),
                                           torch.zeros(n, dtype=torch.long), receivers, senders, 1, depth_counts)
        atom_energies = out["atom_energy"]
        grads = torch.autograd.grad([atom_energies.sum()], [edge_vectors], allow_unused=True)
        g = grads[0]
        if g is None:
            g = torch.zeros_like(edge_vectors)
        return atom_energies.detach(), g

    # ---------------------------------------------------------------- halo exchange, block by block
    # For engines that exchange each block's tokens between domains (LAMMPS on several ranks) instead of
    # carrying ghosts out to the receptive field: ghosts then only need to reach one cutoff. The engine calls
    # halo_tokens once, halo_block for each of `num_layers` blocks (with the ghosts' tokens from their owners
    # appended to its local tokens), halo_energies at the end, and differentiates back through the same calls
    # (docs/artifact.md has the recipe, lammps/src/pair_transip.cpp an implementation).

    @torch.jit.export
    def energy_offset(self, charge: int = 0, spin: int = 1) -> torch.Tensor:
        """The structure's energy offset for its total charge and spin (add it once per structure)."""
        # Checked here: a negative index would silently wrap around to another charge's or spin's offset.
        if charge < -self.max_abs_charge or charge > self.max_abs_charge:
            raise ValueError("energy_offset: total charge " + str(charge) + " is outside the model's range -"
                             + str(self.max_abs_charge) + ".." + str(self.max_abs_charge))
        if spin < 1 or spin > self.max_multiplicity:
            raise ValueError("energy_offset: spin multiplicity " + str(spin) + " is outside the model's range 1.."
                             + str(self.max_multiplicity))
        return self.model.charge_reference[charge + self.max_abs_charge] + self.model.spin_reference[spin - 1]

    @torch.jit.export
    def halo_tokens(self, edge_vectors: torch.Tensor, numbers: torch.Tensor, receivers: torch.Tensor,
                    senders: torch.Tensor, num_local: int, charge: int = 0,
                    spin: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial tokens of the local atoms (num_local, d), attention biases of every block (layers, E, heads)
        and envelope (E,). Edges: local receivers, grouped by receiver; senders local or ghost; `numbers`
        covers local atoms then ghosts; `edge_vectors` = x_sender - x_receiver."""
        species = self.model.species(numbers)
        return self.model.initial_tokens(edge_vectors, receivers, senders, species, torch.tensor([charge]),
                                         torch.tensor([spin]), torch.zeros(num_local, dtype=torch.long), num_local)

    @torch.jit.export
    def halo_block(self, layer: int, tokens: torch.Tensor, bias: torch.Tensor, envelope: torch.Tensor,
                   receivers: torch.Tensor, senders: torch.Tensor, num_local: int) -> torch.Tensor:
        """Block `layer` on tokens of local atoms then ghosts (N, d); returns the local atoms' new tokens."""
        row_ptr = csr_row_ptr(receivers, tokens.shape[0])
        return self.model.apply_block(layer, tokens, bias, envelope, receivers, senders, row_ptr, num_local)

    @torch.jit.export
    def halo_energies(self, tokens: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Per-atom energies of the local atoms from the last block's tokens."""
        return self.model.atom_energies(tokens, self.model.species(numbers))[0]


def build_metadata(payload: dict, model: TransIP, dtype: str, kernel: str, checkpoint: Path) -> dict:
    config = model.config
    metrics_file = checkpoint.parent / "test_metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    history = payload.get("history") or []
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "transip_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elements": [ELEMENT_SYMBOLS[int(z)] for z in config.elements],
        "atomic_numbers": [int(z) for z in config.elements],
        "cutoff": float(config.cutoff),
        "num_layers": int(config.num_layers),
        "receptive_field": float(config.receptive_field),
        "units": {"length": "angstrom", "energy": "eV", "forces": "eV/angstrom", "virial": "eV"},
        "dtype": dtype,
        "kernel": kernel,
        "charge_spin": {"inputs": True, "max_abs_charge": int(config.max_abs_charge),
                        "max_multiplicity": int(config.max_multiplicity)},
        # what the training data held; engines refuse anything else unless the user insists (transip.domain)
        "trained_domain": trained_domain(payload),
        "native_ops": ({"library": "transip", "version": native.version(), "ops": FUSED_OPS}
                       if kernel == "fused" else None),
        "methods": ["compute", "compute_with_neighbors", "edge_energy_gradients", "energy_offset", "halo_tokens",
                    "halo_block", "halo_energies"],
        "model_config": {k: v for k, v in config.__dict__.items()},
        "provenance": {**(payload.get("provenance") or {}), "checkpoint": checkpoint.name,
                       "epoch": payload.get("epoch"), "step": payload.get("step")},
        "metrics": {"validation": history[-1] if history else None, "test": metrics},
    }


def export_checkpoint(checkpoint, output, dtype: str = "float64", kernel: str = "fused") -> dict:
    """Script the checkpoint's model with the chosen dtype and kernel and write the artifact atomically.
    Returns the metadata written into it."""
    checkpoint, output = Path(checkpoint), Path(output)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose float64 or float32")
    if kernel not in ("fused", "reference"):
        raise ValueError(f"unknown kernel {kernel!r}: choose fused or reference")
    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(payload, dtype=DTYPES[dtype]).set_kernel(kernel)
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # inference: forces come from geometry gradients only
    metadata = build_metadata(payload, model, dtype, kernel, checkpoint)
    scripted = torch.jit.script(TransIPArtifact(model, native_neighbors=kernel == "fused"))
    write_atomically(output, lambda tmp: torch.jit.save(scripted, str(tmp),
                                                       _extra_files={METADATA_FILE: json.dumps(metadata, indent=1)}))
    return metadata


def describe(metadata: dict) -> str:
    """Human-readable summary for `transip inspect`."""
    ops: Optional[dict] = metadata.get("native_ops")
    test = (metadata.get("metrics") or {}).get("test") or {}
    frames = test.get("test_frames") or {}
    lines = [
        f"format            {metadata['format']} v{metadata['format_version']} (transip {metadata['transip_version']},"
        f" torch {metadata['torch_version']})",
        f"created           {metadata['created']}",
        f"elements          {' '.join(metadata['elements'])}",
        f"cutoff            {metadata['cutoff']} A, {metadata['num_layers']} layers, receptive field "
        f"{metadata['receptive_field']} A",
        f"units             {metadata['units']['length']}, {metadata['units']['energy']}",
        f"dtype / kernel    {metadata['dtype']} / {metadata['kernel']}",
        f"charge, spin      inputs; |charge| <= {metadata['charge_spin']['max_abs_charge']}, multiplicity 1.."
        f"{metadata['charge_spin']['max_multiplicity']}",
        "trained domain    " + _describe_domain(metadata.get("trained_domain")),
        "native ops        " + (f"{ops['library']} {ops['version']}: {', '.join(ops['ops'])}" if ops else "none"),
        f"methods           {', '.join(metadata['methods'])}",
        f"trained on        {metadata['provenance'].get('dataset')} (objective {metadata['provenance'].get('objective')},"
        f" {metadata['provenance'].get('parameters')} parameters)",
    ]
    if frames:
        lines.append(f"test (frames)     energy MAE {1000 * frames['energy_mae_per_atom']:.2f} meV/atom, force MAE "
                     f"{1000 * frames['force_mae']:.1f} meV/A")
    return "\n".join(lines)


def _describe_domain(domain: Optional[dict]) -> str:
    if not domain:
        return "not recorded (exported from a checkpoint trained before it was recorded)"
    return (f"elements {' '.join(domain['elements'])}; charges {domain['charges']}; multiplicities "
            f"{domain['spins']}")

"""Checkpoint -> one TorchScript artifact with its metadata inside, for Python, C++, OpenMM and LAMMPS.

The artifact is a scripted `TransIPArtifact` (Angstrom and eV in, eV and eV/A out, the dtype chosen at
export). Each method is named for the engine path that calls it (docs/artifact.md):

- `compute(positions, numbers, cell, pbc, charge, spin, compute_virial)`: positions and a box (OpenMM,
  transip-bench, Python); the artifact builds its own neighbour list (native cell list for the fused kernel,
  the all-pairs reference otherwise). Returns energy (scalar), forces (N, 3), atom_energies (N,), virial (3, 3).
- `edge_energy_gradients(edge_vectors, numbers, receivers, senders, charge, spin)` and
  `energy_offset(charge, spin)`: one domain whose engine has formed the edges (LAMMPS on one rank, periodic
  images folded onto their owners): per-atom energies and dE/d(edge vector) in one pass, and the structure's
  charge/spin offset, added once.
- `halo_tokens`, `halo_block`, `halo_energies` (export/halo.py, with the recipe): several domains that exchange
  each block's tokens (LAMMPS on several ranks).

Metadata (format version, elements, cutoff, layers, receptive field, units, dtype, charge/spin ranges, native
ops and their version, provenance, metrics, creation time) is a JSON extra file, `contract.METADATA_FILE`,
readable without running the model (`torch.jit.load(..., _extra_files=...)` in Python,
`torch::jit::load(path, device, extra_files)` in C++). Its format version, file name and the keys engines read
are in export/contract.py, from which C++ gets them too.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from transip import __version__, native
from transip.checkpoint import load_checkpoint, model_from_checkpoint
from transip.domain import trained_domain
from transip.files import write_atomically
from transip.elements import ELEMENT_SYMBOLS
from transip.model import TransIP
from transip.neighbors import reference_neighbors

from . import contract as c
from .contract import FORMAT, FORMAT_VERSION, METADATA_FILE
from .halo import HALO_METHODS, HaloExchange

# What an artifact offers, by engine path (module docstring); recorded in the metadata as `methods`.
METHODS = ["compute", "edge_energy_gradients", "energy_offset"] + HALO_METHODS
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Ops a fused artifact calls; the library version must match at load time.
FUSED_OPS = ["transip::neighbor_list", "transip::edge_encoder", "transip::neighbor_attention"]


class FusedNeighborList(nn.Module):
    """The fused kernel's neighbour list: the native cell list (`torch.ops.transip.neighbor_list`), linear in
    atoms."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if bool(pbc.any()):
            return torch.ops.transip.neighbor_list(positions, cell, pbc, self.cutoff)
        return torch.ops.transip.neighbor_list(positions, None, None, self.cutoff)


class ReferenceNeighborList(nn.Module):
    """The reference kernel's neighbour list: all pairs in plain TorchScript, so an artifact with it needs no
    native library."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return reference_neighbors(positions, self.cutoff, cell, pbc)


class TransIPArtifact(HaloExchange):
    def __init__(self, model: TransIP, kernel: str):
        """`kernel` ('fused' or 'reference', as the model's) picks the neighbour list `compute` builds."""
        super().__init__()
        self.model = model
        self.cutoff = float(model.cutoff)
        self.max_abs_charge = int(model.max_abs_charge)
        self.max_multiplicity = int(model.max_multiplicity)
        # A submodule, not a flag: TorchScript compiles only the chosen one, so a reference artifact never
        # names a native op.
        self.neighbors = (FusedNeighborList if kernel == "fused" else ReferenceNeighborList)(self.cutoff)

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
    def edge_energy_gradients(self, edge_vectors: torch.Tensor, numbers: torch.Tensor, receivers: torch.Tensor,
                              senders: torch.Tensor, charge: int = 0,
                              spin: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies (charge/spin offset not included) and dE/d(edge vector), in one pass, over a graph
        whose atoms include every sender: one domain, periodic images folded onto their owners (LAMMPS on one
        rank). Edges grouped by receiver; `edge_vectors` = x_sender - x_receiver, each image's own displacement.
        Forces and virial follow from the gradients (transip.kernels.reference_edge_forces,
        transip.model.edge_virial)."""
        dtype = self.model.reference_energy.dtype
        edge_vectors = edge_vectors.detach().to(dtype).requires_grad_(True)
        n = numbers.shape[0]
        out = self.model.energy_from_edges(edge_vectors, numbers, torch.tensor([charge]), torch.tensor([spin]),
                                           torch.zeros(n, dtype=torch.long), receivers, senders, 1)
        atom_energies = out["atom_energy"]
        grads = torch.autograd.grad([atom_energies.sum()], [edge_vectors], allow_unused=True)
        g = grads[0]
        if g is None:
            g = torch.zeros_like(edge_vectors)
        return atom_energies.detach(), g

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


def build_metadata(payload: dict, model: TransIP, dtype: str, kernel: str, checkpoint: Path) -> dict:
    config = model.config
    metrics_file = checkpoint.parent / "test_metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    history = payload.get("history") or []
    # Keys that engines read come from the contract (c.KEY_..., dotted paths nest), so that C++ reads what is
    # written here; the rest is for people and `transip inspect`.
    return c.nested({
        c.KEY_FORMAT: FORMAT,
        c.KEY_FORMAT_VERSION: FORMAT_VERSION,
        "transip_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elements": [ELEMENT_SYMBOLS[int(z)] for z in config.elements],
        c.KEY_ATOMIC_NUMBERS: [int(z) for z in config.elements],
        c.KEY_CUTOFF: float(config.cutoff),
        c.KEY_NUM_LAYERS: int(config.num_layers),
        c.KEY_RECEPTIVE_FIELD: float(config.receptive_field),
        "units": {"length": "angstrom", "energy": "eV", "forces": "eV/angstrom", "virial": "eV"},
        c.KEY_DTYPE: dtype,
        c.KEY_KERNEL: kernel,
        "charge_spin.inputs": True,
        c.KEY_MAX_ABS_CHARGE: int(config.max_abs_charge),
        c.KEY_MAX_MULTIPLICITY: int(config.max_multiplicity),
        # what the training data held; engines refuse anything else unless the user insists (transip.domain)
        c.KEY_TRAINED_DOMAIN: trained_domain(payload),
        c.KEY_NATIVE_OPS: ({"library": "transip", "version": native.version(), "ops": FUSED_OPS}
                           if kernel == "fused" else None),
        c.KEY_METHODS: METHODS,
        "model_config": {k: v for k, v in config.__dict__.items()},
        "provenance": {**(payload.get("provenance") or {}), "checkpoint": checkpoint.name,
                       "epoch": payload.get("epoch"), "step": payload.get("step")},
        "metrics": {"validation": history[-1] if history else None, "test": metrics},
    })


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
    scripted = torch.jit.script(TransIPArtifact(model, kernel))
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
        "repulsion         " + _describe_repulsion(metadata["model_config"]),
        "block geometry    " + ("edge features in every block" if metadata["model_config"].get("block_geometry")
                                else "none (only the initial tokens see edge geometry)"),
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


def _describe_repulsion(config: dict) -> str:
    if config.get("repulsion", "none") == "none":
        return "none"
    return f"{config['repulsion']}, switched off at {config['repulsion_range']} x the sum of covalent radii"


def _describe_domain(domain: Optional[dict]) -> str:
    if not domain:
        return "not recorded (exported from a checkpoint trained before it was recorded)"
    return (f"elements {' '.join(domain['elements'])}; charges {domain['charges']}; multiplicities "
            f"{domain['spins']}")

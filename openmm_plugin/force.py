"""A TransIP artifact as an `openmmtorch.TorchForce`, in OpenMM's units (nm, kJ/mol).

    from transip.openmm_plugin import create_force
    system.addForce(create_force("model.pt", topology=topology, charge=0, spin=1))

The force wraps the artifact in a small scripted module that converts units, picks the ML particles out of
the whole system (ML/MM), builds the neighbour list inside the artifact (periodic boxes, triclinic too) and
returns energy *and* forces (`setOutputsForces(True)`): the artifact computes forces by its own gradient, so
OpenMM does not differentiate through it. Creating the force imports transip, which loads the native ops
library before OpenMM deserialises the model; a process that reads a saved System must `import transip`
first for the same reason.

Saving a System with this force (XmlSerializer, copy.deepcopy, pickle) needs an openmmtorch built against the
installed OpenMM's serialization classes: constraints.txt pins such a set, and `serialization_problem()` names
a known-bad pair (docs/openmm.md, "Saving Systems").
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from transip.domain import check_trained_domain
from transip.export import ArtifactError, load
from transip.export.contract import ANGSTROM_PER_NM, KJ_PER_MOL_PER_EV  # the one source of unit factors


class TransIPOpenMMModule(nn.Module):
    """forward(positions [nm], boxvectors [nm]) -> (energy [kJ/mol], forces [kJ/mol/nm]) for the whole system."""

    def __init__(self, artifact: torch.jit.ScriptModule, numbers: torch.Tensor, atoms: Optional[torch.Tensor],
                 charge: int, spin: int, periodic: bool, dtype: torch.dtype):
        super().__init__()
        self.artifact = artifact
        self.register_buffer("numbers", numbers.to(torch.long))
        self.subset = atoms is not None
        self.register_buffer("atoms", atoms.to(torch.long) if atoms is not None else torch.zeros(0, dtype=torch.long))
        self.charge = int(charge)
        self.spin = int(spin)
        self.periodic = bool(periodic)
        self.register_buffer("dtype_carrier", torch.zeros(0, dtype=dtype))
        self.angstrom_per_nm = ANGSTROM_PER_NM
        self.kj_per_mol_per_ev = KJ_PER_MOL_PER_EV

    def forward(self, positions: torch.Tensor,
                boxvectors: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        dtype = self.dtype_carrier.dtype
        ml_positions = positions.index_select(0, self.atoms) if self.subset else positions
        ml_positions = ml_positions.to(dtype) * self.angstrom_per_nm
        cell = torch.zeros(3, 3, dtype=dtype)
        pbc = torch.zeros(3, dtype=torch.bool)
        if self.periodic:
            if boxvectors is None:
                raise RuntimeError("TransIP force: periodic system but OpenMM passed no box vectors")
            cell = boxvectors.to(dtype) * self.angstrom_per_nm
            pbc = torch.ones(3, dtype=torch.bool)
        out = self.artifact.compute(ml_positions, self.numbers, cell, pbc, self.charge, self.spin, False)
        energy = out["energy"] * self.kj_per_mol_per_ev
        forces = (out["forces"] * (self.kj_per_mol_per_ev * self.angstrom_per_nm)).to(positions.dtype)
        if self.subset:
            forces = torch.zeros_like(positions).index_copy(0, self.atoms, forces)
        return energy.to(positions.dtype), forces


def box_widths(box_vectors) -> np.ndarray:
    """Distance between opposite faces of a box given by three vectors (rows), in the vectors' unit."""
    a = np.asarray(box_vectors, dtype=float)
    volume = abs(np.linalg.det(a))
    return np.array([volume / np.linalg.norm(np.cross(a[(i + 1) % 3], a[(i + 2) % 3])) for i in range(3)])


def _as_nm(vectors) -> np.ndarray:
    try:
        from openmm import unit

        if unit.is_quantity(vectors):
            vectors = vectors.value_in_unit(unit.nanometer)
    except ImportError:
        pass
    return np.array([[float(x) for x in v] for v in vectors])


def atomic_numbers_of(topology, atoms: Optional[Sequence[int]]) -> List[int]:
    all_atoms = list(topology.atoms())
    chosen = all_atoms if atoms is None else [all_atoms[i] for i in atoms]
    numbers = []
    for atom in chosen:
        if atom.element is None:
            raise ValueError(f"topology atom {atom.index} ({atom.name}) has no element; TransIP needs elements")
        numbers.append(atom.element.atomic_number)
    return numbers


def load_openmm_torch_kernels() -> None:
    """openmm-torch's kernel plugin needs libtorch's CUDA runtime libraries, which are only findable once torch
    is loaded. When OpenMM was imported before torch (e.g. `from openmmml import MLPotential` first), its
    plugin scan failed on them and Contexts would fail with "No Platform supports all the requested kernels":
    load those plugins again now that torch is here."""
    import re

    import openmm

    for failure in openmm.Platform.getPluginLoadFailures():
        match = re.match(r"Error loading library (\S+libOpenMMTorch\w*\.so):", failure)
        if match and "OpenCL" not in match.group(1):
            try:
                openmm.Platform.loadPluginLibrary(match.group(1))
            except Exception:  # a platform this machine cannot run (CUDA without a GPU): nothing to do
                pass


def _release(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def serialization_problem(openmm_version: Optional[str] = None, openmmtorch_version: Optional[str] = None
                          ) -> Optional[str]:
    """Why a System holding a TorchForce cannot be saved with the installed openmm and openmmtorch, or None.

    openmmtorch 1.5 (the newest on PyPI) was compiled against OpenMM 8.5's SerializationNode. OpenMM 8.6 changed
    that class (properties kept in one string, getStringProperty returning by value), so with openmm >= 8.6 its
    TorchForceProxy::deserialize reads garbage and the process dies with a segmentation fault: XmlSerializer
    .deserialize, copy.deepcopy(system), pickle, openmm-ml's interpolate=True. Nothing can catch that crash, so
    it is detected from the versions. Defaults: the installed versions."""
    if openmm_version is None:
        import openmm

        openmm_version = openmm.__version__
    if openmmtorch_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            openmmtorch_version = version("openmmtorch")
        except PackageNotFoundError:
            return None
    if _release(openmm_version) >= (8, 6) and _release(openmmtorch_version) <= (1, 5):
        return (f"openmm {openmm_version} with openmmtorch {openmmtorch_version}: a System holding a TorchForce "
                "cannot be saved or copied (XmlSerializer.deserialize, copy.deepcopy and pickle end in a "
                "segmentation fault, because openmmtorch was built against OpenMM 8.5). Install the pinned set, "
                "`pip install openmm==8.5.2 openmmml==1.7` (constraints.txt), or save State checkpoints instead of "
                "Systems (docs/openmm.md, 'Saving Systems')")
    return None


_serialization_warned = False


def create_force(artifact, topology=None, numbers: Optional[Iterable[int]] = None, charge: int = 0, spin: int = 1,
                 atoms: Optional[Sequence[int]] = None, periodic: Optional[bool] = None, box_vectors=None,
                 num_particles: Optional[int] = None, allow_untrained: bool = False):
    """Build an `openmmtorch.TorchForce` from an exported artifact (`transip export`).

    topology / numbers: the system's atoms (an OpenMM Topology, or atomic numbers of the ML particles).
    charge, spin: total charge and spin multiplicity of the ML region.
    atoms: indices of the ML particles in the System (ML/MM); None means all particles.
    periodic: default, whether the topology has box vectors. box_vectors (nm): checked against the model's
    cutoff when given (or taken from the topology).
    num_particles: the System's particle count, checked against the topology when given.
    allow_untrained: run elements, a charge or a spin multiplicity outside the model's trained domain (the
    artifact's `trained_domain` metadata) with a warning instead of refusing them.
    """
    import openmmtorch

    global _serialization_warned
    load_openmm_torch_kernels()
    problem = serialization_problem()
    if problem and not _serialization_warned:  # running is fine; saving would crash, so say so once, up front
        _serialization_warned = True
        warnings.warn(problem, stacklevel=2)
    path = Path(artifact)
    module, metadata = load(path)
    if topology is None and numbers is None:
        raise ValueError("create_force needs a topology or the atomic numbers of the ML particles")
    if topology is not None:
        if num_particles is not None and topology.getNumAtoms() != num_particles:
            raise ValueError(f"the topology has {topology.getNumAtoms()} atoms but the System has {num_particles} "
                             "particles")
        if atoms is not None and any(not 0 <= i < topology.getNumAtoms() for i in atoms):
            raise ValueError(f"ML atom indices must lie in 0..{topology.getNumAtoms() - 1}")
        from_topology = atomic_numbers_of(topology, atoms)
        if numbers is not None and list(numbers) != from_topology:
            raise ValueError("the atomic numbers given do not match the topology's elements")
        numbers = from_topology
        if periodic is None:
            periodic = topology.getPeriodicBoxVectors() is not None
        if box_vectors is None and topology.getPeriodicBoxVectors() is not None:
            box_vectors = topology.getPeriodicBoxVectors()
    numbers = [int(z) for z in numbers]
    if atoms is not None and len(atoms) != len(numbers):
        raise ValueError(f"{len(atoms)} ML atom indices but {len(numbers)} atomic numbers")
    known = set(metadata["atomic_numbers"])
    for index, z in enumerate(numbers):
        if z not in known:
            from transip.elements import ELEMENT_SYMBOLS

            raise ValueError(f"element {ELEMENT_SYMBOLS[z] if 0 < z < len(ELEMENT_SYMBOLS) else z} (ML atom {index}) "
                             f"is not known to the model {path.name}, which knows {' '.join(metadata['elements'])}")
    limits = metadata["charge_spin"]
    if abs(int(charge)) > limits["max_abs_charge"] or not 1 <= int(spin) <= limits["max_multiplicity"]:
        raise ValueError(f"charge {charge} / spin multiplicity {spin} outside the model's range "
                         f"(|charge| <= {limits['max_abs_charge']}, multiplicity 1..{limits['max_multiplicity']})")
    # Inside the range the embeddings accept, but never seen in training: an arbitrary energy unless overridden.
    # Artifacts exported before the domain was recorded have no `trained_domain`: only the checks above apply.
    check_trained_domain(metadata.get("trained_domain"), numbers, int(charge), int(spin), allow_untrained,
                         where="openmm")
    periodic = bool(periodic)
    if periodic and box_vectors is not None:
        widths = box_widths(_as_nm(box_vectors)) * ANGSTROM_PER_NM
        if widths.min() < 2 * metadata["cutoff"]:
            raise ValueError(f"the periodic box is {widths.min():.2f} A thick, less than twice the model's cutoff "
                             f"({2 * metadata['cutoff']:.1f} A): enlarge the box")
    dtype = torch.float64 if metadata["dtype"] == "float64" else torch.float32
    wrapper = TransIPOpenMMModule(module, torch.tensor(numbers), None if atoms is None else torch.tensor(list(atoms)),
                                  charge, spin, periodic, dtype)
    force = openmmtorch.TorchForce(torch.jit.script(wrapper))
    force.setOutputsForces(True)
    force.setUsesPeriodicBoundaryConditions(periodic)
    return force


__all__ = ["create_force", "serialization_problem", "TransIPOpenMMModule", "ArtifactError", "KJ_PER_MOL_PER_EV",
           "ANGSTROM_PER_NM"]

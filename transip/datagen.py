"""Reference data: GFN2-xTB molecular dynamics of small organic molecules.

`transip data generate` embeds each molecule of a SMILES list in 3D with rdkit, runs Langevin MD with
GFN2-xTB (tblite through ASE) at several temperatures, and writes sampled frames (energy in eV, forces in
eV/Angstrom, total charge and spin multiplicity) to one extended XYZ file. Each (molecule, temperature)
pair is an independent task with its own seed, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from .files import write_atomically

# (name, SMILES). Charge comes from the formal charges, spin multiplicity from the radical electrons
# (high spin), both as rdkit perceives them. H C N O F S Cl only (Br comes with the drug-like molecules of
# the 'chemistry' recipe, transip/refdata.py).
MOLECULES: list[tuple[str, str]] = [
    # neutral closed shell
    ("water", "O"), ("ammonia", "N"), ("methane", "C"), ("methanol", "CO"), ("ethanol", "CCO"),
    ("formaldehyde", "C=O"), ("formic_acid", "OC=O"), ("acetic_acid", "CC(=O)O"), ("acetone", "CC(C)=O"),
    ("acetonitrile", "CC#N"), ("dimethyl_ether", "COC"), ("methylamine", "CN"), ("urea", "NC(N)=O"),
    ("glycine", "NCC(=O)O"), ("alanine", "CC(N)C(=O)O"), ("serine", "NC(CO)C(=O)O"),
    ("cysteine", "NC(CS)C(=O)O"), ("benzene", "c1ccccc1"), ("phenol", "Oc1ccccc1"), ("pyridine", "c1ccncc1"),
    ("toluene", "Cc1ccccc1"), ("aniline", "Nc1ccccc1"), ("imidazole", "c1cnc[nH]1"), ("furan", "c1ccoc1"),
    ("thiophene", "c1ccsc1"), ("thiazole", "c1cscn1"), ("methanethiol", "CS"), ("dmso", "CS(C)=O"),
    ("fluoromethane", "CF"), ("trifluoroethanol", "OCC(F)(F)F"), ("chloroform", "ClC(Cl)Cl"),
    ("dichloromethane", "ClCCl"), ("chlorobenzene", "Clc1ccccc1"), ("fluorobenzene", "Fc1ccccc1"),
    ("acetamide", "CC(N)=O"), ("n_methylacetamide", "CNC(C)=O"), ("paracetamol", "CC(=O)Nc1ccc(O)cc1"),
    ("aspirin", "CC(=O)Oc1ccccc1C(=O)O"), ("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C"), ("ethylene", "C=C"),
    ("cyclohexane", "C1CCCCC1"), ("nitromethane", "C[N+](=O)[O-]"), ("sulfanilamide", "Nc1ccc(cc1)S(N)(=O)=O"),
    ("glycine_zwitterion", "[NH3+]CC(=O)[O-]"), ("ethyl_chloride", "CCCl"), ("methyl_thioacetate", "CSC(C)=O"),
    # charged
    ("acetate", "CC(=O)[O-]"), ("methylammonium", "C[NH3+]"), ("ammonium", "[NH4+]"), ("hydronium", "[OH3+]"),
    ("guanidinium", "NC(N)=[NH2+]"), ("imidazolium", "c1c[nH+]c[nH]1"), ("phenolate", "[O-]c1ccccc1"),
    ("trifluoroacetate", "[O-]C(=O)C(F)(F)F"), ("methanesulfonate", "CS(=O)(=O)[O-]"), ("hydroxide", "[OH-]"),
    # open shell
    ("methyl_radical", "[CH3]"), ("hydroxyl_radical", "[OH]"), ("ethyl_radical", "C[CH2]"),
    ("methoxy_radical", "C[O]"), ("nitrogen_dioxide", "N(=O)[O]"), ("benzyl_radical", "[CH2]c1ccccc1"),
    ("phenoxyl_radical", "[O]c1ccccc1"), ("allyl_radical", "C=C[CH2]"), ("triplet_methylene", "[CH2]"),
]

ALLOWED_ELEMENTS = {"H", "C", "N", "O", "F", "S", "Cl", "Br"}


@dataclasses.dataclass(frozen=True)
class SamplingTask:
    name: str
    smiles: str
    temperature_k: float
    seed: int
    frames: int
    stride: int
    equilibration_steps: int
    timestep_fs: float


def embed_molecule(name: str, smiles: str, seed: int):
    """3D structure of a SMILES string with charge and spin multiplicity, as an ase.Atoms."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"molecule {name!r}: rdkit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    symbols = [atom.GetSymbol() for atom in mol.GetAtoms()]
    unknown = sorted(set(symbols) - ALLOWED_ELEMENTS)
    if unknown:
        raise ValueError(f"molecule {name!r}: elements {unknown} are outside {sorted(ALLOWED_ELEMENTS)}")
    if len(symbols) == 1:
        positions = np.zeros((1, 3))
    else:
        if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
            raise RuntimeError(f"molecule {name!r}: rdkit could not embed {smiles!r} in 3D")
        positions = mol.GetConformer().GetPositions()
    charge = Chem.GetFormalCharge(mol)
    multiplicity = sum(atom.GetNumRadicalElectrons() for atom in mol.GetAtoms()) + 1
    atoms = Atoms(symbols, positions=positions)
    atoms.info.update(name=name, charge=int(charge), spin=int(multiplicity))
    return atoms


def xtb_calculator(charge: int, multiplicity: int, **options):
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", charge=charge, multiplicity=multiplicity, verbosity=0, **options)


def labelled_snapshot(atoms, **info):
    """A copy of `atoms` (positions rounded to 1e-5 A in place first, so that the label belongs to exactly the
    stored geometry) with the xTB energy and forces of its calculator, forces rounded to 1e-5 eV/A (the file
    compresses ~2x better)."""
    import ase
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms.positions = np.round(atoms.positions, 5)
    energy, forces = float(atoms.get_potential_energy()), atoms.get_forces(apply_constraint=False)
    snap = ase.Atoms(atoms.numbers, positions=atoms.positions.copy(), cell=atoms.cell, pbc=atoms.pbc)
    snap.calc = SinglePointCalculator(snap, energy=energy, forces=np.round(forces, 5))
    snap.info.update(info)
    return snap


def sample_md(atoms, temperature_k: float, rng, frames: int, stride: int, equilibration_steps: int,
              timestep_fs: float, optimisation_steps: int = 200, fmax: float = 0.05, **info) -> list:
    """Relax `atoms` (with its xTB calculator) briefly, then Langevin MD; returns `frames` labelled snapshots
    taken every `stride` steps after `equilibration_steps`, each carrying `info`."""
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
    from ase.optimize import BFGS

    if len(atoms) > 1:
        if optimisation_steps:
            BFGS(atoms, logfile=None).run(fmax=fmax, steps=optimisation_steps)
        thermalize_momenta(atoms, temperature_k, rng=rng)
        Stationary(atoms)
        if not atoms.pbc.any():
            ZeroRotation(atoms)
    atoms.set_constraint(FixCom())
    dyn = Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_k,
                   friction=0.02 / units.fs, fixcm=False, rng=rng)
    dyn.run(equilibration_steps)
    snapshots = []
    for _ in range(frames):
        dyn.run(stride)
        snapshots.append(labelled_snapshot(atoms, temperature=temperature_k, **info))
    atoms.set_constraint()
    return snapshots


def run_task(task: SamplingTask) -> list:
    """Langevin MD with GFN2-xTB; returns `task.frames` labelled snapshots (ase.Atoms with a calculator)."""
    atoms = embed_molecule(task.name, task.smiles, task.seed)
    charge, spin = atoms.info["charge"], atoms.info["spin"]
    atoms.calc = xtb_calculator(charge, spin)
    return sample_md(atoms, task.temperature_k, np.random.default_rng(task.seed), task.frames, task.stride,
                     task.equilibration_steps, task.timestep_fs, name=task.name, charge=charge, spin=spin)


def make_tasks(molecules, temperatures, frames_per_task, stride, equilibration_steps, timestep_fs, seed):
    tasks = []
    for m, (name, smiles) in enumerate(molecules):
        for t, temperature in enumerate(temperatures):
            tasks.append(SamplingTask(name, smiles, float(temperature), seed + 1000 * m + t, frames_per_task,
                                      stride, equilibration_steps, timestep_fs))
    return tasks


def _run_task_single_thread(task: SamplingTask):
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return task, run_task(task), None
    except Exception as exc:  # one failed molecule must not lose the others; it is reported at the end
        return task, [], f"{type(exc).__name__}: {exc}"


def generate(output: Path, molecules=MOLECULES, temperatures=(300.0, 600.0, 900.0), frames_per_task=120,
             stride=10, equilibration_steps=200, timestep_fs=0.5, seed=0, workers=2) -> dict:
    """Generate the dataset into `output` (extended XYZ; `.xz`/`.gz` compress). Returns a summary dict.

    The file is written to a temporary name and renamed when complete, so an interrupted run never leaves
    a partial file that looks finished.
    """
    import multiprocessing as mp
    import time

    import ase.io
    from tqdm import tqdm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tasks = make_tasks(molecules, temperatures, frames_per_task, stride, equilibration_steps, timestep_fs, seed)
    results: dict[SamplingTask, list] = {}
    failures = []
    start = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by workers: one core each
    # spawn, not fork: a process forked after OpenMP started (torch, tblite) can deadlock in the child.
    with mp.get_context("spawn").Pool(workers) as pool:
        for task, frames, error in tqdm(pool.imap_unordered(_run_task_single_thread, tasks), total=len(tasks),
                                        desc="xTB MD", unit="task"):
            results[task] = frames
            if error:
                failures.append(f"{task.name} at {task.temperature_k:.0f} K: {error}")
    ordered = [frame for task in tasks for frame in results[task]]  # deterministic order
    if not ordered:
        raise RuntimeError("data generation produced no frames:\n" + "\n".join(failures))
    write_atomically(output, lambda tmp: ase.io.write(tmp, ordered, format="extxyz"))
    return {"frames": len(ordered), "molecules": len({f.info["name"] for f in ordered}),
            "tasks": len(tasks), "failures": failures, "seconds": time.perf_counter() - start,
            "bytes": output.stat().st_size, "single_points": len(tasks) * (equilibration_steps +
                                                                         frames_per_task * stride)}


def read_smiles_file(path) -> list[tuple[str, str]]:
    """Lines 'name SMILES' ('#' starts a comment)."""
    molecules = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'name SMILES', got {line!r}")
        molecules.append((parts[0], parts[1]))
    if not molecules:
        raise ValueError(f"{path}: no molecules")
    return molecules

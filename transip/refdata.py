"""Reference data for the chemistry a user brings (`transip data generate --recipe chemistry`).

What it makes, all labelled with GFN2-xTB (tblite through ASE):

- drug-like molecules sampled from the MOSES benchmark set (ZINC, H C N O F S Cl Br), each embedded by rdkit,
  relaxed briefly and sampled by Langevin MD at 300-600 K;
- charged and open-shell variants of the same molecules: a protonated amine (+1), a deprotonated acid, phenol
  or N-H (-1) and a radical with one hydrogen removed (multiplicity 2);
- clusters of 2-8 small solvent molecules, alone or around a drug-like molecule, sampled by MD in vacuum, so
  that hydrogen bonds, stacking and close intermolecular approaches are seen;
- the repulsive wall: bonds compressed and molecules pushed into each other (down to 0.5 A for pairs with H
  and 0.8 A between heavy atoms), as single points;
- held-out sets: molecules of MOSES's own `test_scaffolds` split (their Bemis-Murcko scaffolds never occur in
  training), whole clusters, and a few periodic boxes (water, methanol, a drug-like molecule in water)
  labelled with periodic GFN2-xTB, for evaluation only.

Work is planned up front as independent tasks (deterministic for a seed) and run in shards: each shard is
written to a temporary name and renamed when complete, with a small JSON summary beside it, so an interrupted
run resumes from the shards it finished and a half-written shard is never read.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from .datagen import ALLOWED_ELEMENTS, MOLECULES, embed_molecule, labelled_snapshot, xtb_calculator
from .files import write_atomically

MOSES_PACKAGE = "molsets"  # PyPI package that ships the MOSES data files (install with --no-deps)
MOSES_FILES = {"train": "train.csv.gz", "test_scaffolds": "test_scaffolds.csv.gz"}

# Small solvents for clusters and boxes (name, SMILES); water is drawn more often than the others.
SOLVENTS: list[tuple[str, str]] = [
    ("water", "O"), ("methanol", "CO"), ("ethanol", "CCO"), ("acetonitrile", "CC#N"), ("acetone", "CC(C)=O"),
    ("ammonia", "N"), ("dmso", "CS(C)=O"), ("formamide", "NC=O"), ("benzene", "c1ccccc1"),
    ("pyridine", "c1ccncc1"), ("phenol", "Oc1ccccc1"), ("acetic_acid", "CC(=O)O"),
]
SOLVENT_WEIGHTS = np.array([6, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=float)

# Closest approach sampled for the repulsive wall (Angstrom): pairs with hydrogen, pairs of heavy atoms.
WALL_MIN_DISTANCE = {"H": 0.5, "heavy": 0.8}

SPLITS_HELD_OUT = ("test_scaffolds", "test_clusters", "condensed")

# rdkit SMARTS for the charged variants, tried in order (first match wins).
PROTONATION_SITES = [
    "[NX3;H2,H1,H0;+0;!$(N-[a]);!$(N-C=[O,S,N]);!$(N-S(=O)=O);!$(N-[N,O]);!$(N-C#N)]",  # aliphatic amine
    "[nX2;+0;r6]",  # pyridine-like aromatic nitrogen
    "[NX2;+0;$(N=C(-N)-N)]",  # amidine / guanidine imine
    "[nX2;+0]",  # imidazole-like aromatic nitrogen
]
DEPROTONATION_SITES = [
    "[OX2H1;$(O-C=O)]",  # carboxylic acid
    "[NX3H1,NX3H2;$(N-S(=O)=O)]",  # sulfonamide N-H
    "[OX2H1;$(O-c)]",  # phenol
    "[nH1]",  # aromatic N-H (indole, imidazole, ...)
    "[NX3H1,NX3H2;$(N-C=O)]",  # amide N-H
]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Sizes and sampling settings. The defaults take about two hours on two cores."""

    moses_train: int = 1200  # drug-like molecules for training (neutral)
    moses_test: int = 150  # drug-like molecules from held-out scaffolds
    protonated: int = 300  # cations (+1) drawn from the training molecules
    deprotonated: int = 300  # anions (-1)
    radicals: int = 300  # doublets (one hydrogen removed)
    small_molecules: bool = True  # keep the original 65 small molecules (one MD task each)
    clusters: int = 400
    cluster_test_fraction: float = 0.1  # whole clusters held out
    boxes_per_kind: int = 2  # periodic validation boxes of each kind (water, methanol, drug in water)
    box_waters: int = 24
    box_methanols: int = 12
    box_solvating_waters: int = 20  # around one held-out-scaffold molecule
    wall_per_task: int = 2  # compressed configurations derived from each molecule or cluster task
    temperature_range: tuple = (300.0, 600.0)
    optimisation_steps: int = 40
    equilibration_steps: int = 20
    frames_per_task: int = 5
    stride: int = 20
    box_frames: int = 3
    # Periodic boxes for training (the recipe `condensed`: a dataset of these alone, trained on beside this one
    # through TrainConfig.extra_data): liquids of the solvents and training-split drug-like molecules in water.
    train_boxes: int = 0
    train_box_molecules: tuple = (12, 24)  # solvent molecules per box, drawn in this range
    train_box_frames: int = 6
    train_box_stride: int = 10
    train_box_temperature_range: tuple = (280.0, 420.0)  # the liquid range: no boiling boxes at fixed density
    timestep_fs: float = 0.5
    max_heavy_atoms: int = 30
    shard_size: int = 25
    seed: int = 0

    @classmethod
    def condensed(cls, boxes: int, **overrides) -> "Recipe":
        """A dataset of `boxes` periodic training boxes and nothing else."""
        nothing = dict(moses_train=0, moses_test=0, protonated=0, deprotonated=0, radicals=0, small_molecules=False,
                       clusters=0, boxes_per_kind=0)
        return cls(**{**nothing, "train_boxes": boxes, **overrides})

    @classmethod
    def scaled(cls, scale: float, **overrides) -> "Recipe":
        """The default recipe with every count multiplied by `scale` (at least 1 of each kind)."""
        base = cls(**overrides)
        counts = ("moses_train", "moses_test", "protonated", "deprotonated", "radicals", "clusters")
        return dataclasses.replace(base, **{k: max(1, int(round(getattr(base, k) * scale))) for k in counts},
                                   boxes_per_kind=max(1, int(round(base.boxes_per_kind * min(scale, 1.0)))))


@dataclasses.dataclass(frozen=True)
class Task:
    """One independent unit of work. `smiles` holds one molecule, or the members of a cluster or box."""

    kind: str  # molecule | cluster | box
    key: str  # identity of the molecule, cluster or box (frames of one key never straddle held-out splits)
    split: str  # train | test_scaffolds | test_clusters | condensed
    smiles: tuple
    variant: str  # neutral | protonated | deprotonated | radical | small | solvent | solvated | water | ...
    temperature: float
    seed: int


# ----------------------------------------------------------------------------------------------- sources
def moses_data_dir() -> Path:
    """Folder of the MOSES data files inside the installed `molsets` wheel, found without importing it (its
    own dependencies pin an old pomegranate that may not build)."""
    spec = importlib.util.find_spec("moses")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset" / "data" if spec else None
    if folder is None or not (folder / MOSES_FILES["train"]).exists():
        raise FileNotFoundError("the MOSES data files were not found: install them with "
                                f"`pip install --no-deps {MOSES_PACKAGE}` (run.sh setup does)")
    return folder


def read_moses(split: str) -> list[str]:
    with gzip.open(moses_data_dir() / MOSES_FILES[split], "rt") as f:
        lines = f.read().split()
    return [s for s in lines[1:] if s]  # first line is the header "SMILES"


def murcko_scaffold(smiles: str) -> str:
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    mol = Chem.MolFromSmiles(smiles)
    return "" if mol is None else MurckoScaffold.MurckoScaffoldSmiles(mol=mol)


# ----------------------------------------------------------------------------------------------- variants
def _edit_hydrogens(smiles: str, patterns: list[str], charge_change: int, rng) -> Optional[str]:
    """Add (charge_change=+1) or remove (-1) a proton at the first site matching `patterns`, or None."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    for pattern in patterns:
        matches = mol.GetSubstructMatches(Chem.MolFromSmarts(pattern))
        if not matches:
            continue
        atom = mol.GetAtomWithIdx(matches[int(rng.integers(len(matches)))][0])
        atom.SetFormalCharge(atom.GetFormalCharge() + charge_change)
        atom.SetNumExplicitHs(atom.GetTotalNumHs() + charge_change)
        atom.SetNoImplicit(True)
        try:
            Chem.SanitizeMol(mol)
        except Exception:
            return None
        return Chem.MolToSmiles(mol)
    return None


def protonated(smiles: str, rng) -> Optional[str]:
    return _edit_hydrogens(smiles, PROTONATION_SITES, +1, rng)


def deprotonated(smiles: str, rng) -> Optional[str]:
    return _edit_hydrogens(smiles, DEPROTONATION_SITES, -1, rng)


def radical(smiles: str, rng) -> Optional[str]:
    """One hydrogen removed from a random heavy atom that carries one (carbon preferred): a doublet."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    sites = [a.GetIdx() for a in mol.GetAtoms() if a.GetTotalNumHs() > 0]
    carbons = [i for i in sites if mol.GetAtomWithIdx(i).GetSymbol() == "C"]
    sites = carbons or sites
    if not sites:
        return None
    atom = mol.GetAtomWithIdx(sites[int(rng.integers(len(sites)))])
    atom.SetNumExplicitHs(atom.GetTotalNumHs() - 1)
    atom.SetNoImplicit(True)
    atom.SetNumRadicalElectrons(atom.GetNumRadicalElectrons() + 1)
    try:
        Chem.SanitizeMol(mol)
    except Exception:
        return None
    return Chem.MolToSmiles(mol)


def _usable(smiles: str, max_heavy_atoms: int) -> bool:
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumHeavyAtoms() > max_heavy_atoms:
        return False
    return {a.GetSymbol() for a in mol.GetAtoms()} <= ALLOWED_ELEMENTS


# ----------------------------------------------------------------------------------------------- planning
def plan(recipe: Recipe) -> tuple[list[Task], dict]:
    """Every task of the dataset, in a deterministic shuffled order (so each shard mixes kinds), and a record
    of the sources (what was sampled from where, with which seed)."""
    rng = np.random.default_rng(recipe.seed)
    low, high = recipe.temperature_range

    def temperature():
        return float(np.round(rng.uniform(low, high), 1))

    test_pool, train_pool = read_moses("test_scaffolds"), read_moses("train")
    test = _sample(test_pool, recipe.moses_test, recipe.max_heavy_atoms, rng)
    held_scaffolds = {murcko_scaffold(s) for s in test}
    train = [s for s in _sample(train_pool, recipe.moses_train + 50, recipe.max_heavy_atoms, rng)
             if murcko_scaffold(s) not in held_scaffolds][:recipe.moses_train]
    tasks: list[Task] = []

    def add(kind, key, split, smiles, variant):
        tasks.append(Task(kind, key, split, tuple(smiles), variant, temperature(), int(rng.integers(2**31))))

    for i, s in enumerate(train):
        add("molecule", f"moses_train_{i:05d}", "train", [s], "neutral")
    for i, s in enumerate(test):
        add("molecule", f"moses_test_{i:05d}", "test_scaffolds", [s], "neutral")
    for variant, maker, count in (("protonated", protonated, recipe.protonated),
                                  ("deprotonated", deprotonated, recipe.deprotonated),
                                  ("radical", radical, recipe.radicals)):
        made = 0
        for i in rng.permutation(len(train)):
            if made == count:
                break
            edited = maker(train[i], rng)
            if edited is not None:
                add("molecule", f"moses_train_{i:05d}_{variant}", "train", [edited], variant)
                made += 1
    if recipe.small_molecules:
        for name, s in MOLECULES:
            add("molecule", name, "train", [s], "small")
    solvent_p = SOLVENT_WEIGHTS / SOLVENT_WEIGHTS.sum()
    held_clusters = set(rng.permutation(recipe.clusters)[:int(round(recipe.cluster_test_fraction * recipe.clusters))]
                        .tolist())
    for c in range(recipe.clusters):
        solvated = c % 3 == 2  # one cluster in three is a drug-like molecule with a few solvent molecules
        count = int(rng.integers(2, 7)) if solvated else int(rng.integers(2, 9))
        members = [SOLVENTS[j][1] for j in rng.choice(len(SOLVENTS), count, p=solvent_p)]
        if solvated:
            members = [train[int(rng.integers(len(train)))], *members[:count - 1]]
        add("cluster", f"cluster_{c:05d}", "test_clusters" if c in held_clusters else "train", members,
            "solvated" if solvated else "solvent")
    for b in range(recipe.boxes_per_kind):
        add("box", f"box_water_{b}", "condensed", ["O"] * recipe.box_waters, "water")
        add("box", f"box_methanol_{b}", "condensed", ["CO"] * recipe.box_methanols, "methanol")
        add("box", f"box_solvated_{b}", "condensed", [_smallest(test, rng)] + ["O"] * recipe.box_solvating_waters,
            "solvated")
    order = rng.permutation(len(tasks))
    tasks = [tasks[i] for i in order] + training_boxes(recipe, train_pool)
    sources = {"moses": {"package": MOSES_PACKAGE, "version": _installed_version(MOSES_PACKAGE), "files": MOSES_FILES, "train_pool": len(train_pool),
                         "test_scaffolds_pool": len(test_pool), "sampled_train": len(train),
                         "sampled_test_scaffolds": len(test), "seed": recipe.seed},
               "small_molecules": len(MOLECULES) if recipe.small_molecules else 0,
               "solvents": [name for name, _ in SOLVENTS]}
    if recipe.train_boxes:
        sources["training_boxes"] = {"count": recipe.train_boxes, "molecules_from": "moses train pool"}
    return tasks, sources


def training_boxes(recipe: Recipe, train_pool: list[str]) -> list[Task]:
    """The periodic training boxes, from their own random stream (so that they leave the rest of the plan as it
    is): in turn a water box, a box of one solvent of the list, a water-solvent mixture and a drug-like molecule
    of the MOSES training pool (scaffolds disjoint from the held-out ones) in water."""
    from rdkit import Chem

    if not recipe.train_boxes:
        return []
    rng = np.random.default_rng([recipe.seed, 1])
    low, high = recipe.train_box_temperature_range
    solutes = _sample(train_pool, recipe.train_boxes // 4 + 1, min(recipe.max_heavy_atoms, 12), rng)
    solvent_p = SOLVENT_WEIGHTS[1:] / SOLVENT_WEIGHTS[1:].sum()  # the solvents other than water
    tasks = []
    for b in range(recipe.train_boxes):
        count = int(rng.integers(recipe.train_box_molecules[0], recipe.train_box_molecules[1] + 1))
        other = SOLVENTS[1 + int(rng.choice(len(SOLVENTS) - 1, p=solvent_p))][1]
        # Every box holds about as many atoms as `count` waters: xTB's cost grows steeply with atoms.
        other_atoms = Chem.AddHs(Chem.MolFromSmiles(other)).GetNumAtoms()
        kind = ("water", "solvent", "mixture", "solvated")[b % 4]
        if kind == "water":
            members = ["O"] * count
        elif kind == "solvent":
            members = [other] * max(3, round(3 * count / other_atoms))
        elif kind == "mixture":
            members = ["O"] * (count - count // 3) + [other] * max(1, round(count / other_atoms))
        else:
            members = [solutes[b // 4 % len(solutes)]] + ["O"] * count
        tasks.append(Task("box", f"train_box_{b:04d}_{kind}", "train", tuple(members), kind,
                          float(np.round(rng.uniform(low, high), 1)), int(rng.integers(2**31))))
    return tasks


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _sample(pool: list[str], count: int, max_heavy_atoms: int, rng) -> list[str]:
    chosen = []
    for i in rng.permutation(len(pool)):
        if len(chosen) == count:
            break
        if _usable(pool[i], max_heavy_atoms):
            chosen.append(pool[i])
    return chosen


def _smallest(smiles: list[str], rng) -> str:
    """A small molecule of the list (a random one of the smallest fifth): boxes stay affordable."""
    from rdkit import Chem

    sizes = sorted(smiles, key=lambda s: Chem.MolFromSmiles(s).GetNumHeavyAtoms())
    return sizes[int(rng.integers(max(1, len(sizes) // 5)))]


# ----------------------------------------------------------------------------------------------- building
def random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a*a + b*b - c*c - d*d, 2*(b*c - a*d), 2*(b*d + a*c)],
                     [2*(b*c + a*d), a*a - b*b + c*c - d*d, 2*(c*d - a*b)],
                     [2*(b*d - a*c), 2*(c*d + a*b), a*a - b*b - c*c + d*d]])


def _embedded(task: Task, index: int, smiles: str):
    atoms = embed_molecule(f"{task.key}[{index}]", smiles, task.seed + index)
    atoms.positions -= atoms.positions.mean(axis=0)
    return atoms


def build_cluster(task: Task, rng):
    """Members placed one by one in random orientations, each slid towards the cluster along a random direction
    until its closest contact is 1.7-2.6 A: hydrogen-bond and stacking distances, varied."""
    from ase import Atoms

    cluster = _embedded(task, 0, task.smiles[0])
    for index, smiles in enumerate(task.smiles[1:], start=1):
        member = _embedded(task, index, smiles)
        member.positions = member.positions @ random_rotation(rng).T
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        contact = rng.uniform(1.7, 2.6)
        centre = cluster.positions.mean(axis=0)
        low, high = 0.0, 30.0  # bisection on the distance of the member's centre from the cluster's
        for _ in range(40):
            mid = 0.5 * (low + high)
            gap = _closest(cluster.positions, member.positions + centre + mid * direction)
            low, high = (mid, high) if gap < contact else (low, mid)
        member.positions += centre + high * direction
        cluster = Atoms(list(cluster.numbers) + list(member.numbers),
                        positions=np.vstack([cluster.positions, member.positions]),
                        info={**cluster.info, "charge": cluster.info["charge"] + member.info["charge"]})
    cluster.info.update(spin=1, members=len(task.smiles))
    return cluster


def build_box(task: Task, rng, density_g_cm3: float = 0.95, min_distance: float = 1.7):
    """Members packed at random in a cubic periodic cell at about liquid density, no two atoms of different
    molecules closer than `min_distance` (minimum image); the cell grows 3 % whenever packing gets stuck."""
    from ase import Atoms

    members = [_embedded(task, i, s) for i, s in enumerate(task.smiles)]
    mass = sum(m.get_masses().sum() for m in members)
    length = (mass / 0.602214 / density_g_cm3) ** (1 / 3)
    while True:
        placed: list[np.ndarray] = []
        for member in members:
            for _ in range(2000):
                trial = member.positions @ random_rotation(rng).T + rng.uniform(0, length, 3)
                if not placed or _closest(np.vstack(placed), trial, length) >= min_distance:
                    placed.append(trial)
                    break
            else:
                break
        if len(placed) == len(members):
            break
        length *= 1.03
    numbers = [z for m in members for z in m.numbers]
    box = Atoms(numbers, positions=np.vstack(placed), cell=[length] * 3, pbc=True)
    box.wrap()
    box.info.update(charge=sum(m.info["charge"] for m in members), spin=1, members=len(members))
    return box


def packed_box(smiles: list[str], seed: int, density_g_cm3: float = 0.95, min_distance: float = 1.7):
    """A periodic box of the molecules `smiles` (one entry per molecule), packed as the dataset's condensed-
    phase boxes are (`build_box`): what the examples, the stability check and the benchmarks run."""
    task = Task("box", "packed", "", tuple(smiles), "", 300.0, seed)
    return build_box(task, np.random.default_rng(seed), density_g_cm3, min_distance)


def _closest(a: np.ndarray, b: np.ndarray, box_length: Optional[float] = None) -> float:
    d = a[:, None, :] - b[None, :, :]
    if box_length is not None:
        d -= box_length * np.round(d / box_length)
    return float(np.sqrt((d ** 2).sum(-1)).min())


def molecules_of(atoms) -> np.ndarray:
    """Fragment index of every atom (covalent bonds from ase's natural cutoffs)."""
    from ase.neighborlist import NeighborList, natural_cutoffs

    nl = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=True)
    nl.update(atoms)
    fragment = -np.ones(len(atoms), dtype=int)
    for start in range(len(atoms)):
        if fragment[start] >= 0:
            continue
        fragment[start] = fragment.max() + 1
        stack = [start]
        while stack:
            i = stack.pop()
            for j in nl.get_neighbors(i)[0]:
                if fragment[j] < 0:
                    fragment[j] = fragment[start]
                    stack.append(j)
    return fragment


def _bonds(atoms) -> list[tuple[int, int]]:
    from ase.neighborlist import NeighborList, natural_cutoffs

    nl = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=False)
    nl.update(atoms)
    return [(i, int(j)) for i in range(len(atoms)) for j in nl.get_neighbors(i)[0]]


def _wall_distance(atoms, i: int, j: int, current: float, rng) -> float:
    has_h = 1 in (atoms.numbers[i], atoms.numbers[j])
    low = WALL_MIN_DISTANCE["H" if has_h else "heavy"]
    return float(rng.uniform(low, max(low + 0.05, 0.85 * current)))


def wall_configurations(atoms, count: int, rng) -> list:
    """`count` copies of `atoms` pushed onto the repulsive wall: a covalent bond compressed (both atoms moved
    along it), or, where there are several molecules, one molecule slid onto another along their closest
    contact."""
    fragment = molecules_of(atoms)
    bonds = _bonds(atoms)
    configurations = []
    for n in range(count):
        pushed = atoms.copy()
        if fragment.max() > 0 and n % 2 == 0:  # intermolecular
            a, b = rng.choice(fragment.max() + 1, 2, replace=False)
            ia, ib = np.flatnonzero(fragment == a), np.flatnonzero(fragment == b)
            d = np.linalg.norm(atoms.positions[ia][:, None] - atoms.positions[ib][None], axis=-1)
            k, m = np.unravel_index(np.argmin(d), d.shape)
            i, j = ia[k], ib[m]
            axis = atoms.positions[j] - atoms.positions[i]
            current = np.linalg.norm(axis)
            target = _wall_distance(atoms, i, j, current, rng)
            pushed.positions[ib] -= (current - target) * axis / current
        elif bonds:
            i, j = bonds[int(rng.integers(len(bonds)))]
            axis = atoms.positions[j] - atoms.positions[i]
            current = np.linalg.norm(axis)
            target = _wall_distance(atoms, i, j, current, rng)
            pushed.positions[i] += 0.5 * (current - target) * axis / current
            pushed.positions[j] -= 0.5 * (current - target) * axis / current
        else:
            continue
        configurations.append(pushed)
    return configurations


# ----------------------------------------------------------------------------------------------- running
def classify_failure(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".lower()
    if "cannot parse smiles" in text:
        return "invalid SMILES"
    if "could not embed" in text:
        return "embedding failed"
    if "converge" in text or "scf" in text:
        return "xTB did not converge"
    if "elements" in text and "outside" in text:
        return "element outside the recipe"
    return type(exc).__name__


def run_chemistry_task(task: Task, recipe: Recipe) -> tuple[list, list[str]]:
    """Labelled frames of one task and the reasons of any parts that failed (a failure of the whole task
    raises)."""
    from .datagen import sample_md

    rng = np.random.default_rng(task.seed)
    if task.kind == "molecule":
        atoms = embed_molecule(task.key, task.smiles[0], task.seed)
    elif task.kind == "cluster":
        atoms = build_cluster(task, rng)
    else:
        atoms = build_box(task, rng)
    charge, spin = int(atoms.info["charge"]), int(atoms.info["spin"])
    info = dict(name=task.key, charge=charge, spin=spin, kind=task.kind, split=task.split, variant=task.variant)
    atoms.info = {}
    atoms.calc = xtb_calculator(charge, spin)
    if task.kind == "box" and task.split == "train":
        return sample_md(atoms, task.temperature, rng, recipe.train_box_frames, recipe.train_box_stride,
                         recipe.equilibration_steps, recipe.timestep_fs,
                         optimisation_steps=recipe.optimisation_steps // 4, fmax=0.2, **info), []
    if task.kind == "box":
        frames = sample_md(atoms, task.temperature, rng, recipe.box_frames, 5, 0, recipe.timestep_fs,
                           optimisation_steps=recipe.optimisation_steps // 4, fmax=0.2, **info)
        return frames, []
    frames = sample_md(atoms, task.temperature, rng, recipe.frames_per_task, recipe.stride,
                       recipe.equilibration_steps, recipe.timestep_fs,
                       optimisation_steps=recipe.optimisation_steps, fmax=0.1, **info)
    failures = []
    for pushed in wall_configurations(frames[-1], recipe.wall_per_task, rng):
        pushed.calc = xtb_calculator(charge, spin)
        try:
            frames.append(labelled_snapshot(pushed, **{**info, "kind": "wall", "temperature": 0.0}))
        except Exception as exc:  # a wall point xTB cannot converge is skipped and counted
            failures.append(classify_failure(exc) + " (wall)")
    return frames, failures


def _run_one(job):
    os.environ["OMP_NUM_THREADS"] = "1"
    index, task, recipe = job
    start = time.perf_counter()
    try:
        frames, failures = run_chemistry_task(task, recipe)
    except Exception as exc:  # one failed task must not lose the others; counted in the summary
        frames, failures = [], [classify_failure(exc)]
    return index, frames, failures, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- shards
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".extxyz.xz"


def shard_path(folder: Path, index: int) -> Path:
    return folder / "shards" / f"shard-{index:05d}{SHARD_SUFFIX}"


def _write_json(path: Path, value) -> None:
    write_atomically(path, lambda p: p.write_text(json.dumps(value, indent=1) + "\n"))


def completed_shards(folder: Path) -> dict[int, dict]:
    """Summaries of the shards whose frames are complete (the summary is written after the frames)."""
    done = {}
    for summary in sorted((folder / "shards").glob("shard-*.json")):
        index = int(summary.stem.split("-")[1])
        if shard_path(folder, index).exists():
            done[index] = json.loads(summary.read_text())
    return done


def same_recipe(recorded: dict, recipe: Recipe) -> bool:
    """Whether a manifest's recipe is `recipe`; a manifest written before a recipe field existed has that
    field's default (so older datasets still resume)."""
    as_json = lambda fields: json.loads(json.dumps(fields))  # noqa: E731 (tuples become lists, as stored)
    return {**as_json(dataclasses.asdict(Recipe())), **recorded} == as_json(dataclasses.asdict(recipe))


def generate(folder, recipe: Recipe = Recipe(), workers: int = 2, command: str = "", progress: bool = True,
             max_seconds: Optional[float] = None) -> dict:
    """Generate (or resume) the dataset in `folder`; returns the summary also written to its manifest.

    `max_seconds` stops cleanly after the shard that crosses it (the next call resumes)."""
    import multiprocessing as mp

    import ase.io
    from tqdm import tqdm

    folder = Path(folder)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    recipe_fields = dataclasses.asdict(recipe)
    if manifest and not same_recipe(manifest["recipe"], recipe):
        raise ValueError(f"{folder} holds a dataset started with another recipe ({manifest['recipe']}); "
                         "resume it with the same options or generate into a new folder")
    tasks, sources = plan(recipe)
    if manifest is None:
        manifest = {"format": "transip-shards-1", "recipe": recipe_fields, "sources": sources,
                    "command": command, "runs": []}
        _write_json(manifest_path, manifest)
    shards = [list(range(i, min(i + recipe.shard_size, len(tasks)))) for i in range(0, len(tasks), recipe.shard_size)]
    done = completed_shards(folder)
    pending = [i for s, members in enumerate(shards) if s not in done for i in members]
    shard_of = {i: s for s, members in enumerate(shards) for i in members}
    buffered: dict[int, list] = {}
    start, written = time.time(), 0
    # The run is recorded now and its time after every shard, so a run stopped from outside keeps its time.
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)), "seconds": 0.0, "workers": workers,
           "shards_written": 0}
    manifest["runs"].append(run)
    _write_json(manifest_path, manifest)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by workers: one core each
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc="xTB reference data", unit="task",
               disable=not progress, smoothing=0.05)
    # spawn, not fork: a process forked after OpenMP started (torch, tblite) can deadlock in the child.
    with mp.get_context("spawn").Pool(workers) as pool:
        for index, frames, failures, seconds in pool.imap(_run_one, [(i, tasks[i], recipe) for i in pending]):
            bar.update(1)
            s = shard_of[index]
            buffered.setdefault(s, []).append((index, frames, failures, seconds))
            if len(buffered[s]) < len(shards[s]):
                continue
            results = sorted(buffered.pop(s), key=lambda r: r[0])
            frames = [f for r in results for f in r[1]]
            if frames:
                write_atomically(shard_path(folder, s), lambda p: ase.io.write(p, frames, format="extxyz"))
            else:  # an empty shard is complete too; it holds no frames
                write_atomically(shard_path(folder, s), lambda p: p.write_bytes(b""))
            _write_json(shard_path(folder, s).with_name(f"shard-{s:05d}.json"),
                        {"tasks": [tasks[r[0]].key for r in results], "frames": len(frames),
                         "failures": [f"{tasks[r[0]].key}: {reason}" for r in results for reason in r[2]],
                         "task_seconds": sum(r[3] for r in results),
                         "seconds_by_task": {tasks[r[0]].key: round(r[3], 2) for r in results}})
            written += 1
            run.update(seconds=round(time.time() - start, 1), shards_written=written)
            _write_json(manifest_path, manifest)
            if max_seconds is not None and time.time() - start > max_seconds:
                pool.terminate()
                break
    bar.close()
    manifest["sources"] = sources  # the same plan; a later version of this code may record more about it
    run.update(seconds=round(time.time() - start, 1), shards_written=written)
    summary = summarize(folder, tasks, shards, manifest)
    manifest["summary"] = summary
    _write_json(manifest_path, manifest)
    write_data_card(folder, manifest)
    return summary


def summarize(folder: Path, tasks: list[Task], shards: list[list[int]], manifest: dict) -> dict:
    done = completed_shards(folder)
    finished = [tasks[i] for s in done for i in shards[s]]
    failures = [f for d in done.values() for f in d["failures"]]
    reasons = Counter(f.split(": ", 1)[1] for f in failures)
    counts = composition(read_shards(folder)) if done else {}
    return {"complete": len(done) == len(shards), "shards": f"{len(done)}/{len(shards)}",
            "tasks": f"{len(finished)}/{len(tasks)}", "tasks_by_kind": dict(Counter(t.kind for t in finished)),
            "failures": dict(reasons), "failed_parts": len(failures),
            "generation_seconds": round(sum(r["seconds"] for r in manifest["runs"]), 1),
            "task_core_seconds": round(sum(d["task_seconds"] for d in done.values()), 1), **counts}


def read_shards(folder) -> list:
    """Every frame of the complete shards of a dataset folder, in shard order (ase.Atoms)."""
    from .data import _read_extxyz

    frames = []
    for index in sorted(completed_shards(Path(folder))):
        path = shard_path(Path(folder), index)
        if path.stat().st_size:
            frames += _read_extxyz(path, ":")
    return frames


def composition(frames) -> dict:
    """Counts a user wants to see: frames per kind and split, molecules, clusters, charges, spins, elements and
    atoms per structure."""
    from ase.data import chemical_symbols

    info = [f.info for f in frames]
    atoms = np.array([len(f) for f in frames])
    return {"frames": len(frames),
            "frames_by_kind": dict(sorted(Counter(i.get("kind", "") for i in info).items())),
            "frames_by_split": dict(sorted(Counter(i.get("split", "") for i in info).items())),
            "frames_by_variant": dict(sorted(Counter(i.get("variant", "") for i in info).items())),
            "molecules": len({i["name"] for i in info if i.get("kind") == "molecule"}),
            "clusters": len({i["name"] for i in info if i.get("kind") == "cluster"}),
            "boxes": len({i["name"] for i in info if i.get("kind") == "box"}),
            "charges": {str(k): v for k, v in sorted(Counter(int(i["charge"]) for i in info).items())},
            "spins": {str(k): v for k, v in sorted(Counter(int(i["spin"]) for i in info).items())},
            "elements": sorted({chemical_symbols[z] for f in frames for z in set(f.numbers.tolist())},
                               key=chemical_symbols.index),
            "atoms_per_structure": {"min": int(atoms.min()), "mean": round(float(atoms.mean()), 1),
                                    "max": int(atoms.max())}}


def write_data_card(folder: Path, manifest: dict) -> None:
    """README.md of the dataset folder, made from its manifest (sources, sampling, counts, splits, command and
    measured time), so the card always matches the files."""
    recipe, summary, sources = manifest["recipe"], manifest.get("summary", {}), manifest["sources"]
    moses = sources["moses"]
    runs = manifest["runs"]
    name = "condensed" if recipe.get("train_boxes") and not recipe["moses_train"] else "chemistry"
    chemistry = [  # what the chemistry recipe samples (every count is zero in the recipe condensed)
        f"- Drug-like molecules: MOSES benchmark set (ZINC, MIT licence) from the PyPI package "
        f"`{moses['package']}=={moses.get('version', '?')}` "
        f"(files {', '.join(moses['files'].values())}): {moses['sampled_train']} of {moses['train_pool']:,} "
        f"training SMILES and {moses['sampled_test_scaffolds']} of {moses['test_scaffolds_pool']:,} held-out-"
        f"scaffold SMILES, sampled with seed {moses['seed']} (at most {recipe['max_heavy_atoms']} heavy atoms, "
        "elements H C N O F S Cl Br). Training molecules whose Bemis-Murcko scaffold occurs among the sampled "
        "test molecules are dropped.",
        f"- Charged and open-shell variants of training molecules: {recipe['protonated']} protonated (+1), "
        f"{recipe['deprotonated']} deprotonated (-1), {recipe['radicals']} radicals (one H removed, doublet).",
        f"- The {sources['small_molecules']} small molecules of the original dataset (one MD task each).",
        f"- {recipe['clusters']} clusters of 2-8 molecules ({', '.join(sources['solvents'])}; water drawn most "
        "often), one in three around a drug-like training molecule; contacts placed at 1.7-2.6 A. "
        f"{recipe['cluster_test_fraction']:.0%} of the clusters are held out whole.",
        f"- Molecules and clusters: rdkit embedding, at most {recipe['optimisation_steps']} BFGS steps, Langevin "
        f"MD (friction 0.02/fs, {recipe['timestep_fs']} fs) at a temperature drawn from "
        f"{recipe['temperature_range'][0]:.0f}-{recipe['temperature_range'][1]:.0f} K: "
        f"{recipe['equilibration_steps']} steps, then {recipe['frames_per_task']} frames every {recipe['stride']} "
        "steps.",
        f"- Repulsive wall: {recipe['wall_per_task']} single points from the last frame of each molecule and "
        "cluster task, a bond compressed or one molecule slid onto another, down to "
        f"{WALL_MIN_DISTANCE['H']} A for pairs with H and {WALL_MIN_DISTANCE['heavy']} A between heavy atoms.",
        f"- Condensed-phase validation (evaluation only): {recipe['boxes_per_kind']} periodic boxes each of "
        f"{recipe['box_waters']} waters, {recipe['box_methanols']} methanols and a held-out-scaffold molecule with "
        f"{recipe['box_solvating_waters']} waters, packed at about liquid density "
        f"(no intermolecular contact under 1.7 A), relaxed for up to {recipe['optimisation_steps'] // 4} BFGS "
        f"steps and sampled for {recipe['box_frames']} frames by periodic GFN2-xTB MD.",
    ]
    lines = [
        f"# {folder.name}: GFN2-xTB reference data (recipe '{name}')", "",
        f"Made by `transip data generate --recipe {name}` (transip/refdata.py); this card is written by the same "
        "command from `manifest.json`.", "",
        "## Command", "", "```bash", manifest.get("command") or "(not recorded)", "```", "",
        f"State: {'complete' if summary.get('complete') else 'in progress (rerun the command to resume)'}; "
        f"shards {summary.get('shards', '?')}, tasks {summary.get('tasks', '?')}.", "",
        "## Sources and sampling", "",
        *(chemistry if name == "chemistry" else []),
        *([f"- Periodic training boxes: {recipe['train_boxes']} boxes, in turn water, one solvent of the list, "
           "a water-solvent mixture and a drug-like molecule of the MOSES training pool (at most 12 heavy atoms) "
           f"in water, each about as many atoms as {recipe['train_box_molecules'][0]}-"
           f"{recipe['train_box_molecules'][1]} waters, packed at about liquid density (no intermolecular "
           f"contact under 1.7 A), relaxed for up to "
           f"{recipe['optimisation_steps'] // 4} BFGS steps, then Langevin MD at "
           f"{recipe['train_box_temperature_range'][0]:.0f}-{recipe['train_box_temperature_range'][1]:.0f} K: "
           f"{recipe['equilibration_steps']} steps, then {recipe['train_box_frames']} frames every "
           f"{recipe['train_box_stride']} steps. Every frame is for training (`transip train --extra-data`)."]
          if recipe.get("train_boxes") else []),
        "- Labels: energy (eV) and forces (eV/A) at exactly the stored positions (rounded to 1e-5 A before the "
        "single point); total charge and spin multiplicity per structure.", "",
        "## Splits", "",
        "Recorded per frame (`split`): `train` (split further by frame into train / val / test_frames by "
        "`transip.data.split_indices`; wall frames stay in training), `test_scaffolds`, `test_clusters`, "
        "`condensed`.", "",
        "## Counts", "", "```json", json.dumps({k: v for k, v in summary.items()
                                                 if k not in ("complete", "shards", "tasks")}, indent=1), "```", "",
        "## Generation time", "",
        f"{summary.get('task_core_seconds', 0) / 3600:.2f} core-hours in the tasks themselves, over every shard. "
        f"Wall time recorded in the manifest: {summary.get('generation_seconds', 0) / 3600:.2f} h in {len(runs)} "
        f"run(s) ({', '.join(str(r['workers']) for r in runs)} worker(s)); runs stopped from outside before the "
        "manifest recorded each run's time after every shard are not in it.", ""]
    write_atomically(folder / "README.md", lambda p: p.write_text("\n".join(lines)))

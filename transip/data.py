"""Structures, readers (extended XYZ, ASE databases incl. OMol25 `.aselmdb`), splits and batching."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .elements import ELEMENT_SYMBOLS
from .neighbors import batch_neighbors

EXTXYZ_SUFFIXES = {".xyz", ".extxyz"}
COMPRESSION_SUFFIXES = {".xz", ".gz", ".bz2"}
DATABASE_SUFFIXES = {".db", ".aselmdb", ".lmdb", ".json"}


@dataclasses.dataclass
class Structure:
    """One labelled (or unlabelled) configuration. Angstrom, eV, eV/Angstrom."""

    numbers: np.ndarray  # (N,) int
    positions: np.ndarray  # (N, 3)
    charge: int = 0
    spin: int = 1  # multiplicity 2S+1
    cell: Optional[np.ndarray] = None  # (3, 3) rows are lattice vectors
    pbc: Optional[np.ndarray] = None  # (3,) bool
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    name: str = ""  # molecule identity, used to split by molecule
    kind: str = ""  # molecule | cluster | box | wall (datasets of transip.refdata), else ""
    split: str = ""  # held-out group recorded by the generator (test_scaffolds, ...), or train; "" if none

    def __post_init__(self):
        self.numbers = np.asarray(self.numbers, dtype=np.int64)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        n = len(self.numbers)
        if self.numbers.ndim != 1 or n == 0:
            raise ValueError(f"structure {self.name!r}: numbers must be a non-empty 1-D array, got shape "
                             f"{self.numbers.shape}")
        if self.positions.shape != (n, 3):
            raise ValueError(f"structure {self.name!r}: positions have shape {self.positions.shape}, expected "
                             f"({n}, 3) for {n} atoms")
        if not np.isfinite(self.positions).all():
            raise ValueError(f"structure {self.name!r}: positions contain NaN or infinite values")
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64)
            if self.forces.shape != (n, 3):
                raise ValueError(f"structure {self.name!r}: forces have shape {self.forces.shape}, expected "
                                 f"({n}, 3)")
        if self.cell is not None:
            self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
            self.pbc = np.zeros(3, bool) if self.pbc is None else np.asarray(self.pbc, dtype=bool).reshape(3)
        self.charge, self.spin = int(self.charge), int(self.spin)

    @property
    def periodic(self) -> bool:
        return self.pbc is not None and bool(np.any(self.pbc))

    @property
    def molecule_key(self) -> str:
        """Identity for splitting by molecule: the name, or else formula + charge + spin."""
        if self.name:
            return self.name
        counts = np.bincount(self.numbers)
        formula = "".join(f"{ELEMENT_SYMBOLS[z]}{c}" for z, c in enumerate(counts) if c)
        return f"{formula}_q{self.charge}_s{self.spin}"


def write_extxyz_exact(structure: Structure, path) -> None:
    """One structure as extended XYZ with every float at full precision (repr), for handing the very same
    geometry to another program (ase writes 8 decimals, enough to move forces by ~1e-7 eV/A)."""
    from ase.data import chemical_symbols

    comment = [f"charge={structure.charge} spin={structure.spin}"]
    if structure.periodic:
        comment.insert(0, 'Lattice="' + " ".join(repr(float(x)) for x in np.asarray(structure.cell).ravel()) + '" pbc="'
                       + " ".join("T" if p else "F" for p in structure.pbc) + '"')
    lines = [str(len(structure.numbers)), "Properties=species:S:1:pos:R:3 " + " ".join(comment)]
    lines += [f"{chemical_symbols[int(z)]} {x!r} {y!r} {w!r}"
              for z, (x, y, w) in zip(structure.numbers, np.asarray(structure.positions, dtype=float).tolist())]
    Path(path).write_text("\n".join(lines) + "\n")


def structure_from_atoms(atoms, name: str = "", require_labels: bool = True) -> Structure:
    """Convert an ase.Atoms (from a file or database row) to a Structure. OMol25 keys: info charge, spin."""
    energy = forces = None
    if atoms.calc is not None:
        results = atoms.calc.results
        energy = results.get("energy", results.get("free_energy"))
        forces = results.get("forces")
    info = atoms.info
    energy = info.get("energy", info.get("REF_energy", energy))
    if forces is None:
        for key in ("forces", "REF_forces"):
            if key in atoms.arrays:
                forces = atoms.arrays[key]
    if require_labels and (energy is None or forces is None):
        missing = " and ".join(k for k, v in (("energy", energy), ("forces", forces)) if v is None)
        raise ValueError(f"structure {name or atoms.get_chemical_formula()!r} has no {missing}")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    return Structure(atoms.numbers, atoms.positions, int(info.get("charge", 0)), int(info.get("spin", 1)),
                     np.asarray(atoms.cell[:]) if pbc.any() else None, pbc if pbc.any() else None,
                     None if energy is None else float(energy), forces, str(info.get("name", name)),
                     str(info.get("kind", "")), str(info.get("split", "")))


def read_structures(path, require_labels: bool = True, index: str = ":") -> List[Structure]:
    """Read every structure of an extended XYZ file (optionally .xz/.gz/.bz2), an ASE database
    (.db, .json, OMol25 .aselmdb) or a sharded dataset folder (transip.refdata: its complete shards). Raises a
    clear error for a missing, unreadable or empty file."""
    import ase.io

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if path.is_dir():
        from .refdata import MANIFEST, read_shards

        if not (path / MANIFEST).exists():
            raise ValueError(f"dataset folder {path} has no {MANIFEST}: not a dataset made by "
                             "`transip data generate --recipe chemistry`")
        frames = read_shards(path)
        if not frames:
            raise ValueError(f"dataset folder {path} has no complete shard yet")
        return [structure_from_atoms(a, require_labels=require_labels) for a in frames]
    suffixes = [s for s in path.suffixes if s not in COMPRESSION_SUFFIXES]
    kind = suffixes[-1].lower() if suffixes else ""
    try:
        if kind in DATABASE_SUFFIXES:
            atoms_list = _read_database(path)
        else:
            atoms_list = _read_extxyz(path, index) if kind in EXTXYZ_SUFFIXES else ase.io.read(path, index=index)
    except Exception as exc:
        raise ValueError(f"cannot read structures from {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(atoms_list, list):
        atoms_list = [atoms_list]
    if not atoms_list:
        raise ValueError(f"dataset {path} contains no structures")
    return [structure_from_atoms(a, require_labels=require_labels) for a in atoms_list]


def _read_extxyz(path: Path, index: str):
    """ase's extxyz reader seeks back and forth, which is quadratic in a compressed stream: decompress into
    memory first."""
    import bz2
    import gzip
    import io
    import lzma

    import ase.io

    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix.lower(), open)
    with opener(path, "rt") as f:
        text = f.read()
    return ase.io.read(io.StringIO(text), index=index, format="extxyz")


def _read_database(path: Path):
    import ase.db

    kind = path.suffix.lower()
    db_type = "aselmdb" if kind in {".aselmdb", ".lmdb"} else None
    if db_type:
        import ase_db_backends  # noqa: F401  (registers the aselmdb backend with ase.db)
    options = {"type": "aselmdb", "readonly": True} if db_type else {}
    with ase.db.connect(str(path), **options) as db:
        atoms_list = []
        for row in db.select():
            atoms = row.toatoms()
            atoms.info.update({k: v for k, v in row.key_value_pairs.items()})
            atoms.info.update(row.data or {})
            atoms_list.append(atoms)
    return atoms_list


def split_indices(structures: Sequence[Structure], seed: int = 0, test_molecule_fraction: float = 0.1,
                  val_fraction: float = 0.1, test_frame_fraction: float = 0.1) -> Dict[str, List[int]]:
    """Deterministic splits for a seed.

    A dataset whose structures record their held-out group (transip.refdata) keeps those groups whole
    (`test_scaffolds`, `test_clusters`, `condensed`; `test_molecules` is the held-out scaffolds, so tools that
    ask for held-out molecules get them) and splits the rest by frame into `train`, `val` and `test_frames`,
    wall configurations staying in training. Any other dataset is split by molecule (whole molecules held out:
    `test_molecules`) and by frame (random frames of the remaining molecules)."""
    rng = np.random.default_rng(seed)
    if any(s.split for s in structures):
        groups: Dict[str, List[int]] = {}
        for i, s in enumerate(structures):
            groups.setdefault(s.split or "train", []).append(i)
        pool = np.array([i for i in groups.pop("train", []) if structures[i].kind != "wall"], dtype=np.int64)
        wall = [i for i, s in enumerate(structures) if s.kind == "wall" and (s.split or "train") == "train"]
        pool = pool[rng.permutation(len(pool))]
        n_val, n_test = int(round(val_fraction * len(pool))), int(round(test_frame_fraction * len(pool)))
        splits = {"train": sorted(pool[n_val + n_test:].tolist() + wall), "val": sorted(pool[:n_val].tolist()),
                  "test_frames": sorted(pool[n_val:n_val + n_test].tolist())}
        for name in ("test_scaffolds", "test_clusters", "condensed"):
            splits[name] = sorted(groups.pop(name, []))
        splits.update({name: sorted(v) for name, v in groups.items()})
        splits["test_molecules"] = splits["test_scaffolds"]
        splits["held_out_molecules"] = sorted({structures[i].molecule_key for i in splits["test_scaffolds"]})
        return splits
    keys = sorted({s.molecule_key for s in structures})
    num_held = int(round(test_molecule_fraction * len(keys)))
    if test_molecule_fraction > 0 and len(keys) > 1:
        num_held = max(num_held, 1)
    held = set(rng.permutation(keys)[:num_held].tolist()) if num_held else set()
    test_molecules = [i for i, s in enumerate(structures) if s.molecule_key in held]
    rest = np.array([i for i, s in enumerate(structures) if s.molecule_key not in held], dtype=np.int64)
    rest = rest[rng.permutation(len(rest))]
    n_val, n_test = int(round(val_fraction * len(rest))), int(round(test_frame_fraction * len(rest)))
    return {"train": sorted(rest[n_val + n_test:].tolist()), "val": sorted(rest[:n_val].tolist()),
            "test_frames": sorted(rest[n_val:n_val + n_test].tolist()), "test_molecules": test_molecules,
            "held_out_molecules": sorted(held)}


def file_digest(path) -> str:
    """SHA-256 of a dataset: a file's bytes, or for a folder of shards (transip.refdata) the names and bytes of
    the shard files, in name order (the manifest and card describe them and may be rewritten)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in (path / "shards").iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class Batch:
    """Structures concatenated atom-wise, with their neighbour list, as model inputs."""

    positions: torch.Tensor  # (N, 3)
    numbers: torch.Tensor  # (N,)
    batch: torch.Tensor  # (N,) structure index
    charge: torch.Tensor  # (B,)
    spin: torch.Tensor  # (B,)
    cell: torch.Tensor  # (B, 3, 3), zeros where not periodic
    pbc: torch.Tensor  # (B, 3)
    edge_index: torch.Tensor  # (2, E)
    shifts: torch.Tensor  # (E, 3) integer image counts
    energy: Optional[torch.Tensor]  # (B,)
    forces: Optional[torch.Tensor]  # (N, 3)
    num_atoms: torch.Tensor  # (B,)

    @property
    def num_structures(self) -> int:
        return int(self.charge.shape[0])

    def shift_vectors(self) -> torch.Tensor:
        """Cartesian shift of every edge: image counts times the cell of the receiving atom's structure."""
        cell = self.cell.index_select(0, self.batch.index_select(0, self.edge_index[0]))
        return torch.bmm(self.shifts.to(cell.dtype)[:, None, :], cell)[:, 0, :]

    def rotated(self, rotation: torch.Tensor) -> "Batch":
        """The same batch with positions, forces and cells rotated (x -> R x; rows times R^T)."""
        rt = rotation.T.to(self.positions.dtype)
        return dataclasses.replace(self, positions=self.positions @ rt, cell=self.cell @ rt,
                                   forces=None if self.forces is None else self.forces @ rt)

    def joined(self, other: "Batch") -> "Batch":
        """One batch holding this one's structures, then `other`'s (one model call evaluates both)."""
        def cat(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if a is None or b is None else torch.cat([a, b])

        return Batch(cat(self.positions, other.positions), cat(self.numbers, other.numbers),
                     cat(self.batch, other.batch + self.num_structures), cat(self.charge, other.charge),
                     cat(self.spin, other.spin), cat(self.cell, other.cell), cat(self.pbc, other.pbc),
                     torch.cat([self.edge_index, other.edge_index + self.positions.shape[0]], dim=1),
                     cat(self.shifts, other.shifts), cat(self.energy, other.energy), cat(self.forces, other.forces),
                     cat(self.num_atoms, other.num_atoms))


def collate(structures: Sequence[Structure], cutoff: float, dtype=torch.float64) -> Batch:
    numbers = torch.from_numpy(np.concatenate([s.numbers for s in structures]))
    positions = torch.from_numpy(np.concatenate([s.positions for s in structures])).to(dtype)
    counts = torch.tensor([len(s.numbers) for s in structures])
    batch = torch.repeat_interleave(torch.arange(len(structures)), counts)
    cell = torch.zeros(len(structures), 3, 3, dtype=dtype)
    pbc = torch.zeros(len(structures), 3, dtype=torch.bool)
    for b, s in enumerate(structures):
        if s.periodic:
            cell[b] = torch.from_numpy(s.cell)
            pbc[b] = torch.from_numpy(s.pbc)
    edge_index, shifts = batch_neighbors(positions, batch, len(structures), cutoff, cell, pbc)
    labelled = all(s.energy is not None and s.forces is not None for s in structures)
    return Batch(positions, numbers, batch, torch.tensor([s.charge for s in structures]),
                 torch.tensor([s.spin for s in structures]), cell, pbc, edge_index, shifts,
                 torch.tensor([s.energy for s in structures], dtype=dtype) if labelled else None,
                 torch.from_numpy(np.concatenate([s.forces for s in structures])).to(dtype) if labelled else None,
                 counts)


def evaluate_batch(model, batch: Batch, compute_virial: bool = False, create_graph: bool = False):
    """Run the model on a Batch: energy, atom energies, latent, forces (and virial)."""
    return model(batch.positions, batch.numbers, batch.charge, batch.spin, batch.batch, batch.edge_index,
                 batch.shift_vectors(), batch.num_structures, compute_forces=True, compute_virial=compute_virial,
                 create_graph=create_graph)

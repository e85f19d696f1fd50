"""The summary every MD driver returns (`transip md` through ASE, and through OpenMM), so that callers read the
same keys whichever engine ran, and the check that molecules stayed whole (also used by
benchmarks/stability.py).

Keys: `atoms`, `steps`, `steps_per_second`, `ns_per_day`, and the total energy's change from the first to the
last step and its standard deviation over the run, both per atom in eV (`energy_drift_per_atom_ev`,
`energy_std_per_atom_ev`). Given the recorded frames, also `structure_check`'s keys: whether the bond graph
stayed the starting one (`intact`) and the closest approach of atoms of different molecules.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

NS_PER_FS = 1e-6
SECONDS_PER_DAY = 86400


def md_summary(total_energies_ev: Sequence[float], num_atoms: int, steps: int, seconds: float,
               timestep_fs: float, numbers=None, frames=None, cell=None) -> dict:
    """Summary of `steps` MD steps of `num_atoms` atoms that took `seconds`; `total_energies_ev` is the total
    (potential + kinetic) energy in eV, sampled at the start, during and at the end of the run."""
    energies = np.asarray(total_energies_ev, dtype=float)
    return {"atoms": num_atoms, "steps": steps, "steps_per_second": steps / seconds,
            "ns_per_day": steps * timestep_fs * NS_PER_FS / seconds * SECONDS_PER_DAY,
            "energy_drift_per_atom_ev": float(energies[-1] - energies[0]) / num_atoms,
            "energy_std_per_atom_ev": float(energies.std()) / num_atoms,
            **(structure_check(numbers, frames, cell) if frames is not None else {})}


def pair_distances(positions: np.ndarray, cell: Optional[np.ndarray] = None) -> np.ndarray:
    """All pairwise distances (N, N); with a periodic `cell` (rows are lattice vectors), minimum image."""
    delta = positions[:, None, :] - positions[None, :, :]
    if cell is not None:
        fractional = delta @ np.linalg.inv(cell)
        delta = (fractional - np.round(fractional)) @ cell
    return np.sqrt((delta ** 2).sum(-1))


def bond_graph(numbers: np.ndarray, positions: np.ndarray, cell: Optional[np.ndarray] = None) -> np.ndarray:
    """Boolean (N, N) adjacency: pairs closer than 1.2x the sum of their covalent radii."""
    from ase.data import covalent_radii

    radii = covalent_radii[np.asarray(numbers)]
    bonded = pair_distances(positions, cell) < 1.2 * (radii[:, None] + radii[None, :])
    np.fill_diagonal(bonded, False)
    return bonded


def structure_check(numbers, frames, cell: Optional[np.ndarray] = None) -> dict:
    """Whether the molecules of the first frame stay whole in all frames (the bond graph never changes), how
    many bonds broke and formed at most, and the closest approach of atoms of different molecules."""
    from scipy.sparse.csgraph import connected_components

    frames = np.asarray(frames, dtype=float)
    cell = None if cell is None else np.asarray(cell, dtype=float)
    start = bond_graph(numbers, frames[0], cell)
    molecules, labels = connected_components(start, directed=False)
    other_molecule = labels[:, None] != labels[None, :]
    broken = formed = changed_frames = 0
    closest = float("inf")
    for positions in frames:
        graph = bond_graph(numbers, positions, cell)
        broken_now, formed_now = int((start & ~graph).sum() // 2), int((graph & ~start).sum() // 2)
        broken, formed = max(broken, broken_now), max(formed, formed_now)
        changed_frames += bool(broken_now or formed_now)
        if molecules > 1:
            closest = min(closest, float(pair_distances(positions, cell)[other_molecule].min()))
    return {"molecules": int(molecules), "bonds": int(start.sum() // 2), "frames_checked": len(frames),
            "frames_with_changed_bonds": changed_frames, "most_bonds_broken": broken, "most_bonds_formed": formed,
            "intact": changed_frames == 0, "closest_intermolecular_A": closest if molecules > 1 else None}


def describe_check(summary: dict) -> str:
    """One line for a person: molecules intact or not, and the closest contact."""
    if "intact" not in summary:
        return ""
    state = ("molecules intact" if summary["intact"] else
             f"molecules NOT intact: up to {summary['most_bonds_broken']} bonds broken and "
             f"{summary['most_bonds_formed']} formed in {summary['frames_with_changed_bonds']} of "
             f"{summary['frames_checked']} frames")
    contact = (f"; closest approach of different molecules {summary['closest_intermolecular_A']:.2f} A"
               if summary["closest_intermolecular_A"] is not None else "")
    count = f"{summary['molecules']} molecule{'s' if summary['molecules'] != 1 else ''}"
    return f"{state} ({count}, {summary['bonds']} bonds){contact}"

"""Accuracy and equivariance metrics of a model on a list of structures."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from .data import Structure, collate, evaluate_batch
from .model import random_rotation


def spread_subset(items: Sequence, count: int) -> list:
    """About `count` items taken at an even stride, so that a subset spans every molecule of a split."""
    return list(items[::max(1, len(items) // count)])[:count] if count > 0 else []


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict(model, structures: Sequence[Structure], batch_size: int = 32, compute_virial: bool = False):
    """Energies (B,), forces (list of (N_b, 3)) and, on request, virials (B, 3, 3) as numpy arrays."""
    dtype = next(model.parameters()).dtype
    energies, forces, atom_energies, virials = [], [], [], []
    for chunk in _chunks(structures, batch_size):
        batch = collate(chunk, model.cutoff, dtype)
        out = evaluate_batch(model, batch, compute_virial=compute_virial)
        energies.append(out["energy"].detach().numpy())
        forces.extend(torch.split(out["forces"].detach(), batch.num_atoms.tolist()))
        atom_energies.extend(torch.split(out["atom_energy"].detach(), batch.num_atoms.tolist()))
        if compute_virial:
            virials.append(out["virial"].detach().numpy())
    result = {"energy": np.concatenate(energies), "forces": [f.numpy() for f in forces],
              "atom_energy": [e.numpy() for e in atom_energies]}
    if compute_virial:
        result["virial"] = np.concatenate(virials)
    return result


def accuracy(model, structures: Sequence[Structure], batch_size: int = 32, predictor=None) -> Dict[str, float]:
    """Energy MAE (eV and eV/atom), force MAE (eV/A, per component), mean force cosine similarity. `predictor`
    (structures -> {"energy", "forces"} like `predict`) evaluates another kind of model (e.g. a baseline)."""
    pred = predictor(structures) if predictor is not None else predict(model, structures, batch_size)
    n_atoms = np.array([len(s.numbers) for s in structures])
    e_err = np.abs(pred["energy"] - np.array([s.energy for s in structures]))
    f_pred = np.concatenate(pred["forces"])
    f_ref = np.concatenate([s.forces for s in structures])
    norms = np.linalg.norm(f_pred, axis=1) * np.linalg.norm(f_ref, axis=1)
    valid = norms > 1e-12
    cosine = float(np.mean((f_pred * f_ref).sum(1)[valid] / norms[valid])) if valid.any() else float("nan")
    return {"energy_mae": float(e_err.mean()), "energy_mae_per_atom": float((e_err / n_atoms).mean()),
            "force_mae": float(np.abs(f_pred - f_ref).mean()),
            "force_rmse": float(np.sqrt(((f_pred - f_ref) ** 2).mean())), "force_cosine": cosine}


def equivariance_error(model, structures: Sequence[Structure], num_rotations: int = 8, seed: int = 0,
                       batch_size: int = 32, predictor=None) -> Dict[str, float]:
    """For random rotations R: |E(Rx) - E(x)| (eV and eV/atom) and |F(Rx) - R F(x)| / |F(x)| per structure."""
    generator = torch.Generator().manual_seed(seed)
    if predictor is None:
        def predictor(chosen):
            return predict(model, chosen, batch_size)
    base = predictor(structures)
    n_atoms = np.array([len(s.numbers) for s in structures])
    e_err: List[np.ndarray] = []
    f_err: List[float] = []
    for _ in range(num_rotations):
        rotation = random_rotation(generator).numpy()
        rotated = [rotate_structure(s, rotation) for s in structures]
        pred = predictor(rotated)
        e_err.append(np.abs(pred["energy"] - base["energy"]))
        for f_rot, f0 in zip(pred["forces"], base["forces"]):
            f_err.append(np.linalg.norm(f_rot - f0 @ rotation.T) / max(np.linalg.norm(f0), 1e-12))
    e = np.stack(e_err)
    return {"energy_abs": float(e.mean()), "energy_abs_per_atom": float((e / n_atoms).mean()),
            "energy_abs_max": float(e.max()), "force_relative": float(np.mean(f_err)),
            "force_relative_max": float(np.max(f_err))}


def rotate_structure(s: Structure, rotation: np.ndarray) -> Structure:
    """x -> R x for positions, forces and cell vectors (rows times R^T)."""
    import dataclasses

    return dataclasses.replace(
        s, positions=s.positions @ rotation.T, cell=None if s.cell is None else s.cell @ rotation.T,
        forces=None if s.forces is None else s.forces @ rotation.T)

"""ASE calculator for a TransIP checkpoint, and the short MD run behind `transip md`."""

from __future__ import annotations

import time

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import Structure, structure_from_atoms
from .domain import check_trained_domain, domain_for
from .md_summary import describe_check, md_summary
from .metrics import predict


class TransIPCalculator(Calculator):
    """Energy (eV), forces (eV/A), per-atom energies and, for periodic cells, stress (eV/A^3).

    Total charge and spin multiplicity are read from `atoms.info['charge']` / `['spin']` (OMol25 keys),
    or default to the values given here. An element, charge or multiplicity outside the checkpoint's trained
    domain is refused (ValueError) unless `allow_untrained=True`, which warns once instead.
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies", "stress"]

    def __init__(self, checkpoint, charge: int = 0, spin: int = 1, dtype: torch.dtype = torch.float64,
                 allow_untrained: bool = False, where: str = "python", **kwargs):
        super().__init__(**kwargs)
        payload = load_checkpoint(checkpoint)
        self.model = model_from_checkpoint(payload, dtype)
        self.domain = domain_for(payload, self.model.config)
        self.default_charge, self.default_spin = charge, spin
        self.allow_untrained, self.where = allow_untrained, where

    def charge_and_spin(self, atoms) -> tuple:
        return int(atoms.info.get("charge", self.default_charge)), int(atoms.info.get("spin", self.default_spin))

    def check(self, atoms) -> None:
        """Refuse (or, with allow_untrained, warn about) what the model was not trained on."""
        check_trained_domain(self.domain, atoms.numbers, *self.charge_and_spin(atoms), self.allow_untrained,
                             self.where)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.check(self.atoms)
        s = structure_from_atoms(self.atoms, require_labels=False)
        s.charge, s.spin = self.charge_and_spin(self.atoms)
        periodic = s.periodic
        out = predict(self.model, [s], compute_virial=periodic)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": out["forces"][0],
                        "energies": out["atom_energy"][0]}
        if periodic:
            virial = out["virial"][0]
            stress = -virial / self.atoms.get_volume()
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]


def run_md(checkpoint, structure: Structure, steps: int, timestep_fs: float, temperature: float,
           trajectory: str, seed: int = 0, log=print, allow_untrained: bool = False) -> dict:
    """NVE velocity-Verlet MD with ASE; prints energy and temperature, writes an extended XYZ trajectory.
    Returns `transip.md_summary.md_summary` (energies per atom in eV), as the OpenMM driver does."""
    import ase
    import ase.io
    from ase import units
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from tqdm import tqdm

    atoms = ase.Atoms(structure.numbers, positions=structure.positions, cell=structure.cell,
                      pbc=structure.pbc if structure.pbc is not None else False)
    atoms.info.update(charge=structure.charge, spin=structure.spin)
    atoms.calc = TransIPCalculator(checkpoint, allow_untrained=allow_untrained, where="cli")
    atoms.calc.check(atoms)  # before the progress bar starts, so an error is the only thing printed
    thermalize_momenta(atoms, temperature, rng=np.random.default_rng(seed))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    report_every = max(1, steps // 10)
    energies = []
    log(f"{'step':>6} {'time/fs':>8} {'E_pot/eV':>14} {'E_tot/eV':>14} {'T/K':>8}")
    frames = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="MD", unit="step", leave=False)
    for step in range(steps + 1):
        if step:
            dyn.run(1)
            bar.update(1)
        e_pot, e_kin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        energies.append(e_pot + e_kin)
        if step % report_every == 0:
            bar.clear()
            log(f"{step:6d} {step * timestep_fs:8.1f} {e_pot:14.6f} {e_pot + e_kin:14.6f} "
                f"{atoms.get_temperature():8.1f}")
            frame = atoms.copy()
            frame.calc = None
            frames.append(frame)
    bar.close()
    seconds = time.perf_counter() - start
    ase.io.write(trajectory, frames, format="extxyz")
    summary = md_summary(energies, len(atoms), steps, seconds, timestep_fs, atoms.numbers,
                         [f.positions for f in frames], np.asarray(atoms.cell) if atoms.pbc.all() else None)
    log(f"{steps} steps in {seconds:.1f} s ({summary['steps_per_second']:.1f} steps/s); total-energy change "
        f"{1000 * summary['energy_drift_per_atom_ev']:.3f} meV/atom, std "
        f"{1000 * summary['energy_std_per_atom_ev']:.3f} meV/atom; trajectory: {trajectory}")
    log(describe_check(summary))
    return summary

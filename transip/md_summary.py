"""The summary every MD driver returns (`transip md` through ASE, and through OpenMM), so that callers read the
same keys whichever engine ran.

Keys: `atoms`, `steps`, `steps_per_second`, `ns_per_day`, and the total energy's change from the first to the
last step and its standard deviation over the run, both per atom in eV (`energy_drift_per_atom_ev`,
`energy_std_per_atom_ev`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NS_PER_FS = 1e-6
SECONDS_PER_DAY = 86400


def md_summary(total_energies_ev: Sequence[float], num_atoms: int, steps: int, seconds: float,
               timestep_fs: float) -> dict:
    """Summary of `steps` MD steps of `num_atoms` atoms that took `seconds`; `total_energies_ev` is the total
    (potential + kinetic) energy in eV, sampled at the start, during and at the end of the run."""
    energies = np.asarray(total_energies_ev, dtype=float)
    return {"atoms": num_atoms, "steps": steps, "steps_per_second": steps / seconds,
            "ns_per_day": steps * timestep_fs * NS_PER_FS / seconds * SECONDS_PER_DAY,
            "energy_drift_per_atom_ev": float(energies[-1] - energies[0]) / num_atoms,
            "energy_std_per_atom_ev": float(energies.std()) / num_atoms}

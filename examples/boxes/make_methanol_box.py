"""Writes methanol_box.extxyz: 64 randomly oriented methanol molecules on a 4x4x4 lattice in a cubic periodic
box of 16.3 A (liquid density at 298 K, 0.787 g/cm^3; thicker than twice the shipped model's 6 A cutoff). Methanol is in
the shipped model's training set. The geometry is the first methanol frame of the shipped dataset.

Random orientations alone put hydrogens of neighbouring molecules 0.7 A apart, a start that no liquid has. So the
molecule with the closest contact is turned again (the best of a few random orientations) until no two atoms of
different molecules are closer than MIN_CONTACT (minimum image).

    python examples/boxes/make_methanol_box.py

It also writes the same box as lammps/examples/methanol_box.data for the LAMMPS example deck.
"""

from pathlib import Path

import ase
import ase.io
import numpy as np
from scipy.spatial.transform import Rotation

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DENSITY = 0.787  # g/cm^3, liquid methanol at 298 K
MOLAR_MASS = 32.042  # g/mol
SPACING = (MOLAR_MASS / (DENSITY * 0.602214076)) ** (1.0 / 3.0)  # A per molecule (4.07; 0.6022 = N_A / 1e24)
MIN_CONTACT = 2.0  # A, closest approach of atoms of different molecules (liquid methanol: O-H...O hydrogen bonds at about 1.8 A)
ROUNDS = 5000  # re-orientations before giving up
DRAWS = 32  # random orientations tried per re-orientation


def main() -> None:
    from transip.data import _read_extxyz

    methanol = next(f for f in _read_extxyz(ROOT / "data" / "xtb_organics.extxyz.xz", ":")
                    if f.info["name"] == "methanol")
    centred = methanol.positions - methanol.positions.mean(axis=0)
    rng = np.random.default_rng(0)
    side = 4 * SPACING
    sites = (np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * SPACING
    turned = lambda site: centred @ Rotation.random(random_state=rng).as_matrix().T + site
    molecules = np.stack([turned(site) for site in sites])  # (64, atoms, 3)
    for _ in range(ROUNDS):
        contacts = [closest_approach(m, np.delete(molecules, i, 0).reshape(-1, 3), side)
                    for i, m in enumerate(molecules)]
        worst = int(np.argmin(contacts))
        if contacts[worst] >= MIN_CONTACT:
            break
        others = np.delete(molecules, worst, 0).reshape(-1, 3)
        draws = [turned(sites[worst]) for _ in range(DRAWS)]
        best = max(draws, key=lambda m: closest_approach(m, others, side))
        if closest_approach(best, others, side) > contacts[worst]:
            molecules[worst] = best
    else:
        raise SystemExit(f"no arrangement keeps {MIN_CONTACT} A between molecules after {ROUNDS} rounds: lower "
                         "MIN_CONTACT or raise SPACING")
    box = ase.Atoms(numbers=np.tile(methanol.numbers, len(sites)), positions=molecules.reshape(-1, 3),
                    cell=np.eye(3) * side, pbc=True)
    ase.io.write(HERE / "methanol_box.extxyz", box, format="extxyz")
    # The same box for the LAMMPS example deck (lammps/examples/in.methanol_nvt), atom types H C O.
    ase.io.write(ROOT / "lammps" / "examples" / "methanol_box.data", box, format="lammps-data", specorder=["H", "C", "O"],
                 masses=True, atom_style="atomic")
    print(f"wrote {HERE / 'methanol_box.extxyz'}: {len(box)} atoms, box {side:.2f} A, closest approach of "
          f"different molecules >= {MIN_CONTACT} A")


def closest_approach(a: np.ndarray, b: np.ndarray, side: float) -> float:
    """Smallest minimum-image distance between the atoms a and the atoms b in a cubic box."""
    d = a[:, None, :] - b[None, :, :]
    d -= side * np.round(d / side)
    return float(np.sqrt((d * d).sum(-1)).min())


if __name__ == "__main__":
    main()

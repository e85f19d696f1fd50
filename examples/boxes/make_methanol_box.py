"""Writes methanol_box.extxyz: 64 randomly oriented methanol molecules on a 4x4x4 lattice in a cubic periodic
box of 13.8 A (liquid density, 0.78 g/cm^3; thicker than twice the shipped model's 6 A cutoff). Methanol is in
the shipped model's training set. The geometry is the first methanol frame of the shipped dataset.

    python examples/boxes/make_methanol_box.py
"""

from pathlib import Path

import ase
import ase.io
import numpy as np
from scipy.spatial.transform import Rotation

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SPACING = 3.45  # A per molecule


def main() -> None:
    from transip.data import _read_extxyz

    methanol = next(f for f in _read_extxyz(ROOT / "data" / "xtb_organics.extxyz.xz", ":")
                    if f.info["name"] == "methanol")
    centred = methanol.positions - methanol.positions.mean(axis=0)
    rng = np.random.default_rng(0)
    positions, numbers = [], []
    for site in np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3):
        rotation = Rotation.random(random_state=rng).as_matrix()
        positions.append(centred @ rotation.T + (site + 0.5) * SPACING)
        numbers.append(methanol.numbers)
    box = ase.Atoms(numbers=np.concatenate(numbers), positions=np.concatenate(positions),
                    cell=np.eye(3) * 4 * SPACING, pbc=True)
    ase.io.write(HERE / "methanol_box.extxyz", box, format="extxyz")
    print(f"wrote {HERE / 'methanol_box.extxyz'}: {len(box)} atoms, box {4 * SPACING:.2f} A")


if __name__ == "__main__":
    main()

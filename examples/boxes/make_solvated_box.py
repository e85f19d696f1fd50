"""Writes the condensed-phase systems that the examples, the stability check and the benchmarks run:

- water_box.extxyz: 96 water molecules in a periodic cube at about liquid density (288 atoms);
- solvated_box.extxyz: a drug-like molecule from the held-out scaffolds of data/xtb_chemistry (never trained on),
  N-[(1-phenylpyrazol-4-yl)methyl]benzamide, in 100 water molecules (336 atoms).

Molecules are embedded with RDKit and packed at random with no two atoms of different molecules closer than 1.7 A
(minimum image), as the dataset's condensed-phase boxes are (transip.refdata.packed_box). The same boxes are
written for LAMMPS as lammps/examples/water_box.data and lammps/examples/solvated_box.data (atom types H C N O).

    python examples/boxes/make_solvated_box.py
"""

from pathlib import Path

import ase.io

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOLUTE = "O=C(NCc1cnn(-c2ccccc2)c1)c1ccccc1"  # moses_test_00003 of data/xtb_chemistry (held-out scaffold)
WATER_BOX_MOLECULES = 96
SOLVATING_WATERS = 100
SPECIES = ["H", "C", "N", "O"]  # LAMMPS atom types 1-4


def water_box(molecules: int = WATER_BOX_MOLECULES, seed: int = 0):
    from transip.refdata import packed_box

    return packed_box(["O"] * molecules, seed, density_g_cm3=1.0)


def solvated_box(waters: int = SOLVATING_WATERS, seed: int = 0):
    from transip.refdata import packed_box

    return packed_box([SOLUTE] + ["O"] * waters, seed, density_g_cm3=1.0)


def main() -> None:
    for name, box in (("water_box", water_box()), ("solvated_box", solvated_box())):
        box.info = {"charge": 0, "spin": 1}
        ase.io.write(HERE / f"{name}.extxyz", box, format="extxyz")
        ase.io.write(ROOT / "lammps" / "examples" / f"{name}.data", box, format="lammps-data", specorder=SPECIES,
                     masses=True, atom_style="atomic")
        density = box.get_masses().sum() / 0.602214076 / box.get_volume()
        print(f"wrote {HERE / f'{name}.extxyz'}: {len(box)} atoms, box {box.cell[0, 0]:.2f} A, "
              f"{density:.3f} g/cm^3")


if __name__ == "__main__":
    main()

"""Readers, data generation and clear errors for bad input."""

import numpy as np
import pytest
import torch

from transip.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from transip.data import Structure, read_structures
from transip.metrics import predict
from transip.model import ModelConfig, TransIP


def test_extxyz_and_ase_databases_read_the_same(small_dataset, tmp_path):
    import ase.db
    import ase.io

    frames = ase.io.read(small_dataset, ":5")
    reference = read_structures(small_dataset)[:5]
    for kind, name in (("db", "set.db"), ("aselmdb", "set.aselmdb")):
        path = tmp_path / name
        if kind == "aselmdb":
            import ase_db_backends  # noqa: F401
        with ase.db.connect(str(path), type=kind) as db:
            for atoms in frames:
                # OMol25 keeps charge and spin in the row's data/info
                db.write(atoms, data={"charge": int(atoms.info["charge"]), "spin": int(atoms.info["spin"])})
        read = read_structures(path)
        assert len(read) == 5
        for a, b in zip(read, reference):
            np.testing.assert_array_equal(a.numbers, b.numbers)
            np.testing.assert_allclose(a.positions, b.positions)
            np.testing.assert_allclose(a.forces, b.forces)
            assert a.energy == pytest.approx(b.energy) and (a.charge, a.spin) == (b.charge, b.spin)


def test_compressed_extxyz_roundtrip(tmp_path):
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = ase.Atoms("OH", positions=[[0, 0, 0], [0.97, 0, 0]])
    atoms.calc = SinglePointCalculator(atoms, energy=-130.5, forces=[[0.1, 0, 0], [-0.1, 0, 0]])
    atoms.info.update(charge=-1, spin=1, name="hydroxide")
    ase.io.write(tmp_path / "x.extxyz.xz", [atoms] * 3, format="extxyz")
    s = read_structures(tmp_path / "x.extxyz.xz")
    assert len(s) == 3 and s[0].charge == -1 and s[0].energy == -130.5 and s[0].name == "hydroxide"


@pytest.mark.slow
def test_generated_frames_carry_true_xtb_labels(tmp_path):
    from tblite.ase import TBLite

    from transip import datagen

    out = tmp_path / "gen.extxyz"
    summary = datagen.generate(out, [("acetate", "CC(=O)[O-]"), ("methyl_radical", "[CH3]")], (500.0,),
                               frames_per_task=3, stride=2, equilibration_steps=5, workers=1)
    assert summary["frames"] == 6 and not summary["failures"]
    structures = read_structures(out)
    assert {(s.name, s.charge, s.spin) for s in structures} == {("acetate", -1, 1), ("methyl_radical", 0, 2)}
    import ase

    for s in structures[::3]:
        atoms = ase.Atoms(s.numbers, positions=s.positions)
        atoms.calc = TBLite(method="GFN2-xTB", charge=s.charge, multiplicity=s.spin, verbosity=0)
        # labels were computed before rounding positions to 1e-5 A
        assert atoms.get_potential_energy() == pytest.approx(s.energy, abs=2e-3)
        np.testing.assert_allclose(atoms.get_forces(), s.forces, atol=2e-3)


# ---------------------------------------------------------------- bad input
def test_bad_structures_are_rejected_with_the_problem_named():
    with pytest.raises(ValueError, match=r"positions have shape \(2, 2\), expected \(3, 3\)"):
        Structure([1, 1, 8], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        Structure([1, 8], [[0, 0, 0], [np.nan, 0, 0]])
    with pytest.raises(ValueError, match=r"forces have shape"):
        Structure([1, 8], np.zeros((2, 3)), forces=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="non-empty"):
        Structure([], np.zeros((0, 3)))


def test_unknown_element_is_named():
    model = TransIP(ModelConfig(elements=[1, 6, 8], cutoff=3.0, d_model=16, num_heads=2, num_layers=1)).double()
    with pytest.raises(ValueError, match="atomic number 17 is not known"):
        predict(model, [Structure([6, 17], [[0, 0, 0], [1.7, 0, 0]])])
    with pytest.raises(ValueError, match=r"total charge 9 is outside the model.s range -4\.\.4"):
        predict(model, [Structure([6, 8], [[0, 0, 0], [1.2, 0, 0]], charge=9)])


def test_missing_empty_and_unlabelled_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.extxyz does not exist"):
        read_structures(tmp_path / "nothere.extxyz")
    (tmp_path / "empty.extxyz").write_text("")
    with pytest.raises(ValueError, match="empty.extxyz"):
        read_structures(tmp_path / "empty.extxyz")
    (tmp_path / "nolabel.xyz").write_text("1\n\nH 0 0 0\n")
    with pytest.raises(ValueError, match="has no energy and forces"):
        read_structures(tmp_path / "nolabel.xyz")


def test_missing_corrupt_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "corrupt.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a TransIP checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt")
    model = TransIP(ModelConfig(elements=[1, 8], cutoff=3.0, d_model=16, num_heads=2, num_layers=1))
    import dataclasses

    save_checkpoint(tmp_path / "ok.ckpt", {"model_config": dataclasses.asdict(model.config),
                                           "model_state": model.state_dict()})
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "truncated.ckpt")
    assert model_from_checkpoint(tmp_path / "ok.ckpt").config.elements == [1, 8]
    save_checkpoint(tmp_path / "newer.ckpt", {"model_config": {}, "model_state": {}, "version": 99})
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(tmp_path / "newer.ckpt")

"""The 'chemistry' reference-data recipe (transip.refdata): planning, every kind of structure, labels, splits,
resumable shards and failure accounting."""

import json

import numpy as np
import pytest

from transip import refdata
from transip.data import read_structures, split_indices

# Every kind of the full recipe, at toy size: small boxes, short MD.
TINY = dict(moses_train=3, moses_test=2, protonated=1, deprotonated=1, radicals=1, small_molecules=False,
            clusters=3, cluster_test_fraction=0.34, boxes_per_kind=1, box_waters=4, box_methanols=2,
            box_solvating_waters=3, wall_per_task=2, optimisation_steps=4, equilibration_steps=2,
            frames_per_task=2, stride=2, box_frames=1, max_heavy_atoms=14, shard_size=3, seed=8,
            train_boxes=2, train_box_molecules=(3, 3), train_box_frames=1, train_box_stride=2)  # a seed whose plan has every variant


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chem") / "tiny"
    summary = refdata.generate(folder, refdata.Recipe(**TINY), workers=2, command="test", progress=False)
    return folder, summary


def test_plan_holds_out_whole_scaffolds_and_covers_charges_and_spins():
    recipe = refdata.Recipe.scaled(0.1)
    tasks, sources = refdata.plan(recipe)
    assert tasks == refdata.plan(recipe)[0], "the plan must be deterministic for a seed"
    train = [t for t in tasks if t.kind == "molecule" and t.split == "train" and t.variant == "neutral"]
    test = [t for t in tasks if t.split == "test_scaffolds"]
    assert len(train) == recipe.moses_train and len(test) == recipe.moses_test
    held = {refdata.murcko_scaffold(t.smiles[0]) for t in test}
    assert not held & {refdata.murcko_scaffold(t.smiles[0]) for t in train}
    variants = {v: [t for t in tasks if t.variant == v] for v in ("protonated", "deprotonated", "radical")}
    assert [len(v) for v in variants.values()] == [recipe.protonated, recipe.deprotonated, recipe.radicals]
    from rdkit import Chem

    for variant, charge, radicals in (("protonated", 1, 0), ("deprotonated", -1, 0), ("radical", 0, 1)):
        for task in variants[variant]:
            mol = Chem.MolFromSmiles(task.smiles[0])
            assert Chem.GetFormalCharge(mol) == charge, (variant, task.smiles)
            assert sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms()) == radicals, (variant, task.smiles)
    assert sources["moses"]["seed"] == recipe.seed and sources["moses"]["train_pool"] > 1_000_000
    assert sum(t.kind == "molecule" and t.variant == "small" for t in tasks) == 65
    clusters = [t for t in tasks if t.kind == "cluster"]
    assert all(2 <= len(t.smiles) <= 8 for t in clusters)
    assert any(t.split == "test_clusters" for t in clusters) and any(t.variant == "solvated" for t in clusters)


def test_training_boxes_leave_the_rest_of_the_plan_as_it_is():
    plain, _ = refdata.plan(refdata.Recipe.scaled(0.05))
    recipe = refdata.Recipe.scaled(0.05, train_boxes=8)
    tasks, sources = refdata.plan(recipe)
    assert tasks[:len(plain)] == plain and sources["training_boxes"]["count"] == 8
    boxes = tasks[len(plain):]
    assert [t.variant for t in boxes] == ["water", "solvent", "mixture", "solvated"] * 2
    assert all(t.kind == "box" and t.split == "train" for t in boxes)
    assert all(recipe.train_box_temperature_range[0] <= t.temperature <= recipe.train_box_temperature_range[1]
               for t in boxes)
    water = [t for t in boxes if t.variant == "water"]
    assert all(set(t.smiles) == {"O"} and 12 <= len(t.smiles) <= 24 for t in water)
    solvated = [t for t in boxes if t.variant == "solvated"]
    held = {refdata.murcko_scaffold(t.smiles[0]) for t in tasks if t.split == "test_scaffolds"}
    assert all(t.smiles[0] != "O" and set(t.smiles[1:]) == {"O"} for t in solvated)
    assert not held & {refdata.murcko_scaffold(t.smiles[0]) for t in solvated}
    only, _ = refdata.plan(refdata.Recipe.condensed(4))
    assert [t.kind for t in only] == ["box"] * 4


def test_datasets_recorded_before_a_recipe_field_existed_still_resume():
    recorded = {k: v for k, v in json.loads(json.dumps(refdata.dataclasses.asdict(refdata.Recipe()))).items()
                if not k.startswith("train_box")}
    assert refdata.same_recipe(recorded, refdata.Recipe())
    assert not refdata.same_recipe(recorded, refdata.Recipe(train_boxes=3))
    assert not refdata.same_recipe({**recorded, "clusters": 7}, refdata.Recipe())


def test_variant_editing():
    rng = np.random.default_rng(0)
    assert refdata.protonated("CCN(C)C", rng) == "CC[NH+](C)C"
    assert refdata.deprotonated("CC(=O)O", rng) == "CC(=O)[O-]"
    assert refdata.deprotonated("CCCC", rng) is None
    assert refdata.radical("C", rng) == "[CH3]"


@pytest.mark.slow
def test_tiny_generation_covers_every_kind(tiny_dataset):
    folder, summary = tiny_dataset
    assert summary["complete"] and summary["failed_parts"] == 0, summary
    assert set(summary["frames_by_kind"]) == {"molecule", "cluster", "box", "wall"}
    assert {"neutral", "protonated", "deprotonated", "radical", "solvent", "solvated", "water",
            "methanol"} <= set(summary["frames_by_variant"])
    assert set(summary["charges"]) >= {"-1", "0", "1"} and set(summary["spins"]) == {"1", "2"}
    structures = read_structures(folder)
    boxes = [s for s in structures if s.kind == "box"]
    assert boxes and all(s.periodic for s in boxes)
    assert {s.split for s in boxes} == {"condensed", "train"}
    assert sorted(s.name for s in boxes if s.split == "train") == ["train_box_0000_water", "train_box_0001_solvent"]
    # the wall reaches down to the recipe's closest approaches
    wall = [s for s in structures if s.kind == "wall"]
    closest = min(np.linalg.norm(s.positions[:, None] - s.positions[None], axis=-1)[np.triu_indices(len(s.numbers), 1)]
                  .min() for s in wall)
    assert closest < 1.0
    splits = split_indices(structures)
    assert {i for i in splits["test_scaffolds"]} == {i for i, s in enumerate(structures) if s.split == "test_scaffolds"}
    assert all(structures[i].kind != "wall" for i in splits["test_frames"] + splits["val"])
    assert set(splits["test_molecules"]) == set(splits["test_scaffolds"])
    train_names = {structures[i].name for i in splits["train"] + splits["val"] + splits["test_frames"]}
    assert not train_names & {structures[i].name for k in ("test_scaffolds", "test_clusters", "condensed")
                              for i in splits[k]}
    card = (folder / "README.md").read_text()
    assert "transip data generate" in card or "test" in card
    assert f"\"frames\": {summary['frames']}" in card and "Generation time" in card


@pytest.mark.slow
def test_labels_equal_fresh_xtb_single_points(tiny_dataset):
    import ase

    from transip.datagen import xtb_calculator

    folder, _ = tiny_dataset
    structures = read_structures(folder)
    by_kind = {}
    for s in structures:
        by_kind.setdefault(s.kind, s)
    for kind, s in by_kind.items():
        atoms = ase.Atoms(s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc if s.periodic else False)
        atoms.calc = xtb_calculator(s.charge, s.spin)
        # The MD restarts each SCF from the previous step, a fresh single point starts from scratch: both stop
        # at tblite's default convergence, which leaves ~1e-4 eV/A in the forces (the energy is variational).
        assert atoms.get_potential_energy() == pytest.approx(s.energy, abs=1e-5), kind
        np.testing.assert_allclose(atoms.get_forces(), s.forces, atol=5e-4, err_msg=kind)


@pytest.mark.slow
def test_shards_resume_and_half_written_shards_are_never_read(tiny_dataset, tmp_path):
    import shutil

    folder, summary = tiny_dataset
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = read_structures(copy)
    # a shard whose summary is missing was interrupted before completion: it is redone, identically
    (copy / "shards" / "shard-00001.json").unlink()
    (copy / "shards" / "partial.shard-00009.extxyz.xz").write_text("garbage")
    assert len(read_structures(copy)) < len(before)
    again = refdata.generate(copy, refdata.Recipe(**TINY), workers=1, progress=False)
    assert again["complete"] and again["frames"] == summary["frames"]
    after = read_structures(copy)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert a.energy == b.energy
    manifest = json.loads((copy / refdata.MANIFEST).read_text())
    assert [r["shards_written"] for r in manifest["runs"]] == [summary_shards(summary), 1]
    assert all(r["seconds"] > 0 for r in manifest["runs"])
    assert "core-hours in the tasks themselves, over every shard" in (copy / "README.md").read_text()
    with pytest.raises(ValueError, match="another recipe"):
        refdata.generate(copy, refdata.Recipe(**{**TINY, "seed": 9}), workers=1, progress=False)


def summary_shards(summary) -> int:
    return int(summary["shards"].split("/")[0])


def test_failures_are_counted_not_fatal():
    recipe = refdata.Recipe(**TINY)
    bad = refdata.Task("molecule", "broken", "train", ("C1CC",), "neutral", 300.0, 1)
    index, frames, failures, _ = refdata._run_one((5, bad, recipe))
    assert (index, frames, failures) == (5, [], ["invalid SMILES"])
    odd = refdata.Task("molecule", "iodine", "train", ("CI",), "neutral", 300.0, 1)
    assert refdata._run_one((0, odd, recipe))[2] == ["element outside the recipe"]


def test_xtb_convergence_failures_are_recognised():
    import ase

    from transip.datagen import xtb_calculator

    atoms = ase.Atoms("OHH", positions=[[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0]])  # squeezed onto the wall
    atoms.calc = xtb_calculator(0, 1, max_iterations=1)
    with pytest.raises(Exception) as caught:
        atoms.get_potential_energy()
    assert refdata.classify_failure(caught.value) == "xTB did not converge"


def test_old_dataset_still_reads():
    from conftest import SHIPPED_DATA

    structures = read_structures(SHIPPED_DATA)
    assert len(structures) == 23400 and not any(s.split or s.kind for s in structures)
    splits = split_indices(structures)
    assert set(splits) == {"train", "val", "test_frames", "test_molecules", "held_out_molecules"}


@pytest.mark.slow
def test_data_info_reports_splits_and_composition(tiny_dataset):
    import subprocess
    import sys

    folder, summary = tiny_dataset
    out = subprocess.run([sys.executable, "-m", "transip", "data", "info", str(folder)], capture_output=True,
                         text=True, check=True)
    report = json.loads(out.stdout)
    assert report["structures"] == summary["frames"]
    assert set(report["splits"]) >= {"train", "val", "test_frames", "test_scaffolds", "test_clusters", "condensed"}
    assert report["kinds"] == summary["frames_by_kind"]
    assert report["charges"] == summary["charges"] and report["spins"] == summary["spins"]
    train_boxes = TINY["train_boxes"] * TINY["train_box_frames"]  # in the training pool, not held out
    assert report["splits_by_kind"]["condensed"] == {"box": summary["frames_by_kind"]["box"] - train_boxes}

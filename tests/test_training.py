"""The trainer: learning happens, the contrastive term is real, runs are deterministic and resumable."""

import pytest
import torch

from transip.data import collate
from transip.metrics import accuracy
from transip.train import TrainConfig, Trainer, train

TINY_MODEL = {"cutoff": 4.0, "d_model": 32, "num_heads": 4, "num_layers": 2, "edge_hidden": 16, "num_rbf": 8}


def config(small_dataset, tmp_path, **overrides):
    values = dict(data=str(small_dataset), output=str(tmp_path / "run"), epochs=2, batch_size=8,
                  warmup_steps=5, lr=3e-3, val_structures=40, equivariance_structures=4,
                  equivariance_rotations=2, progress=False, model=TINY_MODEL, test_molecule_fraction=0.15)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.slow
def test_training_lowers_validation_force_error(small_dataset, tmp_path):
    trainer = Trainer(config(small_dataset, tmp_path, epochs=5, lr=5e-3))
    before = accuracy(trainer.model, trainer.val_set)["force_mae"]
    last = trainer.fit(log=lambda line: None)
    assert last["val_force_mae"] < 0.8 * before
    assert (tmp_path / "run" / "best.ckpt").exists() and (tmp_path / "run" / "learning_curves.png").exists()
    for key in ("val_energy_mae_per_atom", "val_force_cosine", "equivariance_force_relative",
                "equivariance_energy_abs", "seconds_per_step"):
        assert key in last and last[key] == last[key]  # present and not NaN


def _one_batch(trainer):
    return collate(trainer.train_set[:8], trainer.model.cutoff, trainer.dtype)


def test_contrastive_term_is_computed_and_trains_both_networks(small_dataset, tmp_path):
    trainer = Trainer(config(small_dataset, tmp_path, objective="transip", contrastive_weight=1.0))
    before = [p.detach().clone() for p in trainer.transform.parameters()]
    stats = trainer.train_step(_one_batch(trainer), torch.Generator().manual_seed(0))
    # InfoNCE over n atoms starts near log(n); it must be a real positive number, not a switched-off zero.
    assert stats["contrastive_loss"] > 0.1
    moved = [not torch.equal(a, p) for a, p in zip(before, trainer.transform.parameters())]
    assert all(moved), "the transformation network was not updated by the contrastive term"


def test_contrastive_term_reaches_the_model_and_is_absent_for_baselines(small_dataset, tmp_path):
    from transip.data import evaluate_batch
    from transip.model import random_rotation
    from transip.train import contrastive_loss

    trainer = Trainer(config(small_dataset, tmp_path))
    batch = _one_batch(trainer)
    rotation = random_rotation(torch.Generator().manual_seed(1), trainer.dtype)
    out = evaluate_batch(trainer.model, batch, create_graph=True)
    out_rot = evaluate_batch(trainer.model, batch.rotated(rotation), create_graph=True)
    loss = contrastive_loss(trainer.transform, out["latent"], out_rot["latent"], rotation, 0.1, 256,
                            torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, list(trainer.model.blocks.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    baseline = Trainer(config(small_dataset, tmp_path, objective="augment"))
    stats = baseline.train_step(_one_batch(baseline), torch.Generator().manual_seed(0))
    assert stats["contrastive_loss"] == 0.0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in baseline.transform.parameters())


def test_training_is_deterministic_and_resume_continues_exactly(small_dataset, tmp_path):
    full = config(small_dataset, tmp_path / "a", epochs=2)
    train(full)
    interrupted = config(small_dataset, tmp_path / "b", epochs=2)
    train(interrupted, stop_after_epoch=1)
    train(interrupted, resume=True)
    a = torch.load(tmp_path / "a" / "run" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "last.ckpt", weights_only=True)
    assert a["step"] == b["step"] > 0
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    assert a["history"][-1]["val_force_mae"] == b["history"][-1]["val_force_mae"]
    log = (tmp_path / "b" / "run" / "train.log").read_text()
    assert log.count("epoch   1 ") == 1 and log.count("epoch   2 ") == 1


def test_resume_refuses_a_different_objective(small_dataset, tmp_path):
    train(config(small_dataset, tmp_path, epochs=1))
    with pytest.raises(ValueError, match="objective"):
        train(config(small_dataset, tmp_path, epochs=2, objective="none"), resume=True)


def test_splits_hold_out_whole_molecules(small_dataset, tmp_path):
    trainer = Trainer(config(small_dataset, tmp_path))
    s = trainer.structures
    held = set(trainer.splits["held_out_molecules"])
    assert held and all(s[i].molecule_key in held for i in trainer.splits["test_molecules"])
    for split in ("train", "val", "test_frames"):
        assert not {s[i].molecule_key for i in trainer.splits[split]} & held
    frames = [set(trainer.splits[k]) for k in ("train", "val", "test_frames", "test_molecules")]
    assert sum(map(len, frames)) == len(s) and len(set().union(*frames)) == len(s)


def test_reference_energies_fit_the_composition(small_dataset, tmp_path):
    trainer = Trainer(config(small_dataset, tmp_path))
    m = trainer.model
    # The fitted offsets alone explain most of the total energy (xTB totals are hundreds of eV).
    species = m.species_of_z
    for s in trainer.train_set[:20]:
        ref = float(m.reference_energy[species[torch.from_numpy(s.numbers)]].sum()
                    + m.charge_reference[s.charge + m.max_abs_charge] + m.spin_reference[s.spin - 1])
        assert abs(ref - s.energy) < 0.02 * abs(s.energy)

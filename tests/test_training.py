"""The trainer: learning happens, the contrastive term is real, runs are deterministic and resumable, and the
recipe (weight EMA, plateau schedule, wall-clock budget) does what its fields say."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transip.checkpoint import load_checkpoint, save_checkpoint
from transip.data import collate
from transip.metrics import accuracy
from transip.train import LearningRate, TrainConfig, Trainer, train

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = {"cutoff": 4.0, "d_model": 32, "num_heads": 4, "num_layers": 2, "edge_hidden": 16, "num_rbf": 8}


def config(small_dataset, tmp_path, **overrides):
    values = dict(data=str(small_dataset), output=str(tmp_path / "run"), epochs=2, batch_size=8,
                  warmup_steps=5, lr=3e-3, val_structures=40, equivariance_structures=4,
                  equivariance_rotations=2, progress=False, model=TINY_MODEL, test_molecule_fraction=0.15)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second thread gains nothing, and on a busy machine (a data job on the other
    core) oversubscribed threads made each step ~100x slower. Restored afterwards: torch's count is global."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(small_dataset, tmp_path, **overrides):
    """Two steps per epoch and a small validation: for tests of the recipe's bookkeeping, not of learning."""
    values = dict(max_train_structures=16, batch_size=8, warmup_steps=1, val_structures=8,
                  equivariance_structures=2, equivariance_rotations=1)
    return config(small_dataset, tmp_path, **{**values, **overrides})


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


def test_wall_frames_shift_neither_the_baselines_nor_the_scale(small_dataset, tmp_path):
    """Frames pushed onto the repulsive wall (forces of hundreds of eV/A) are left out of the reference-energy
    fit and the force scale: adding them changes neither."""
    import dataclasses as dc

    from transip.model import ModelConfig, TransIP
    from transip.train import fit_reference_energies

    trainer = Trainer(config(small_dataset, tmp_path))
    plain = trainer.train_set[:60]
    wall = [dc.replace(s, kind="wall", energy=s.energy + 50.0, forces=s.forces * 300.0) for s in plain[:10]]
    fitted = []
    for structures in (plain, plain + wall):
        model = TransIP(ModelConfig(elements=trainer.model.config.elements)).double()
        fit_reference_energies(model, structures)
        fitted.append((model.reference_energy.clone(), model.energy_scale.clone()))
    assert torch.equal(fitted[0][0], fitted[1][0]) and torch.equal(fitted[0][1], fitted[1][1])


# ------------------------------------------------------------------------------------------------ the recipe
def _parameters(module):
    return [p.detach().clone() for p in module.parameters()]


def test_ema_is_the_hand_computed_average_and_is_what_is_validated_and_saved(small_dataset, tmp_path):
    # decay 0.2 with the (1 + n) / (10 + n) ramp: 0.1, 0.18, then capped at 0.2, so both regimes are checked.
    trainer = Trainer(config(small_dataset, tmp_path, dtype="float64", ema_decay=0.2, contrastive_weight=1.0))
    expected = _parameters(trainer.networks)
    for n in range(4):
        trainer.train_step(collate(trainer.train_set[8 * n:8 * n + 8], trainer.model.cutoff, trainer.dtype),
                           torch.Generator().manual_seed(n))
        decay = min(0.2, (1 + n) / (10 + n))
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, _parameters(trainer.networks))]
    averaged = _parameters(trainer.ema.module)
    for e, a in zip(expected, averaged):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
    assert max((a - p).abs().max() for a, p in zip(averaged, trainer.networks.parameters())) > 1e-4
    transform = list(trainer.transform.parameters())[0]
    assert not torch.equal(list(trainer.ema.module["transform"].parameters())[0], transform)
    for a, b in zip(trainer.ema.module.buffers(), trainer.networks.buffers()):  # fitted, not averaged
        assert torch.equal(a, b)

    trainer.val_set = trainer.val_set[:6]
    val = trainer.validate()["val_force_mae"]
    assert val == accuracy(trainer.ema.module["model"], trainer.val_set)["force_mae"]
    assert val != accuracy(trainer.model, trainer.val_set)["force_mae"]
    payload = trainer.payload()  # model_state, what model_from_checkpoint and export read, is the EMA
    for name, value in trainer.ema.module["model"].state_dict().items():
        assert torch.equal(payload["model_state"][name], value), name
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(payload["raw_model_state"][name], value), name
    assert payload["ema_updates"] == 4


def test_plateau_schedule_cuts_lr_exactly_when_validation_stalls_and_ends_at_the_floor(tmp_path):
    c = TrainConfig(data="unused", output=str(tmp_path), lr=1e-3, warmup_steps=10, lr_schedule="plateau",
                    plateau_patience=2, plateau_factor=0.5, plateau_threshold=0.1, lr_final_fraction=0.2)
    schedule = LearningRate(c, total_steps=1000)
    assert schedule.at(0) == pytest.approx(1e-4) and schedule.at(9) == schedule.at(10) == schedule.at(999) == 1e-3
    schedule.observe(1.0, step=5)
    schedule.observe(1.0, step=8)  # a stall during warmup does not count
    assert schedule.stalled == 0
    # (metric, lr scale after it): improvements must be a 10 % relative drop from the best so far.
    sequence = [(0.95, 1.0), (0.85, 1.0), (0.80, 1.0), (0.79, 0.5), (0.70, 0.5), (0.70, 0.5), (0.70, 0.25),
                (0.60, 0.25), (0.60, 0.25), (0.60, 0.125)]
    for epoch, (metric, scale) in enumerate(sequence):
        assert not schedule.exhausted
        schedule.observe(metric, step=20 + 10 * epoch)
        assert schedule.scale == scale, (epoch, metric)
        assert schedule.at(500) == pytest.approx(1e-3 * scale)
    assert schedule.exhausted  # 0.125 < lr_final_fraction 0.2
    restored = LearningRate(c, total_steps=1000)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict() and restored.exhausted


def test_cosine_schedule_is_the_lambda_lr_it_replaced(tmp_path):
    from transip.train import _lr_factor

    c = TrainConfig(data="unused", output=str(tmp_path), lr=3e-3, warmup_steps=7, lr_final_fraction=0.05)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=c.lr)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, 7, 60, 0.05))
    schedule = LearningRate(c, total_steps=60)
    for step in range(70):
        assert schedule.at(step) == lambda_lr.get_last_lr()[0], step  # bit for bit: old runs train the same
        optimizer.step()
        lambda_lr.step()
    schedule.observe(10.0, 60)
    assert not schedule.exhausted and schedule.scale == 1.0  # cosine ignores validation


def test_budget_schedule_decays_over_the_spent_budget_and_needs_one(tmp_path):
    from transip.train import _cosine

    c = TrainConfig(data="unused", output=str(tmp_path), lr=2e-3, warmup_steps=10, lr_schedule="budget",
                    max_hours=0.5, lr_final_fraction=0.05)
    schedule = LearningRate(c, total_steps=100)
    assert schedule.at(0, 0.3) == pytest.approx(2e-4)  # warmup as the other schedules, whatever was spent
    assert schedule.at(10, 0.0) == 2e-3 and schedule.at(10 ** 6, 0.0) == 2e-3  # steps alone do not decay it
    assert schedule.at(50, 0.5) == pytest.approx(2e-3 * (0.05 + 0.95 * 0.5))  # half the budget: half way down
    assert schedule.at(50, 1.0) == schedule.at(50, 3.0) == pytest.approx(1e-4)  # the floor once it is spent
    assert all(_cosine(a, 0.05) > _cosine(b, 0.05) for a, b in zip([0, .2, .4, .6, .8], [.2, .4, .6, .8, 1]))
    schedule.observe(10.0, 60)
    assert not schedule.exhausted and schedule.scale == 1.0  # validation does not move it
    with pytest.raises(ValueError, match="max_hours"):
        TrainConfig(data="unused", output=str(tmp_path), lr_schedule="budget")


def test_budget_schedule_reaches_the_floor_as_the_cpu_budget_runs_out(small_dataset, tmp_path, monkeypatch):
    import transip.train as train_module

    # A CPU clock that advances 90 s per reading: the budget of 0.1 h (360 s) is spent within the first epoch.
    ticks = iter(range(0, 10 ** 7, 90))
    monkeypatch.setattr(train_module.time, "process_time", lambda: float(next(ticks)))
    c = tiny(small_dataset, tmp_path, epochs=3, lr_schedule="budget", max_hours=0.1, budget_clock="cpu",
             warmup_steps=1, lr_final_fraction=0.1)
    trainer = Trainer(c)
    seen = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a: (seen.append(trainer.lr_now()), step(*a))[1])
    trainer.fit(log=lambda line: None)
    assert trainer.epoch == 1 and trainer.stop_reason().startswith("the 0.1 h cpu budget is spent")
    assert seen[0] > seen[-1] and seen[-1] == pytest.approx(c.lr * 0.1)  # it fell to the floor as the budget ran out
    assert all(a >= b for a, b in zip(seen, seen[1:]))


def test_plateau_training_stops_at_the_lr_floor_before_epochs(small_dataset, tmp_path):
    # threshold 0.99: only the first epoch counts as an improvement, so every later one cuts lr by half.
    c = tiny(small_dataset, tmp_path, epochs=10, lr_schedule="plateau", plateau_patience=1, plateau_factor=0.5,
             plateau_threshold=0.99, lr_final_fraction=0.3)
    train(c)
    payload = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert [r["lr"] for r in payload["history"]] == pytest.approx([c.lr, c.lr, c.lr / 2])
    assert payload["scheduler_state"]["scale"] == 0.25 and payload["epoch"] == 3
    assert "stopped after epoch 3 of at most 10: the plateau schedule" in (tmp_path / "run" / "train.log").read_text()


def test_max_hours_stops_training_and_the_budget_carries_across_resumes(small_dataset, tmp_path):
    c = tiny(small_dataset, tmp_path, epochs=3, max_hours=1e-9)
    train(c)
    first = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert first["epoch"] == 1 and first["train_seconds"] > 0
    assert "h wall budget is spent" in (tmp_path / "run" / "train.log").read_text()
    train(c, resume=True)  # the spent budget is in the checkpoint: nothing more to do
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["epoch"] == 1
    train(dataclasses.replace(c, max_hours=1.0), resume=True)  # a larger budget continues where it stopped
    second = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert second["epoch"] == 3 and second["train_seconds"] > first["train_seconds"]
    assert second["history"][-1]["hours"] == pytest.approx(second["train_seconds"] / 3600)
    assert second["history"][-1]["cpu_hours"] == pytest.approx(second["train_cpu_seconds"] / 3600)


def test_cpu_budget_counts_process_time_not_elapsed_time(small_dataset, tmp_path, monkeypatch):
    import transip.train as train_module

    # A clock that shows the epochs took 1 h of CPU time but no elapsed time: only the cpu budget stops them.
    ticks = iter(range(0, 10 ** 6, 3600))
    monkeypatch.setattr(train_module.time, "process_time", lambda: float(next(ticks)))
    train(tiny(small_dataset, tmp_path / "wall", epochs=2, max_hours=0.5))
    assert load_checkpoint(tmp_path / "wall" / "run" / "last.ckpt")["epoch"] == 2
    train(tiny(small_dataset, tmp_path / "cpu", epochs=2, max_hours=0.5, budget_clock="cpu"))
    stopped = load_checkpoint(tmp_path / "cpu" / "run" / "last.ckpt")
    assert stopped["epoch"] == 1 and stopped["train_cpu_seconds"] == 3600.0
    assert "the 0.5 h cpu budget is spent (1.000 h)" in (tmp_path / "cpu" / "run" / "train.log").read_text()


def test_resume_with_ema_and_plateau_continues_exactly(small_dataset, tmp_path):
    recipe = dict(epochs=4, ema_decay=0.5, lr_schedule="plateau", plateau_patience=1, plateau_factor=0.5,
                  plateau_threshold=0.99, lr_final_fraction=0.01, contrastive_weight=1.0)
    train(tiny(small_dataset, tmp_path / "a", **recipe))
    interrupted = tiny(small_dataset, tmp_path / "b", **recipe)
    train(interrupted, stop_after_epoch=2)
    assert load_checkpoint(tmp_path / "b" / "run" / "last.ckpt")["scheduler_state"]["scale"] == 0.5  # cut before
    train(interrupted, resume=True)
    a = load_checkpoint(tmp_path / "a" / "run" / "last.ckpt")
    b = load_checkpoint(tmp_path / "b" / "run" / "last.ckpt")
    assert a["step"] == b["step"] == 8 and a["ema_updates"] == b["ema_updates"] == 8
    assert [r["lr"] for r in a["history"]] == [r["lr"] for r in b["history"]] == pytest.approx(
        [interrupted.lr * f for f in (1, 1, 0.5, 0.25)])
    assert a["scheduler_state"] == b["scheduler_state"]
    for key in ("model_state", "transform_state", "raw_model_state", "raw_transform_state"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), f"{key} {name}"
    assert not all(torch.equal(a["model_state"][k], v) for k, v in a["raw_model_state"].items())
    assert a["history"][-1]["val_force_mae"] == b["history"][-1]["val_force_mae"]


def test_old_configs_and_checkpoints_load_with_the_defaults_that_reproduce_them(small_dataset, tmp_path):
    shipped = json.loads((ROOT / "configs" / "shipped_model.json").read_text())
    old_payload = load_checkpoint(ROOT / "models" / "transip-xtb-small" / "best.ckpt")
    for values in (shipped | {"output": "unused"}, old_payload["train_config"]):
        c = TrainConfig(**values)
        assert (c.lr_schedule, c.ema_decay, c.max_hours) == ("cosine", 0.0, None)
    # The shipped config names the old values of what newer defaults changed: the speed settings (round-off only)
    # and the model's repulsion and block geometry (which change the network).
    c = TrainConfig(**shipped | {"output": "unused"})
    assert (c.kernel, c.flush_denormals, c.keep_freed_memory, c.joint_views) == ("reference", False, False, False)
    assert (c.model["repulsion"], c.model["block_geometry"]) == ("none", False)
    from transip.checkpoint import config_of

    assert c.model == {k: v for k, v in config_of(old_payload).items() if k in c.model}  # the shipped network

    # A checkpoint written before the recipe: no EMA or budget keys, LambdaLR scheduler state.
    c = tiny(small_dataset, tmp_path)
    trainer = Trainer(c)
    trainer.step = 3
    payload = {k: v for k, v in trainer.payload().items() if k != "train_seconds"}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    payload["scheduler_state"] = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict()
    new_fields = {"lr_schedule", "plateau_patience", "plateau_factor", "plateau_threshold", "ema_decay", "max_hours",
                  "extra_data", "extra_data_repeats"}
    payload["train_config"] = {k: v for k, v in payload["train_config"].items() if k not in new_fields}
    save_checkpoint(tmp_path / "old.ckpt", payload)
    resumed = Trainer(c)
    resumed.resume(tmp_path / "old.ckpt")
    assert resumed.step == 3 and resumed.train_seconds == 0.0 and resumed.schedule.at(3) == trainer.schedule.at(3)
    with pytest.raises(ValueError, match="ema_decay"):  # its weights are raw: an EMA run cannot continue it
        Trainer(tiny(small_dataset, tmp_path, ema_decay=0.9)).resume(tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="extra_data"):  # trained without extra data: a run that adds some
        Trainer(tiny(small_dataset, tmp_path, extra_data=[str(small_dataset)])).resume(tmp_path / "old.ckpt")


@pytest.mark.parametrize("field, value", [("lr_schedule", "step"), ("ema_decay", 1.0), ("plateau_factor", 1.0),
                                          ("plateau_threshold", 1.0), ("plateau_patience", 0), ("max_hours", 0.0),
                                          ("budget_clock", "gpu")])
def test_recipe_fields_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(data="unused", output="unused", **{field: value})


@pytest.mark.skipif(not __import__("transip").native.available(), reason="native ops not built")
def test_training_on_the_fused_kernel_follows_the_reference_path(small_dataset, tmp_path):
    """The fused path (the native attention, differentiable twice, and the per-edge work with hand-derived second
    derivatives) trains with the force loss: in float64 the first steps' losses and the weights after them equal
    the reference path's (plain autograd) to round-off."""
    runs = {}
    for kernel in ("reference", "fused"):
        trainer = Trainer(tiny(small_dataset, tmp_path / kernel, kernel=kernel, dtype="float64",
                               model={**TINY_MODEL, "repulsion": "zbl", "block_geometry": True}))
        assert trainer.model.blocks[0].attention.kernel == kernel
        assert trainer.model.edge_encoder.kernel == kernel  # fused: TrainingEdgeEncoder, derivatives by hand
        generator = torch.Generator().manual_seed(5)
        losses = [trainer.train_step(collate(trainer.train_set[8 * i:8 * i + 8], trainer.model.cutoff,
                                             trainer.dtype), generator)["loss"] for i in range(2)]
        runs[kernel] = losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}
    (reference_losses, reference_state), (fused_losses, fused_state) = runs["reference"], runs["fused"]
    np.testing.assert_allclose(fused_losses, reference_losses, rtol=1e-10)
    for key, value in reference_state.items():
        torch.testing.assert_close(fused_state[key], value, rtol=1e-8, atol=1e-10, msg=key)
    assert any(not torch.equal(fused_state[k], v) for k, v in reference_state.items())  # round-off differs


def test_huber_force_loss_is_squared_below_delta_and_linear_above():
    from transip.train import supervised_loss

    class Fake:
        energy = torch.tensor([0.0])
        num_atoms = torch.tensor([1])
        forces = torch.zeros(1, 3, dtype=torch.float64)

    out = {"energy": torch.tensor([0.0]), "forces": torch.tensor([[0.3, -2.0, 5.0]], dtype=torch.float64)}
    mse = supervised_loss(out, Fake, TrainConfig(data="-", output="-"))[2]
    huber = supervised_loss(out, Fake, TrainConfig(data="-", output="-", force_loss="huber", huber_delta=1.0))[2]
    assert float(mse) == pytest.approx((0.09 + 4.0 + 25.0) / 3)
    assert float(huber) == pytest.approx((0.09 + (2 * 2.0 - 1) + (2 * 5.0 - 1)) / 3)  # 2 delta |d| - delta^2 above
    with pytest.raises(ValueError, match="force_loss must be mse or huber"):
        TrainConfig(data="-", output="-", force_loss="l1")


@pytest.mark.parametrize("flush", [True, False])
def test_trainer_flushes_denormals_as_configured(small_dataset, tmp_path, flush):
    """The radial basis's far tails are denormal in float32 and slow every product with them; the trainer
    flushes them to zero (TrainConfig.flush_denormals), and leaves them when asked to."""
    Trainer(tiny(small_dataset, tmp_path, flush_denormals=flush))
    denormal = torch.tensor([1e-40], dtype=torch.float32)
    try:
        assert bool((denormal * 1.0 == 0.0).all()) == flush
    finally:
        torch.set_flush_denormal(False)


def test_joint_views_give_the_same_losses_as_separate_calls(small_dataset, tmp_path):
    """Both views of the learned-equivariance objective in one model call: the same losses as two calls."""
    losses = {}
    for joint in (False, True):
        trainer = Trainer(tiny(small_dataset, tmp_path / str(joint), dtype="float64", joint_views=joint))
        generator = torch.Generator().manual_seed(3)
        steps = [trainer.train_step(collate(trainer.train_set[8 * i:8 * i + 8], trainer.model.cutoff,
                                            trainer.dtype), generator) for i in range(2)]
        losses[joint] = [[step[key] for key in sorted(step)] for step in steps]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-10)


def test_extra_data_trains_beside_the_dataset_without_changing_its_splits(small_dataset, tmp_path):
    import ase.io

    extra = tmp_path / "boxes.extxyz"
    frames = ase.io.read(small_dataset, ":3")
    for atoms in frames:  # an element the main dataset lacks: the model must know it
        atoms.numbers[0] = 9
    ase.io.write(extra, frames)
    plain = Trainer(tiny(small_dataset, tmp_path))
    both = Trainer(tiny(small_dataset, tmp_path / "b", extra_data=[str(extra)], extra_data_repeats=2))
    assert both.splits == plain.splits and len(both.val_set) == len(plain.val_set)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(both.val_set, plain.val_set))
    assert len(both.train_set) == len(plain.train_set) + 6
    assert 9 in both.model.config.elements and 9 not in plain.model.config.elements
    assert "F" in both.trained_domain["elements"]
    provenance = both.payload()["provenance"]
    assert list(provenance["extra_datasets"]) == [str(extra)] and provenance["train_structures"] == len(both.train_set)
    with pytest.raises(ValueError, match="extra_data_repeats must be at least 1, got 0"):
        tiny(small_dataset, tmp_path, extra_data=[str(extra)], extra_data_repeats=0)

"""Training with the learned-equivariance objective (TransIP) and the `augment` / `none` baselines.

objective = "transip": per batch draw a uniform rotation R, run the model on x and Rx, energy + force losses
    on both views, plus an InfoNCE term that makes T(h_i(x), R) closest to h_i(Rx) among the batch's atoms.
objective = "augment": the same two views and losses, without the contrastive term (compute-matched
    random-rotation augmentation).
objective = "none": the unrotated view only.

The recipe around it (every choice a TrainConfig field, documented in docs/training.md): an exponential moving
average of the weights for validation and the saved model (`ema_decay`), the cosine or the validation-driven
plateau learning-rate schedule or the cosine over the time budget (`lr_schedule`), and a time budget (`max_hours`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import native
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Batch, Structure, collate, evaluate_batch, file_digest, read_structures, split_indices
from .domain import domain_of
from .metrics import accuracy, equivariance_error, spread_subset
from .model import ModelConfig, TransformationNetwork, TransIP, count_parameters, random_rotation

OBJECTIVES = ("transip", "augment", "none")
LR_SCHEDULES = ("cosine", "plateau", "budget")
# Fields a resumed run must share with its checkpoint: they fix the data order, the networks, the saved state's
# layout (EMA or not) or the meaning of the schedule's state.
RESUME_MUST_MATCH = ("objective", "seed", "data", "extra_data", "extra_data_repeats", "batch_size",
                     "max_train_structures", "model", "ema_decay", "lr_schedule")


@dataclasses.dataclass
class TrainConfig:
    data: str
    output: str
    # Datasets every frame of which is for training, beside `data` (whose splits, validation and held-out sets
    # are unchanged by them): e.g. periodic boxes (`transip data generate --recipe condensed`). Each of their
    # frames appears `extra_data_repeats` times per epoch.
    extra_data: List[str] = dataclasses.field(default_factory=list)
    extra_data_repeats: int = 1
    objective: str = "transip"
    seed: int = 0
    epochs: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    lr_final_fraction: float = 0.05  # cosine, budget: decay to lr * this; plateau: stop once lr falls below lr * this
    warmup_steps: int = 200
    # "cosine" over `epochs`; "plateau": cut when validation stalls; "budget": cosine over the max_hours budget
    # (by its clock), so a run with a time budget spends all of it and ends at the low rate whatever its speed.
    lr_schedule: str = "cosine"
    plateau_patience: int = 3  # plateau: epochs without improvement before lr is cut
    plateau_factor: float = 0.5  # plateau: lr multiplier at each cut
    plateau_threshold: float = 0.01  # plateau: an improvement is a relative drop of val force MAE by this much
    ema_decay: float = 0.0  # weight EMA for validation and the saved model; 0 keeps the raw weights
    max_hours: Optional[float] = None  # time budget: stop after the epoch that exceeds it (across resumes)
    # The clock max_hours counts: "wall" (elapsed time), or "cpu" (this process's CPU time, all threads). On a
    # machine shared with other work, "cpu" gives runs that share a budget the same compute however busy it is.
    budget_clock: str = "wall"
    weight_decay: float = 0.0
    energy_weight: float = 1.0  # on (energy error / atoms)^2, eV^2
    force_weight: float = 1.0  # on force component error^2, (eV/A)^2
    force_loss: str = "mse"  # "mse", or "huber": squared below huber_delta, linear above (the repulsive wall)
    huber_delta: float = 1.0  # eV/A
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    contrastive_max_atoms: int = 256
    max_train_structures: Optional[int] = None  # training-set size (a seeded subset of the train split)
    val_structures: int = 400  # validation subset evaluated each epoch
    equivariance_structures: int = 32
    equivariance_rotations: int = 4
    split_seed: int = 0
    test_molecule_fraction: float = 0.1
    val_fraction: float = 0.1
    test_frame_fraction: float = 0.1
    dtype: str = "float32"
    # The per-edge work's implementation (transip.native): "fused" runs the attention and the edge encoder on
    # native ops that are differentiable twice, as the force loss needs, and the block geometry and repulsion
    # with hand-derived second derivatives (transip.analytic); "reference" is plain PyTorch autograd throughout;
    # "auto" is fused when the native library is loaded. The same function either way (equal to round-off).
    kernel: str = "auto"
    threads: int = 0  # torch threads; 0 leaves the default
    # Flush denormal floats to zero in this process (torch.set_flush_denormal): every operation on a denormal
    # takes the CPU's slow path. The radial basis is 0 where it would be denormal (transip.analytic.exp_floor);
    # softmax tails and products of small gradients can still produce them. Values below 1.2e-38 (float32)
    # become 0; nothing else changes. This and the next two fields together:
    # benchmarks/training_speed.py's middle row.
    flush_denormals: bool = True
    # Keep freed memory in this process's heap (transip.native.keep_freed_memory, glibc): every step allocates and
    # frees the same large per-edge tensors, and handing them back to the system makes each step pay the page
    # faults again. Process-wide; needs the native library.
    keep_freed_memory: bool = True
    # Evaluate the batch and its rotated copy (objectives transip and augment) in one model call rather than
    # two: the same losses, half the per-op overhead.
    joint_views: bool = True
    progress: bool = True
    model: Dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields except elements

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.force_loss not in ("mse", "huber") or self.huber_delta <= 0:
            raise ValueError(f"force_loss must be mse or huber with a positive huber_delta, got {self.force_loss!r} "
                             f"and {self.huber_delta}")
        if self.kernel not in ("reference", "fused", "auto"):
            raise ValueError(f"kernel must be reference, fused or auto, got {self.kernel!r}")
        if isinstance(self.extra_data, str):
            self.extra_data = [self.extra_data]
        if self.extra_data_repeats < 1:
            raise ValueError(f"extra_data_repeats must be at least 1, got {self.extra_data_repeats}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be at least 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables it), got {self.ema_decay}")
        if self.plateau_patience < 1 or not 0.0 < self.plateau_factor < 1.0 or not 0.0 <= self.plateau_threshold < 1.0:
            raise ValueError("plateau_patience must be at least 1, plateau_factor in (0, 1) and plateau_threshold "
                             "in [0, 1)")
        if self.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"budget_clock must be wall or cpu, got {self.budget_clock!r}")
        if self.max_hours is not None and self.max_hours <= 0:
            raise ValueError(f"max_hours must be positive (or None for no budget), got {self.max_hours}")
        if self.lr_schedule == "budget" and self.max_hours is None:
            raise ValueError("lr_schedule budget decays lr over the time budget: set max_hours (in hours), or use "
                             "lr_schedule cosine to decay over `epochs`")


def training_subset(train: Sequence[int], size: Optional[int], seed: int) -> List[int]:
    """The training-set indices a run with `max_train_structures=size` and `seed` uses: a seeded subset of the
    train split (all of it when size is None), in dataset order."""
    if size is None:
        return list(train)
    return sorted(train[i] for i in np.random.default_rng(seed).permutation(len(train))[:size])


def fit_reference_energies(model: TransIP, structures: Sequence[Structure]) -> None:
    """Least-squares per-element energies plus per-charge and per-spin offsets; the residual force RMS sets
    the scale of the learned part. Frames on the repulsive wall (kind "wall") are left out of both: tens of eV
    above equilibrium and forces of hundreds of eV/A, they would shift every atom's baseline and inflate the
    learned part's scale for the equilibrium chemistry that makes up the rest."""
    near_equilibrium = [s for s in structures if s.kind != "wall"]
    structures = near_equilibrium or structures
    species = model.species_of_z.numpy()
    num_species = len(model.config.elements)
    q_max, m_max = model.max_abs_charge, model.max_multiplicity
    rows = []
    for s in structures:
        counts = np.bincount(species[s.numbers], minlength=num_species).astype(float)
        charge = np.zeros(2 * q_max + 1)
        charge[s.charge + q_max] = 1.0
        spin = np.zeros(m_max)
        spin[s.spin - 1] = 1.0
        rows.append(np.concatenate([counts, charge, spin]))
    design = np.array(rows)
    # Neutral singlet is the baseline: its offsets are zero, so drop those two columns.
    keep = np.ones(design.shape[1], bool)
    keep[num_species + q_max] = False
    keep[num_species + 2 * q_max + 1] = False
    energies = np.array([s.energy for s in structures])
    coef = np.zeros(design.shape[1])
    coef[keep] = np.linalg.lstsq(design[:, keep], energies, rcond=None)[0]
    with torch.no_grad():
        model.reference_energy.copy_(torch.from_numpy(coef[:num_species]))
        model.charge_reference.copy_(torch.from_numpy(coef[num_species:num_species + 2 * q_max + 1]))
        model.spin_reference.copy_(torch.from_numpy(coef[num_species + 2 * q_max + 1:]))
        force_rms = np.sqrt(np.mean(np.concatenate([s.forces for s in structures]) ** 2))
        model.energy_scale.fill_(float(force_rms))


def contrastive_loss(transform: TransformationNetwork, latent: torch.Tensor, latent_rotated: torch.Tensor,
                     rotation: torch.Tensor, temperature: float, max_atoms: int,
                     generator: torch.Generator) -> torch.Tensor:
    """InfoNCE: T(h_i(x), R) must be closer (cosine) to h_i(Rx) than to h_k(Rx) of any other atom k."""
    n = latent.shape[0]
    if n > max_atoms:
        pick = torch.randperm(n, generator=generator)[:max_atoms]
        latent, latent_rotated = latent[pick], latent_rotated[pick]
    predicted = F.normalize(transform(latent, rotation), dim=1)
    target = F.normalize(latent_rotated, dim=1)
    logits = predicted @ target.T / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0]))


def supervised_loss(out: Dict[str, torch.Tensor], batch: Batch, config: TrainConfig):
    assert batch.energy is not None and batch.forces is not None
    energy = (((out["energy"] - batch.energy) / batch.num_atoms) ** 2).mean()
    if config.force_loss == "huber":
        # Quadratic below huber_delta, linear above (scaled so that it equals the squared error there): one
        # atom on the repulsive wall, with a force of hundreds of eV/A, no longer outweighs whole molecules.
        forces = 2 * F.huber_loss(out["forces"], batch.forces, delta=config.huber_delta)
    else:
        forces = ((out["forces"] - batch.forces) ** 2).mean()
    return config.energy_weight * energy + config.force_weight * forces, energy, forces


class LearningRate:
    """The learning rate of every step. Every schedule warms up linearly over `warmup_steps`; then "cosine"
    decays to lr * lr_final_fraction at the end of `epochs`; "budget" makes the same decay over the fraction of
    the max_hours budget spent, so that it reaches the low rate as the budget runs out however many steps that
    is; and "plateau" holds lr and multiplies it by `plateau_factor` whenever the validation force MAE has not
    improved for `plateau_patience` epochs, so a run keeps a high rate for as long as validation still falls and
    `epochs` is only a ceiling."""

    def __init__(self, config: TrainConfig, total_steps: int):
        self.config, self.total_steps = config, total_steps
        self.scale = 1.0  # product of the plateau cuts so far
        self.best = float("inf")  # best validation force MAE seen
        self.stalled = 0  # epochs since the last improvement (or the last cut)

    def at(self, step: int, budget_spent: float = 0.0) -> float:
        """lr at `step`; `budget_spent` is the fraction of the time budget used so far (schedule "budget")."""
        c = self.config
        if c.lr_schedule == "cosine":
            return c.lr * _lr_factor(step, c.warmup_steps, self.total_steps, c.lr_final_fraction)
        if c.lr_schedule == "budget":
            if step < c.warmup_steps:
                return c.lr * (step + 1) / c.warmup_steps
            return c.lr * _cosine(min(1.0, budget_spent), c.lr_final_fraction)
        warmup = (step + 1) / c.warmup_steps if step < c.warmup_steps else 1.0
        return c.lr * warmup * self.scale

    def observe(self, val_force_mae: float, step: int) -> None:
        """Once per epoch, after validation; `step` is the number of steps taken so far."""
        c = self.config
        if c.lr_schedule != "plateau":
            return
        if val_force_mae < self.best * (1.0 - c.plateau_threshold):  # NaN never improves
            self.best, self.stalled = val_force_mae, 0
            return
        if step < c.warmup_steps:  # the rate is still rising: a stall here says nothing about the held rate
            return
        self.stalled += 1
        if self.stalled >= c.plateau_patience:
            self.scale *= c.plateau_factor
            self.stalled = 0  # give the lower rate a full patience before judging it

    @property
    def exhausted(self) -> bool:
        """The plateau schedule has cut lr below lr * lr_final_fraction: further epochs would barely move."""
        return self.config.lr_schedule == "plateau" and self.scale < self.config.lr_final_fraction

    def state_dict(self) -> Dict[str, Any]:
        return {"lr_schedule": self.config.lr_schedule, "scale": self.scale, "best": self.best,
                "stalled": self.stalled}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # Checkpoints before this class hold a LambdaLR state: cosine, whose rate depends on the step alone.
        if "lr_schedule" not in state:
            return
        self.scale, self.best, self.stalled = state["scale"], state["best"], state["stalled"]


class WeightAverage:
    """Exponential moving average of a module's parameters, updated after every optimiser step. Buffers (the
    fitted reference energies, constant tables) are not trained, so they are copied rather than averaged."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        # A fixed decay would keep the random initial weights in the average for ~1/(1-decay) steps, which is
        # most of a short run; ramping it as (1 + n) / (10 + n) (TensorFlow's num_updates) forgets them early.
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, source: torch.nn.Module) -> None:
        # One foreach call per kind instead of two ops per tensor (each op's dispatch cost more than its work).
        torch._foreach_lerp_(list(self.module.parameters()), list(source.parameters()), 1.0 - self.current_decay())
        torch._foreach_copy_(list(self.module.buffers()), list(source.buffers()))
        self.updates += 1


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.output = Path(config.output)
        self.dtype = torch.float64 if config.dtype == "float64" else torch.float32
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.set_flush_denormal(config.flush_denormals)
        if config.keep_freed_memory and native.available():
            native.keep_freed_memory()
        structures = read_structures(config.data)
        self.splits = split_indices(structures, config.split_seed, config.test_molecule_fraction,
                                    config.val_fraction, config.test_frame_fraction)
        if not self.splits["train"]:
            raise ValueError(f"dataset {config.data}: the training split is empty ({len(structures)} structures)")
        train = training_subset(self.splits["train"], config.max_train_structures, config.seed)
        extra = [s for path in config.extra_data for s in read_structures(path)]
        self.train_set = [structures[i] for i in train] + extra * config.extra_data_repeats
        self.trained_domain = domain_of(self.train_set)
        val = self.splits["val"] or self.splits["test_frames"]
        val_pick = np.random.default_rng(config.seed + 1).permutation(len(val))[:config.val_structures]
        self.val_set = [structures[val[i]] for i in sorted(val_pick)]
        self.structures = structures
        self.dataset_sha256 = file_digest(config.data)  # once: checkpoints are written every epoch
        elements = sorted({int(z) for s in structures + extra for z in s.numbers})
        self.extra_sha256 = [file_digest(path) for path in config.extra_data]

        torch.manual_seed(config.seed)
        # The force loss differentiates the forces again (create_graph): only twice-differentiable ops may run.
        self.model = TransIP(ModelConfig(elements=elements, **config.model), kernel="reference").to(self.dtype)
        self.model.set_kernel(config.kernel, twice_differentiable=True)
        self.transform = TransformationNetwork(self.model.config.d_model).to(self.dtype)
        fit_reference_energies(self.model, self.train_set)
        self.model.to(self.dtype)
        # One module over both networks: one optimiser parameter order, one EMA over the pair.
        self.networks = torch.nn.ModuleDict({"model": self.model, "transform": self.transform})
        # fused: one kernel over all parameters, instead of a loop of small per-tensor (and scalar-tensor) ops.
        self.optimizer = torch.optim.AdamW(self.networks.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay, fused=True)
        self.ema = WeightAverage(self.networks, config.ema_decay) if config.ema_decay > 0 else None
        self.steps_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        self.schedule = LearningRate(config, self.steps_per_epoch * config.epochs)
        self.epoch, self.step, self.history = 0, 0, []
        self.best_force_mae = float("inf")
        self.train_seconds = 0.0  # wall clock spent in epochs, summed over resumes (the max_hours budget)
        self.train_cpu_seconds = 0.0  # the same epochs' process CPU time (budget_clock "cpu")
        self._epoch_clocks: Optional[Tuple[float, float]] = None  # (wall, cpu) at the start of the epoch under way

    @property
    def evaluated(self) -> torch.nn.ModuleDict:
        """The networks validated and saved as `model_state` / `transform_state`: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.networks

    # ------------------------------------------------------------------ state
    def payload(self) -> Dict[str, Any]:
        return {
            "model_config": dataclasses.asdict(self.model.config),
            # The weights to use (what model_from_checkpoint and export read): the EMA when there is one.
            "model_state": self.evaluated["model"].state_dict(),
            "transform_state": self.evaluated["transform"].state_dict(),
            **self._raw_state(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.schedule.state_dict(),
            "train_config": dataclasses.asdict(self.config),
            "epoch": self.epoch, "step": self.step, "history": self.history,
            "best_force_mae": self.best_force_mae, "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            "trained_domain": self.trained_domain,
            "splits": {k: v for k, v in self.splits.items()},
            "provenance": {"dataset": str(self.config.data), "dataset_sha256": self.dataset_sha256,
                           "extra_datasets": dict(zip(map(str, self.config.extra_data), self.extra_sha256)),
                           "objective": self.config.objective, "parameters": count_parameters(self.model),
                           "train_structures": len(self.train_set)},
        }

    def _raw_state(self) -> Dict[str, Any]:
        """With an EMA, the training weights it averages: resume needs them to continue exactly."""
        if self.ema is None:
            return {}
        return {"raw_model_state": self.model.state_dict(), "raw_transform_state": self.transform.state_dict(),
                "ema_updates": self.ema.updates}

    def resume(self, path) -> None:
        payload = load_checkpoint(path)
        saved = payload.get("train_config", {})
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(TrainConfig)}
        for key in RESUME_MUST_MATCH:
            # A checkpoint older than a field was trained with that field's default.
            if saved.get(key, defaults[key]) != getattr(self.config, key):
                raise ValueError(f"cannot resume from {path}: it was trained with {key}={saved.get(key)!r}, "
                                 f"this run asks for {getattr(self.config, key)!r}")
        if self.ema is not None:
            self.ema.module["model"].load_state_dict(payload["model_state"])
            self.ema.module["transform"].load_state_dict(payload["transform_state"])
            self.ema.updates = payload["ema_updates"]
        self.model.load_state_dict(payload.get("raw_model_state", payload["model_state"]))
        self.transform.load_state_dict(payload.get("raw_transform_state", payload["transform_state"]))
        self.optimizer.load_state_dict(payload["optimizer_state"])
        self.schedule.load_state_dict(payload["scheduler_state"])
        self.epoch, self.step, self.history = payload["epoch"], payload["step"], payload["history"]
        self.best_force_mae = payload["best_force_mae"]
        self.train_seconds = payload.get("train_seconds", 0.0)
        self.train_cpu_seconds = payload.get("train_cpu_seconds", 0.0)

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: Batch, rotation_generator: torch.Generator) -> Dict[str, float]:
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        contrast = torch.zeros((), dtype=self.dtype)
        if config.objective == "none":
            out = evaluate_batch(self.model, batch, create_graph=True)
            loss, e_loss, f_loss = supervised_loss(out, batch, config)
        else:
            rotation = random_rotation(rotation_generator, self.dtype)
            rotated = batch.rotated(rotation)
            out, out_rot = self.evaluate_views(batch, rotated)
            loss, e_loss, f_loss = supervised_loss(out, batch, config)
            loss_rot, e_rot, f_rot = supervised_loss(out_rot, rotated, config)
            loss, e_loss, f_loss = (loss + loss_rot) / 2, (e_loss + e_rot) / 2, (f_loss + f_rot) / 2
            if config.objective == "transip":
                contrast = contrastive_loss(self.transform, out["latent"], out_rot["latent"], rotation,
                                            config.contrastive_temperature, config.contrastive_max_atoms,
                                            rotation_generator)
                loss = loss + config.contrastive_weight * contrast
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_now()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.networks)
        self.step += 1
        return {"loss": loss.item(), "energy_loss": e_loss.item(), "force_loss": f_loss.item(),
                "contrastive_loss": contrast.item()}

    def evaluate_views(self, batch: Batch, rotated: Batch) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The model's outputs on a batch and on its rotated copy, with the graph for the force loss. With
        `joint_views` both go through one model call (twice the structures): the same numbers with half the
        per-op overhead, which dominates at these sizes."""
        if not self.config.joint_views:
            return (evaluate_batch(self.model, batch, create_graph=True),
                    evaluate_batch(self.model, rotated, create_graph=True))
        both = evaluate_batch(self.model, batch.joined(rotated), create_graph=True)
        n, b = batch.positions.shape[0], batch.num_structures
        first = {"energy": both["energy"][:b], "forces": both["forces"][:n], "latent": both["latent"][:n]}
        second = {"energy": both["energy"][b:], "forces": both["forces"][n:], "latent": both["latent"][n:]}
        return first, second

    def run_epoch(self) -> Dict[str, float]:
        from tqdm import tqdm

        config = self.config
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(
            config.seed * 100003 + self.epoch)).tolist()
        rotation_generator = torch.Generator().manual_seed(config.seed * 100019 + self.epoch + 7)
        self.model.train()
        sums: Dict[str, float] = {}
        start = time.perf_counter()
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{config.epochs}",
                   disable=not config.progress, leave=False)
        for b in bar:
            chunk = [self.train_set[i] for i in order[b * config.batch_size:(b + 1) * config.batch_size]]
            stats = self.train_step(collate(chunk, self.model.cutoff, self.dtype), rotation_generator)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
        seconds = time.perf_counter() - start
        result = {f"train_{k}": v / self.steps_per_epoch for k, v in sums.items()}
        result["seconds_per_step"] = seconds / self.steps_per_epoch
        return result

    def validate(self) -> Dict[str, float]:
        model = self.evaluated["model"].eval()
        val = {f"val_{k}": v for k, v in accuracy(model, self.val_set).items()}
        eq = equivariance_error(model, spread_subset(self.val_set, self.config.equivariance_structures),
                                self.config.equivariance_rotations, seed=self.config.seed)
        val.update({f"equivariance_{k}": v for k, v in eq.items()})
        return val

    def fit(self, log=print, stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
        """Train to `config.epochs` (or stop early after `stop_after_epoch`, as an interrupted run would)."""
        self.output.mkdir(parents=True, exist_ok=True)
        config = self.config
        if self.epoch == 0:
            log(f"objective={config.objective} train={len(self.train_set)} val={len(self.val_set)} "
                f"parameters={count_parameters(self.model)} steps/epoch={self.steps_per_epoch}")
        last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
        while self.epoch < last_epoch and self.stop_reason() is None:
            start, cpu_start = time.perf_counter(), time.process_time()
            self._epoch_clocks = (start, cpu_start)
            record = {"epoch": self.epoch + 1, "step": None, "lr": self.lr_now()}
            record.update(self.run_epoch())
            record.update(self.validate())
            self.train_seconds += time.perf_counter() - start
            self.train_cpu_seconds += time.process_time() - cpu_start
            self._epoch_clocks = None
            record["step"], record["hours"] = self.step, self.train_seconds / 3600
            record["cpu_hours"] = self.train_cpu_seconds / 3600
            self.epoch += 1
            self.history.append(record)
            self.schedule.observe(record["val_force_mae"], self.step)  # before saving: resume needs it
            log(format_record(record))
            if record["val_force_mae"] < self.best_force_mae:
                self.best_force_mae = record["val_force_mae"]
                save_checkpoint(self.output / "best.ckpt", self.payload())
            save_checkpoint(self.output / "last.ckpt", self.payload())
            plot_learning_curves(self.history, self.output / "learning_curves.png", config.objective)
        reason = self.stop_reason()
        if reason is not None and self.epoch < config.epochs:
            log(f"stopped after epoch {self.epoch} of at most {config.epochs}: {reason}")
        return self.history[-1] if self.history else {}

    def budget_seconds_spent(self) -> float:
        """Seconds of the max_hours budget's clock spent so far, the epoch under way included."""
        cpu = self.config.budget_clock == "cpu"
        spent = self.train_cpu_seconds if cpu else self.train_seconds
        if self._epoch_clocks is not None:
            wall_start, cpu_start = self._epoch_clocks
            spent += time.process_time() - cpu_start if cpu else time.perf_counter() - wall_start
        return spent

    def lr_now(self) -> float:
        if self.config.lr_schedule != "budget":
            return self.schedule.at(self.step)
        return self.schedule.at(self.step, self.budget_seconds_spent() / (3600 * self.config.max_hours))

    def stop_reason(self) -> Optional[str]:
        """Why training ends before `epochs`, or None to go on."""
        config = self.config
        if self.schedule.exhausted:
            return (f"the plateau schedule cut lr to {self.schedule.at(self.step):.2e}, below lr * "
                    f"lr_final_fraction = {config.lr * config.lr_final_fraction:.2e}")
        spent = self.budget_seconds_spent()
        if config.max_hours is not None and spent >= 3600 * config.max_hours:
            return f"the {config.max_hours} h {config.budget_clock} budget is spent ({spent / 3600:.3f} h)"
        return None


def _lr_factor(step: int, warmup: int, total: int, final: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return _cosine(min(1.0, (step - warmup) / max(1, total - warmup)), final)


def _cosine(progress: float, final: float) -> float:
    """Half a cosine from 1 at progress 0 to `final` at progress 1."""
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def format_record(r: Dict[str, Any]) -> str:
    return (f"epoch {r['epoch']:3d} step {r['step']:6d} lr {r['lr']:.2e} loss {r['train_loss']:.4f} "
            f"contrastive {r['train_contrastive_loss']:.4f} | val E {1000 * r['val_energy_mae_per_atom']:.2f} "
            f"meV/atom F {1000 * r['val_force_mae']:.1f} meV/A cos {r['val_force_cosine']:.4f} | equivariance "
            f"E {1000 * r['equivariance_energy_abs_per_atom']:.3f} meV/atom F {r['equivariance_force_relative']:.4f}"
            f" | {1000 * r['seconds_per_step']:.0f} ms/step")


def plot_learning_curves(history: List[Dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    panels = [("train_loss", "training loss", 1.0), ("val_energy_mae_per_atom", "val energy MAE (meV/atom)", 1e3),
              ("val_force_mae", "val force MAE (meV/A)", 1e3),
              ("equivariance_force_relative", "force equivariance error |F(Rx)-RF(x)|/|F|", 1.0)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label, scale) in zip(axes.flat, panels):
        ax.plot(epochs, [scale * r[key] for r in history], marker="o", ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"TransIP training ({title})")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
    """Train (or resume from <output>/last.ckpt) and return the last epoch's record."""
    trainer = Trainer(config)
    last = Path(config.output) / "last.ckpt"
    if resume and last.exists():
        trainer.resume(last)
    Path(config.output).mkdir(parents=True, exist_ok=True)
    log_file = open(Path(config.output) / "train.log", "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    try:
        json.dump(dataclasses.asdict(config), open(Path(config.output) / "config.json", "w"), indent=1)
        return trainer.fit(log, stop_after_epoch)
    finally:
        log_file.close()

"""Accuracy per cost: TransIP at several sizes against MACE at several sizes, same data, same training budget.

    python benchmarks/pareto.py --config configs/pareto.json            # hours, resumable: train + evaluate
    python benchmarks/pareto.py --config configs/pareto.json --cost     # then, on an idle machine: MD cost
    python benchmarks/pareto.py --config configs/pareto_smoke.json --cost   # minutes (CI)
    python benchmarks/pareto.py --config configs/pareto.json --report-only  # the table from finished cells

Every model of the config trains once on the dataset's training split with the same budget of CPU time
(`budget_hours` of process CPU time on `threads` thread(s), `parallel` models at once; a CPU-time budget gives
every model the same compute even while the machine does other work). TransIP trains with `transip train`'s
trainer (`budget_clock: "cpu"`, stopping after the epoch that spends the budget). MACE trains with mace-torch's
own `mace_run_train`, as its users train it: this script watches its CPU time and, once the budget is spent,
lets the epoch under way finish its validation, stops it, and has `mace_run_train --restart_latest` write the
model from its best checkpoint (its EMA weights). Neither family gets more than its budget plus one epoch.

Accuracy (`result.json` in each model's folder): energy MAE per atom and force MAE on the held-out scaffolds,
held-out clusters, held-out frames and the periodic condensed-phase boxes, float64, and on the neutral closed-
shell scaffolds alone (MACE has no input for charge or spin; TransIP has).

Cost (`--cost`, `cost.json`): the median time of one MD step inside OpenMM, both families through openmm-ml
(`MLPotential('transip', ...)` and `MLPotential('mace', modelPath=...)`), CPU platform, the same threads,
float32 and float64, on a periodic water box and on a drug-like molecule in water; and of one step in LAMMPS
(`pair_style transip`) for TransIP. The report (`pareto.{json,md,png}` under the config's `report`) is
rebuilt from whatever has finished, every time; BENCHMARKS.md shows it (`benchmarks/suite.py`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import folder_name, machine, shown_path, write_json  # noqa: E402
SPLITS = ("test_scaffolds", "test_clusters", "test_frames", "condensed")
FAMILIES = ("transip", "mace")


def model_dir(config: dict, entry: dict) -> Path:
    return ROOT / config["output"] / folder_name(entry["name"])


def entry_seed(config: dict, entry: dict) -> int:
    """A model's seed: the study's, or its own `seed` (a second training of a cell, to size the spread between
    trainings). It picks the training subset, the initial weights and the batch order, in both families."""
    return entry.get("seed", config["seed"])


def load_config(path: Path) -> dict:
    config = json.loads(path.read_text())
    for entry in config["models"]:
        if entry.get("family") not in FAMILIES:
            raise SystemExit(f"{path}: model {entry.get('name')!r} has family {entry.get('family')!r}; choose from "
                             f"{FAMILIES}")
    names = [e["name"] for e in config["models"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: model names must be unique, got {names}")
    for entry in config["models"]:  # a second training names its cell: the report pairs them by name
        if "seed" in entry and not (entry["name"].endswith(f" seed {entry['seed']}")
                                    and entry["name"][:-len(f" seed {entry['seed']}")] in names):
            raise SystemExit(f"{path}: model {entry['name']!r} has its own seed {entry['seed']}, so it must be named "
                             f"'<another model's name> seed {entry['seed']}'")
    return config


def dataset_and_splits(config: dict):
    from transip.data import read_structures, split_indices
    from transip.train import TrainConfig

    defaults = TrainConfig(data="", output="")
    structures = read_structures(ROOT / config["data"])
    splits = split_indices(structures, defaults.split_seed, defaults.test_molecule_fraction, defaults.val_fraction,
                           defaults.test_frame_fraction)
    return structures, splits


# ------------------------------------------------------------------------------------------------- training
def train_transip(config: dict, entry: dict, folder: Path) -> Path:
    from transip.train import TrainConfig, train

    shared = config["transip_training"]
    cfg = TrainConfig(data=str(ROOT / config["data"]), output=str(folder), seed=entry_seed(config, entry),
                      threads=config["threads"], progress=False, max_hours=config["budget_hours"],
                      budget_clock="cpu", max_train_structures=config.get("max_train_structures"),
                      model=entry["model"], **{**shared, **entry.get("train", {})})
    train(cfg, resume=True)
    return folder / "best.ckpt"


def write_mace_files(config: dict, entry: dict, structures, splits, folder: Path) -> None:
    """The training split and the validation frames as extended XYZ with REF_ keys, as MACE reads them."""
    from ase import Atoms
    from ase.io import write

    from transip.metrics import spread_subset
    from transip.train import training_subset

    def atoms(s):
        a = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc if s.pbc is not None else False)
        a.info["REF_energy"] = float(s.energy)
        a.arrays["REF_forces"] = np.asarray(s.forces)
        return a

    train = training_subset(splits["train"], config.get("max_train_structures"), entry_seed(config, entry))
    val = spread_subset(splits["val"], config["transip_training"]["val_structures"])
    for name, chosen in (("train.xyz", train), ("valid.xyz", val)):
        if not (folder / name).exists():
            write(folder / f"{name}.partial", [atoms(structures[i]) for i in chosen], format="extxyz")
            os.replace(folder / f"{name}.partial", folder / name)


def mace_command(config: dict, entry: dict, folder: Path, epochs: int, elements: list) -> list:
    mace = {**config["mace_training"], **entry["mace"]}
    command = [str(Path(sys.executable).parent / "mace_run_train"), "--name", "mace", "--work_dir", str(folder),
               "--train_file", "train.xyz", "--valid_file", "valid.xyz", "--energy_key", "REF_energy",
               "--forces_key", "REF_forces", "--E0s", "average", "--model", "MACE",
               "--atomic_numbers", str(elements),  # the dataset's, as TransIP's: a subset may lack one
               "--batch_size", str(config["transip_training"]["batch_size"]), "--valid_batch_size", "16",
               "--max_num_epochs", str(epochs), "--eval_interval", "1", "--seed", str(entry_seed(config, entry)),
               "--device", "cpu", "--restart_latest", "--save_cpu"]
    for key, value in mace.items():
        if value is True:
            command.append(f"--{key}")
        elif value is not False:
            command += [f"--{key}", str(value)]
    return command


def mace_epochs(folder: Path) -> int:
    """Epochs MACE trained and validated: its log's "Epoch N:" lines. (Not the largest N + 1: a run resumed from
    the checkpoint of epoch N trains on from it but numbers its next epoch N again.)"""
    return len(re.findall(r"Epoch \d+:", (folder / "train.log").read_text()))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def train_mace(config: dict, entry: dict, structures, splits, folder: Path) -> Path:
    """mace_run_train until its CPU time reaches the budget and the epoch under way has been validated."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "mace.model"
    if model.exists():
        return model
    write_mace_files(config, entry, structures, splits, folder)
    budget = 3600 * config["budget_hours"]
    # CPU seconds spent so far (across interrupted runs), and the total at each validated epoch.
    ledger = folder / "budget.json"
    spent = json.loads(ledger.read_text()) if ledger.exists() else {"cpu_seconds": 0.0, "finished": False}
    spent.setdefault("epochs", {})
    if not spent["finished"]:  # a resumed run restarts from MACE's latest checkpoint: later work is lost, not spent
        saved = [int(m) for p in (folder / "checkpoints").glob("*_epoch-*.pt")
                 for m in re.findall(r"_epoch-(\d+)\.pt$", p.name)]
        # (An epoch saved after the ledger's last write keeps all the time spent: never more budget than used.)
        spent["cpu_seconds"] = spent["epochs"].get(str(max(saved)), spent["cpu_seconds"]) if saved else 0.0
    log_path = folder / "train.log"
    elements = sorted({int(z) for s in structures for z in s.numbers})
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"]), "MKL_NUM_THREADS": str(config["threads"])}
    if not spent["finished"]:
        start_log = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "a") as log:
            process = subprocess.Popen(mace_command(config, entry, folder, 100000, elements), cwd=folder, stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
            before = spent["cpu_seconds"]
            while process.poll() is None:
                time.sleep(2.0)
                try:
                    now = before + process_cpu_seconds(process.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
                spent["cpu_seconds"] = now
                epochs = re.findall(r"Epoch (\d+):", log_path.read_text()[start_log:])
                for epoch in epochs:
                    spent["epochs"].setdefault(epoch, now)
                write_json(ledger, spent)
                # Stop once an epoch is validated with the budget spent: the epoch under way when it ran out.
                if any(spent["epochs"][epoch] >= budget for epoch in epochs):
                    process.send_signal(signal.SIGTERM)
                    process.wait()
                    break
            if process.returncode not in (0, -signal.SIGTERM, None):
                raise RuntimeError(f"MACE training failed in {folder}: see {log_path}")
        spent["finished"] = True
        write_json(ledger, spent)
    # Zero further epochs: mace_run_train loads its best checkpoint, evaluates it and writes the model.
    with open(log_path, "a") as log:
        done = subprocess.run(mace_command(config, entry, folder, 0, elements), cwd=folder, stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not model.exists():
        raise RuntimeError(f"MACE could not write its model in {folder}: see {log_path}")
    return model


# ----------------------------------------------------------------------------------------------- evaluation
def predictor_for(family: str, model_path: Path):
    """structures -> {"energy", "forces"} in float64, for either family."""
    import torch

    if family == "transip":
        from transip.checkpoint import model_from_checkpoint
        from transip.metrics import predict

        model = model_from_checkpoint(model_path, dtype=torch.float64).set_kernel("auto")
        return (lambda structures: predict(model, structures)), sum(p.numel() for p in model.parameters())
    from ase import Atoms
    from mace.calculators import MACECalculator

    calculator = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")

    def predict_mace(structures):
        energies, forces = [], []
        for s in structures:
            atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell,
                          pbc=s.pbc if s.pbc is not None else False, calculator=calculator)
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
        return {"energy": np.array(energies), "forces": forces}
    return predict_mace, sum(p.numel() for p in calculator.models[0].parameters())


def evaluation_sets(config: dict, structures, splits) -> dict:
    """Up to `evaluation.structures` structures spread over each held-out split, and over the held-out frames
    without charge or unpaired electrons (the only split with ions and radicals: MACE has no input for either)."""
    from transip.metrics import spread_subset

    count = config["evaluation"]["structures"]
    sets = {split: spread_subset([structures[i] for i in splits.get(split, [])], count) for split in SPLITS}
    sets["test_frames_neutral"] = spread_subset([structures[i] for i in splits["test_frames"]
                                                 if structures[i].charge == 0 and structures[i].spin == 1], count)
    return {name: chosen for name, chosen in sets.items() if chosen}


def evaluate(config: dict, family: str, model_path: Path, structures, splits, only=None) -> dict:
    """Parameters and accuracy on every evaluation set (or on the sets named in `only`)."""
    from transip.metrics import accuracy

    predict, parameters = predictor_for(family, model_path)
    result = {"parameters": parameters}
    for name, chosen in evaluation_sets(config, structures, splits).items():
        if only is None or name in only:
            result[name] = {"structures": len(chosen), **accuracy(None, chosen, predictor=predict)}
    return result


def run_model(config: dict, entry: dict) -> dict:
    import torch

    torch.set_num_threads(config["threads"])
    folder = model_dir(config, entry)
    done = folder / "result.json"
    if done.exists():  # finished; an evaluation set added since is evaluated now, without retraining
        result = json.loads(done.read_text())
        structures, splits = dataset_and_splits(config)
        missing = set(evaluation_sets(config, structures, splits)) - set(result)
        epochs = mace_epochs(folder) if entry["family"] == "mace" else result["training"]["epochs"]
        if missing or epochs != result["training"]["epochs"]:  # (MACE epochs were once counted as largest N + 1)
            result["training"]["epochs"] = epochs
            if missing:
                result.update(evaluate(config, entry["family"], folder / result["model_file"], structures, splits,
                                       missing))
            write_json(done, result)
        return result
    folder.mkdir(parents=True, exist_ok=True)
    structures, splits = dataset_and_splits(config)
    if entry["family"] == "transip":
        model_path = train_transip(config, entry, folder)
        last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
        training = {"epochs": last["epoch"], "steps": last["step"], "cpu_hours": last["train_cpu_seconds"] / 3600,
                    "wall_hours": last["train_seconds"] / 3600}
    else:
        model_path = train_mace(config, entry, structures, splits, folder)
        training = {"epochs": mace_epochs(folder),
                    "cpu_hours": json.loads((folder / "budget.json").read_text())["cpu_seconds"] / 3600}
    # The machine is kept with each model: a CPU-time budget buys different work on different CPUs.
    training["machine"] = machine()["cpu"]
    result = {"name": entry["name"], "family": entry["family"], "model_file": model_path.name,
              "training": training, **evaluate(config, entry["family"], model_path, structures, splits)}
    write_json(done, result)
    return result


# ------------------------------------------------------------------------------------------------------ cost
def cost_systems(config: dict) -> dict:
    """The periodic boxes the MD cost is measured on: water, and a held-out drug-like molecule in water."""
    from common import water_system

    sys.path.insert(0, str(ROOT / "examples" / "boxes"))
    from make_solvated_box import SOLUTE, solvated_box

    from transip.data import Structure

    cost = config["cost"]
    solvated = solvated_box(waters=cost["solvating_waters"])
    return {"water": water_system(cost["water_atoms"], periodic=True),
            "solvated": Structure(solvated.numbers, solvated.positions, cell=solvated.cell[:], pbc=[True] * 3,
                                  name=f"{SOLUTE} in {cost['solvating_waters']} waters")}


def openmm_step_seconds(family: str, model_path: Path, structure, dtype: str, cost: dict) -> float:
    """Median seconds of one VerletIntegrator step (0.5 fs) of an openmm-ml System, CPU platform."""
    import openmm
    from openmm import unit
    from openmmml import MLPotential

    from common import median_seconds
    from transip.openmm_plugin.md import NM_PER_ANGSTROM, platform_by_name, topology_of

    topology = topology_of(structure)
    if family == "transip":
        system = MLPotential("transip", modelPath=str(model_path)).createSystem(topology, charge=0, spin=1)
    else:
        precision = {"float32": "single", "float64": "double"}[dtype]
        system = MLPotential("mace", modelPath=str(model_path)).createSystem(topology, precision=precision)
    integrator = openmm.VerletIntegrator(0.5 * unit.femtoseconds)
    platform = platform_by_name("CPU")
    context = openmm.Context(system, integrator, platform, {"Threads": str(cost["threads"])})
    context.setPositions(np.asarray(structure.positions) * NM_PER_ANGSTROM)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 0)
    return median_seconds(integrator.step, 1, cost["blocks"], cost["steps"])


def mace_model_in(model_path: Path, dtype: str, folder: Path) -> Path:
    """The MACE model file in `dtype`: openmm-ml feeds inputs of the precision asked for but keeps the model's
    own weights, so a float32-trained model needs a float64 copy for precision='double'."""
    import torch

    model = torch.load(model_path, map_location="cpu", weights_only=False)
    target = getattr(torch, dtype)
    if next(model.parameters()).dtype == target:
        return model_path
    path = folder / f"mace-{dtype}.model"
    torch.save(model.to(target), path)
    return path


def measure_cost(config: dict, entry: dict) -> dict:
    import tempfile

    import torch

    import transip
    from engines import time_lammps
    from transip.export import export_checkpoint

    cost = config["cost"]
    torch.set_num_threads(cost["threads"])
    transip.native.keep_freed_memory()
    folder = model_dir(config, entry)
    result = json.loads((folder / "result.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in cost["dtypes"]:
            if entry["family"] == "transip":
                model_path = Path(tmp) / f"model-{dtype}.pt"
                export_checkpoint(folder / result["model_file"], model_path, dtype=dtype, kernel="fused")
            else:
                model_path = mace_model_in(folder / result["model_file"], dtype, Path(tmp))
            for system, structure in cost_systems(config).items():
                row = {"system": system, "atoms": len(structure.numbers), "dtype": dtype,
                       "openmm_ms": 1000 * openmm_step_seconds(entry["family"], model_path, structure, dtype, cost)}
                if entry["family"] == "transip":
                    task = {"artifact": str(model_path), "threads": cost["threads"], "smoke": cost["steps"] < 5}
                    row["lammps_ms"] = 1000 * time_lammps(task, structure, 1)
                rows.append(row)
    payload = {"name": entry["name"], "threads": cost["threads"], "rows": rows}
    write_json(folder / "cost.json", payload)
    return payload


# ------------------------------------------------------------------------------------------------- report
def summarise(config: dict) -> list:
    rows = []
    for entry in config["models"]:
        folder = model_dir(config, entry)
        if not (folder / "result.json").exists():
            continue
        row = json.loads((folder / "result.json").read_text())
        cost = folder / "cost.json"
        row["cost"] = json.loads(cost.read_text()) if cost.exists() else None
        rows.append(row)
    return rows


def openmm_ms(row: dict, system: str, dtype: str):
    found = [r["openmm_ms"] for r in (row["cost"] or {}).get("rows", []) if (r["system"], r["dtype"]) == (system, dtype)]
    return found[0] if found else None


def verdict(config: dict, rows: list) -> dict:
    """The target: a TransIP model at least as accurate on held-out scaffolds as the smallest MACE and at least
    5x faster per OpenMM step than it, on every system and precision measured; a cell trained more than once is
    judged on the mean of its trainings."""
    # A cell trained more than once (entries with their own seed) is judged on the mean of its trainings, on
    # both sides: one training against another differs by a few percent, as much as the gaps judged here.
    spread = seed_spread(config, rows)
    means = {s["cell"]: s for s in spread}
    repeats = {e["name"] for e in config["models"] if "seed" in e}
    maces = [r for r in rows if r["family"] == "mace" and r["name"] not in repeats]
    if not maces:
        return {"met": None, "text": "no MACE model has finished", "seeds": spread}
    smallest = min(maces, key=lambda r: r["parameters"])

    def accuracy(r):
        cell = means.get(r["name"])
        return (cell["mean"], len(cell["values"])) if cell else (r["test_scaffolds"]["force_mae"], 1)

    def shown(value, trainings):
        return f"{1000 * value:.1f} meV/A" + (f" (mean of {trainings} trainings)" if trainings > 1 else "")

    reference, reference_trainings = accuracy(smallest)
    pairs = [(s, d) for s in ("water", "solvated") for d in config["cost"]["dtypes"]]
    candidates = []
    for r in rows:
        if r["family"] != "transip" or r["name"] in repeats:
            continue
        ratios = [openmm_ms(smallest, s, d) / openmm_ms(r, s, d) for s, d in pairs
                  if openmm_ms(smallest, s, d) and openmm_ms(r, s, d)]
        mae, trainings = accuracy(r)
        candidates.append({"name": r["name"], "force_mae": mae, "trainings": trainings, "as_accurate": mae <= reference,
                           "slowest_speedup": min(ratios) if len(ratios) == len(pairs) else None})
    met = [c for c in candidates if c["as_accurate"] and c["slowest_speedup"] is not None
           and c["slowest_speedup"] >= 5]
    measured = all(c["slowest_speedup"] is not None for c in candidates)
    text = (f"smallest MACE: {smallest['name']} ({smallest['parameters']} parameters), force MAE on held-out "
            f"scaffolds {shown(reference, reference_trainings)}. " + "; ".join(
                f"{c['name']}: {shown(c['force_mae'], c['trainings'])} "
                f"({'as accurate' if c['as_accurate'] else 'less accurate'})"
                + (f", {c['slowest_speedup']:.1f}x faster at worst" if c["slowest_speedup"] is not None else
                   ", cost not measured") for c in candidates))
    # A margin smaller than the spread between trainings of one cell is not a difference the study can see.
    largest_std = max((s["std"] for s in spread), default=None)
    close = [c for c in met if largest_std is not None and reference - c["force_mae"] < largest_std]
    if close:
        ahead = [f"{c['name']} is {1000 * (reference - c['force_mae']):.1f} meV/A ahead on "
                 + ("one training" if c["trainings"] == 1 else f"the mean of {c['trainings']} trainings") for c in close]
        text += (f". Within noise: {'; '.join(ahead)}, less than the largest standard deviation between trainings "
                 f"of one cell ({1000 * largest_std:.1f} meV/A)")
    return {"met": bool(met) if measured or met else None, "text": text, "smallest_mace": smallest["name"],
            "meeting": [c["name"] for c in met], "within_noise": [c["name"] for c in close],
            "candidates": candidates, "seeds": spread}


def seed_spread(config: dict, rows: list) -> list:
    """Cells trained more than once (entries with their own `seed`, named `<cell> seed N`): every training's force
    MAE on held-out scaffolds, their mean and sample standard deviation, as {"cell", "family", "values", "mean",
    "std"}."""
    by_name = {r["name"]: r for r in rows}
    seeded = {}
    for entry in config["models"]:
        if "seed" in entry:
            cell = entry["name"][:-len(f" seed {entry['seed']}")]  # load_config checked the name
            if cell in by_name and entry["name"] in by_name:
                seeded.setdefault(cell, [by_name[cell]]).append(by_name[entry["name"]])
    spread = []
    for cell, trained in seeded.items():
        values = [r["test_scaffolds"]["force_mae"] for r in trained]
        spread.append({"cell": cell, "family": trained[0]["family"], "values": values,
                       "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))})
    return spread


def listed(values: list) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def seed_text(spread: list, smallest_mace: Optional[str]) -> str:
    """The spread between trainings, and the target's accuracy half on the means where the smallest MACE was
    trained more than once too."""
    if not spread:
        return ""
    text = "Cells trained twice or more (force MAE on held-out scaffolds, meV/A): " + "; ".join(
        f"{s['cell']}: " + listed([f"{1000 * v:.1f}" for v in s["values"]])
        + f" (mean {1000 * s['mean']:.1f}, standard deviation {1000 * s['std']:.1f})" for s in spread) + "."
    mace = next((s for s in spread if s["cell"] == smallest_mace), None)
    transips = [s for s in spread if s["family"] == "transip"]
    if mace and transips:
        best = min(transips, key=lambda s: s["mean"])
        relation = "as accurate as" if best["mean"] <= mace["mean"] else "less accurate than"
        # How well the trainings pin the means down: the standard error of their difference.
        error = float(np.hypot(best["std"] / np.sqrt(len(best["values"])), mace["std"] / np.sqrt(len(mace["values"]))))
        text += (f" On the means, {best['cell']} ({1000 * best['mean']:.1f}) is {relation} the smallest MACE "
                 f"({1000 * mace['mean']:.1f}); the difference, {1000 * abs(best['mean'] - mace['mean']):.1f}, "
                 f"against a standard error of {1000 * error:.1f} from the spread between trainings.")
    return text


def write_report(config: dict, config_path: Path, rows: list) -> None:
    from common import write_results

    cost = config["cost"]
    result = verdict(config, rows)
    lines = [
        f"Command: `python benchmarks/pareto.py --config {shown_path(config_path)}` (then `--cost`). Data "
        f"`{config['data']}`, the same seeded subset of its training split "
        f"({config.get('max_train_structures') or 'all'} structures; a model named `seed N` trains with seed N: its "
        "own subset, initial weights and batch order, a second training of the cell above it); every model "
        f"trained with the same budget of {config['budget_hours']} h of process CPU time on {config['threads']} "
        f"thread(s) ({config.get('parallel', 1)} models at once), stopping after the epoch that spends it (MACE's "
        "epochs are longer, so it may overrun more: `training CPU h`). TransIP: "
        f"`transip train` (Huber force loss, weight EMA, `{config['transip_training'].get('lr_schedule', 'cosine')}` "
        "learning-rate schedule, ZBL repulsion, geometry in blocks); MACE: "
        "mace-torch's `mace_run_train` (weighted loss, EMA, `--pair_repulsion`). Force MAE in meV/A and energy MAE "
        "in meV/atom, float64, on up to "
        f"{config['evaluation']['structures']} structures per split. Held-out scaffolds, clusters and boxes are all "
        "neutral closed-shell; the held-out frames hold ions and radicals too, so `frames (neutral)` compares on "
        "those without (MACE has no input for charge or spin).", "",
        "| model | parameters | epochs | training CPU h | trained on | F scaffolds | F clusters | F frames | "
        "F frames (neutral) | F condensed | E scaffolds | E frames | E condensed |", "| --- " * 13 + "|"]
    for r in rows:
        f = lambda split: f"{1000 * r[split]['force_mae']:.1f}" if split in r else "-"
        e = lambda split: f"{1000 * r[split]['energy_mae_per_atom']:.2f}" if split in r else "-"
        lines.append(f"| {r['name']} | {r['parameters']} | {r['training']['epochs']} | "
                     f"{r['training']['cpu_hours']:.2f} | {r['training'].get('machine', 'not recorded')} | "
                     f"{f('test_scaffolds')} | {f('test_clusters')} | "
                     f"{f('test_frames')} | {f('test_frames_neutral')} | {f('condensed')} | {e('test_scaffolds')} | "
                     f"{e('test_frames')} | {e('condensed')} |")
    pairs = [(s, d) for s in ("water", "solvated") for d in cost["dtypes"]]
    atoms = {}
    for r in rows:
        for c in (r["cost"] or {}).get("rows", []):
            atoms[c["system"]] = c["atoms"]
    lines += ["", f"Cost: milliseconds per MD step (VerletIntegrator, 0.5 fs) inside OpenMM through openmm-ml "
              f"(`MLPotential('transip' | 'mace', modelPath=...)`), CPU platform, {cost['threads']} threads; LAMMPS "
              f"(`pair_style transip`, 1 rank, {cost['threads']} threads) for TransIP. Systems: a periodic water box "
              f"of {atoms.get('water', cost['water_atoms'])} atoms, and a held-out drug-like molecule in "
              f"{cost['solvating_waters']} waters ({atoms.get('solvated', '-')} atoms).", "",
              "| model | " + " | ".join(f"OpenMM {s} {d}" for s, d in pairs) + " | "
              + " | ".join(f"LAMMPS {s} {d}" for s, d in pairs) + " |", "| --- " * (1 + 2 * len(pairs)) + "|"]
    for r in rows:
        def ms(system, dtype, key):
            found = [c[key] for c in (r["cost"] or {}).get("rows", []) if (c["system"], c["dtype"]) == (system, dtype)
                     and key in c]
            return f"{found[0]:.1f}" if found else "-"
        lines.append(f"| {r['name']} | " + " | ".join(ms(s, d, "openmm_ms") for s, d in pairs) + " | "
                     + " | ".join(ms(s, d, "lammps_ms") for s, d in pairs) + " |")
    state = {True: "**met**", False: "**not met**", None: "not yet measured"}[result["met"]]
    lines += ["", f"Target: a TransIP model at least as accurate on held-out scaffolds as the smallest MACE and at least "
              f"5x faster per OpenMM step than it (every system and precision): {state}. {result['text']}"]
    if result["seeds"]:
        lines += ["", seed_text(result["seeds"], result.get("smallest_mace"))]
    out = ROOT / config["report"] / "pareto"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out, {"config": config, "rows": rows, "verdict": result, "machine": machine()}, lines)
    plot_error_against_cost(config, rows, out.with_suffix(".png"))


def plot_error_against_cost(config: dict, rows: list, path: Path) -> None:
    """Force MAE on held-out scaffolds against OpenMM ms per step, one line per family, a panel per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = config["cost"]["dtypes"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    plotted = False
    for ax, dtype in zip(axes[0], dtypes):
        for family, marker in (("transip", "o"), ("mace", "s")):
            points = sorted((openmm_ms(r, "water", dtype), 1000 * r["test_scaffolds"]["force_mae"], r["name"])
                            for r in rows if r["family"] == family and openmm_ms(r, "water", dtype))
            if not points:
                continue
            plotted = True
            # Every model a marker; the line joins the family's front (each point more accurate than every cheaper
            # one), so recipe variants and second trainings of one network do not zig-zag it.
            front, best = [], float("inf")
            for p in points:
                if p[1] < best:
                    front.append(p)
                    best = p[1]
            line, = ax.plot([p[0] for p in front], [p[1] for p in front], label=family.replace(
                "transip", "TransIP").replace("mace", "MACE") + " (front)")
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, linestyle="none",
                    color=line.get_color())
            for k, (x, y, name) in enumerate(sorted(points, key=lambda p: p[1])):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, -6 + 9 * (k % 2)), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(f"OpenMM ms per MD step, water box, {dtype}, {config['cost']['threads']} threads")
        ax.set_ylabel("force MAE, held-out scaffolds (meV/A)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if plotted:
        fig.suptitle(f"Error against cost, same data and {config['budget_hours']} h CPU training budget", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--cost", action="store_true", help="time each model in OpenMM and LAMMPS (idle machine)")
    parser.add_argument("--output", type=Path, default=None, help="models and report here instead of the config's")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the finished models")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="train and time only these models of the config (the report still covers every "
                             "finished one): a model added to the study, without retiming the others")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    config_path = args.config.resolve()
    config = load_config(config_path)
    names = [e["name"] for e in config["models"]]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise SystemExit(f"--only: {config_path} has no model named {', '.join(map(repr, unknown))}; its models are "
                         f"{', '.join(map(repr, names))}")
    chosen = [e for e in config["models"] if args.only is None or e["name"] in args.only]
    if args.output is not None:
        config["output"] = config["report"] = str(args.output.resolve())
    if not args.report_only:
        with concurrent.futures.ProcessPoolExecutor(config.get("parallel", 1)) as pool:
            futures = [pool.submit(run_model, config, entry) for entry in chosen]
            for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="pareto models"):
                future.result()
    if args.cost:
        for entry in tqdm(chosen, desc="MD cost"):
            if (model_dir(config, entry) / "result.json").exists():
                measure_cost(config, entry)
    write_report(config, config_path, summarise(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy study: learned equivariance (transip) vs augmentation vs none vs MACE, across training-set sizes.

    python benchmarks/accuracy_study.py --config configs/accuracy_study.json          # hours, resumable
    python benchmarks/accuracy_study.py --config configs/accuracy_study_smoke.json    # minutes (CI)

Every cell (method, training-set size, seed) trains in its own folder under the config's `output`; a cell with
a `result.json` is done and skipped, an interrupted TransIP cell resumes from its `last.ckpt` and an interrupted
MACE cell from MACE's own latest checkpoint. All methods see the same splits (held-out frames and held-out
molecules, the trainer's `split_indices`), the same training subsets and the same number of optimiser steps.
Each cell is evaluated on both test splits (energy MAE per atom, force MAE, force cosine, equivariance error
over random rotations), timed on a fixed set of structures, and run in NVE on a held-out molecule. The report
(`study.{json,md,csv,png}` at the config's `report` path, else in `output`) is rebuilt from every finished
cell at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("test_frames", "test_molecules")
TRANSIP_METHODS = ("transip", "augment", "none")


def load_config(path: Path) -> dict:
    config = json.loads(path.read_text())
    unknown = set(config["methods"]) - set(TRANSIP_METHODS) - {"mace"}
    if unknown:
        raise SystemExit(f"{path}: unknown methods {sorted(unknown)}; choose from {TRANSIP_METHODS + ('mace',)}")
    return config


def cell_dir(config: dict, method: str, size: int, seed: int) -> Path:
    return ROOT / config["output"] / method / f"n{size}-seed{seed}"


def dataset_and_splits(config: dict):
    return _dataset_and_splits(str(ROOT / config["data"]))


@functools.lru_cache(maxsize=1)  # a worker process handles several cells of one dataset
def _dataset_and_splits(path: str):
    from transip.data import read_structures, split_indices

    structures = read_structures(path)
    return structures, split_indices(structures, 0)


def evaluation_sets(config: dict, structures, splits) -> dict:
    from transip.metrics import spread_subset

    count = config["evaluation"]["structures"]
    return {split: spread_subset([structures[i] for i in splits[split]], count) for split in SPLITS}


# ------------------------------------------------------------------------------------------------- training
def train_transip(config: dict, method: str, size: int, seed: int, folder: Path) -> Path:
    from transip.train import TrainConfig, train

    steps_per_epoch = math.ceil(size / config["batch_size"])
    train_config = TrainConfig(
        data=str(ROOT / config["data"]), output=str(folder), objective=method, seed=seed,
        epochs=max(1, math.ceil(config["steps"] / steps_per_epoch)), batch_size=config["batch_size"],
        lr=config["lr"], warmup_steps=min(200, config["steps"] // 10), max_train_structures=size,
        val_structures=config["validation_structures"], equivariance_structures=8, threads=1, progress=False,
        model=config["model"], **config.get("training", {}))  # the recipe's TrainConfig fields (loss, EMA, ...)
    train(train_config, resume=True)
    return folder / "best.ckpt"


def write_mace_files(config: dict, structures, splits, size: int, seed: int, folder: Path) -> None:
    """The cell's training subset and the validation frames as extended XYZ with REF_ keys, as MACE reads."""
    from ase import Atoms
    from ase.io import write

    from transip.metrics import spread_subset
    from transip.train import training_subset

    def atoms(s):
        a = Atoms(numbers=s.numbers, positions=s.positions)
        a.info["REF_energy"] = float(s.energy)
        a.arrays["REF_forces"] = np.asarray(s.forces)
        return a

    train = training_subset(splits["train"], size, seed)
    val = spread_subset(splits["val"], config["validation_structures"])
    write(folder / "train.xyz", [atoms(structures[i]) for i in train], format="extxyz")
    write(folder / "valid.xyz", [atoms(structures[i]) for i in val], format="extxyz")


def train_mace(config: dict, structures, splits, size: int, seed: int, folder: Path) -> Path:
    """MACE through its own training command (its users' way), with the same steps and batch size."""
    mace = config["mace"]
    folder.mkdir(parents=True, exist_ok=True)
    write_mace_files(config, structures, splits, size, seed, folder)
    epochs = max(1, math.ceil(config["steps"] / math.ceil(size / config["batch_size"])))
    command = [str(Path(sys.executable).parent / "mace_run_train"), "--name", "mace", "--work_dir", str(folder),
               "--train_file", "train.xyz", "--valid_file", "valid.xyz", "--energy_key", "REF_energy",
               "--forces_key", "REF_forces", "--E0s", "average", "--model", "MACE", "--r_max", str(mace["r_max"]),
               "--num_channels", str(mace["num_channels"]), "--max_L", str(mace["max_L"]),
               "--num_interactions", str(mace["num_interactions"]), "--batch_size", str(config["batch_size"]),
               "--valid_batch_size", "32", "--max_num_epochs", str(epochs), "--eval_interval",
               str(max(1, epochs // 20)), "--lr", str(mace["lr"]), "--seed", str(seed), "--device", "cpu",
               "--default_dtype", "float32", "--loss", "weighted", "--energy_weight", "1", "--forces_weight",
               "100", "--restart_latest", "--save_cpu"]
    with open(folder / "train.log", "a") as log:
        done = subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    model = folder / "mace.model"
    if done.returncode != 0 or not model.exists():
        raise RuntimeError(f"MACE training failed in {folder}: see {folder / 'train.log'}")
    return model


# ----------------------------------------------------------------------------------------------- evaluation
def ase_predictor(calculator):
    """structures -> {"energy", "forces"} through an ASE calculator, one structure at a time."""
    from ase import Atoms

    def predict(structures):
        energies, forces = [], []
        for s in structures:
            atoms = Atoms(numbers=s.numbers, positions=s.positions, calculator=calculator,
                          info={"charge": int(s.charge), "spin": int(s.spin)})  # read by TransIP, not MACE
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
        return {"energy": np.array(energies), "forces": forces}
    return predict


def calculator_for(method: str, model_path: Path):
    import torch

    if method == "mace":
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    from transip.calculator import TransIPCalculator

    # The study measures how models do outside what they saw (held-out molecules, whose charge or spin a small
    # training subset may lack): run them there on purpose, as MACE does (it has no such check).
    return TransIPCalculator(model_path, dtype=torch.float64, allow_untrained=True)


def stability_run(calculator, molecule, md: dict) -> dict:
    """NVE (velocity Verlet) from a Maxwell-Boltzmann start: total-energy drift and whether any bond (pairs
    closer than 1.2x their sum of covalent radii at the start) stretched beyond 2x or atoms came closer than
    0.5 A, which is what an unphysical potential does first."""
    from ase import Atoms, units
    from ase.data import covalent_radii
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    atoms = Atoms(numbers=molecule.numbers, positions=molecule.positions, calculator=calculator,
                  info={"charge": int(molecule.charge), "spin": int(molecule.spin)})
    thermalize_momenta(atoms, md["temperature_K"], rng=np.random.default_rng(0))
    start = atoms.get_all_distances()
    radii = covalent_radii[atoms.numbers]
    bonded = np.triu(start < 1.2 * (radii[:, None] + radii[None, :]), 1)
    dynamics = VelocityVerlet(atoms, timestep=md["timestep_fs"] * units.fs)
    totals, worst_stretch, closest = [atoms.get_total_energy()], 1.0, np.inf
    for _ in range(md["steps"] // 10):
        dynamics.run(10)
        totals.append(atoms.get_total_energy())
        distances = atoms.get_all_distances()
        worst_stretch = max(worst_stretch, float((distances[bonded] / start[bonded]).max()))
        closest = min(closest, float(distances[np.triu_indices(len(atoms), 1)].min()))
        if not np.isfinite(totals[-1]) or worst_stretch > 2.0:
            break
    n = len(atoms)
    return {"molecule": molecule.name, "steps": md["steps"], "timestep_fs": md["timestep_fs"],
            "energy_drift_mev_per_atom": 1000 * float(abs(totals[-1] - totals[0])) / n,
            "energy_std_mev_per_atom": 1000 * float(np.std(totals)) / n,
            "max_bond_stretch": worst_stretch, "closest_approach_A": closest,
            "stable": bool(np.isfinite(totals[-1]) and worst_stretch <= 2.0 and closest >= 0.5)}


def parameter_count(calculator) -> int:
    models = calculator.models if hasattr(calculator, "models") else [calculator.model]  # MACE keeps a list
    return int(sum(p.numel() for p in models[0].parameters()))


def evaluate_cell(config: dict, method: str, model_path: Path, eval_sets: dict, molecule) -> dict:
    from transip.metrics import accuracy, equivariance_error, spread_subset

    calculator = calculator_for(method, model_path)
    predict = ase_predictor(calculator)
    result = {"parameters": parameter_count(calculator)}
    for split, chosen in eval_sets.items():
        metrics = accuracy(None, chosen, predictor=predict)
        rotated = spread_subset(chosen, config["evaluation"]["equivariance_structures"])
        metrics.update({f"equivariance_{k}": v for k, v in equivariance_error(
            None, rotated, config["evaluation"]["rotations"], predictor=predict).items()})
        result[split] = metrics
    timed = eval_sets["test_frames"][:config["evaluation"]["timed_structures"]]
    predict(timed[:2])  # warm-up
    start = time.perf_counter()
    predict(timed)
    result["ms_per_structure"] = 1000 * (time.perf_counter() - start) / len(timed)
    result["md"] = stability_run(calculator, molecule, config["md"])
    return result


def stability_molecule(structures, splits):
    """The largest held-out molecule (its first frame): the hardest test of staying physical."""
    return max((structures[i] for i in splits["test_molecules"]), key=lambda s: len(s.numbers))


def complete_older_result(config: dict, method: str, folder: Path, result: dict) -> dict:
    """Add what cells finished by an earlier version of this script lack (parameter count, MD on the current
    stability molecule), without retraining."""
    model_path = folder / ("mace.model" if method == "mace" else "best.ckpt")
    structures, splits = dataset_and_splits(config)
    molecule = stability_molecule(structures, splits)
    if "parameters" in result and result["md"]["molecule"] == molecule.name:
        return result
    calculator = calculator_for(method, model_path)
    result["parameters"] = parameter_count(calculator)
    result["md"] = stability_run(calculator, molecule, config["md"])
    tmp = folder / "result.partial"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, folder / "result.json")
    return result


def run_cell(config: dict, method: str, size: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    folder = cell_dir(config, method, size, seed)
    done = folder / "result.json"
    if done.exists():
        return complete_older_result(config, method, folder, json.loads(done.read_text()))
    structures, splits = dataset_and_splits(config)
    start = time.perf_counter()
    if method == "mace":
        model_path = train_mace(config, structures, splits, size, seed, folder)
    else:
        model_path = train_transip(config, method, size, seed, folder)
    train_seconds = time.perf_counter() - start
    molecule = stability_molecule(structures, splits)
    result = {"method": method, "train_size": size, "seed": seed, "steps": config["steps"],
              "train_seconds_this_run": train_seconds,
              **evaluate_cell(config, method, model_path, evaluation_sets(config, structures, splits), molecule)}
    tmp = done.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, done)
    return result


# --------------------------------------------------------------------------------------------------- report
def summarise(results: list) -> list:
    """Mean and spread (min, max) over seeds for each (method, size)."""
    rows = []
    for method in sorted({r["method"] for r in results}):
        for size in sorted({r["train_size"] for r in results if r["method"] == method}):
            cell = [r for r in results if r["method"] == method and r["train_size"] == size]
            row = {"method": method, "train_size": size, "seeds": len(cell), "parameters": cell[0]["parameters"],
                   "ms_per_structure": float(np.mean([r["ms_per_structure"] for r in cell])),
                   "md_stable": sum(r["md"]["stable"] for r in cell),
                   "md_drift_mev_per_atom": float(np.mean([r["md"]["energy_drift_mev_per_atom"] for r in cell]))}
            for split in SPLITS:
                for key in ("energy_mae_per_atom", "force_mae", "force_cosine", "equivariance_energy_abs_per_atom",
                            "equivariance_force_relative"):
                    values = [r[split][key] for r in cell]
                    row[f"{split}.{key}"] = float(np.mean(values))
                    row[f"{split}.{key}.min"], row[f"{split}.{key}.max"] = float(min(values)), float(max(values))
            rows.append(row)
    return rows


def write_report(config: dict, rows: list, out: Path, config_path: Path, missing: list = ()) -> None:
    """The study's table (.md, .csv, .json) and plot; `missing` names the cells not in it (not finished yet or
    failed)."""
    import platform

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    missing = [{"method": m, "train_size": n, "seed": seed} for m, n, seed in missing]
    out.with_suffix(".json").write_text(json.dumps({"config": config, "rows": rows, "missing_cells": missing}, indent=1))
    lines = [f"`python benchmarks/accuracy_study.py --config {config_path.relative_to(ROOT)}`, {config['steps']} "
             f"steps, batch {config['batch_size']}, on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores). Mean over seeds, [min, max] in brackets.", "",
             "| method | parameters | train size | seeds | split | E MAE (meV/atom) | F MAE (meV/A) | F cosine | "
             "dE rot (meV/atom) | dF/F rot | ms/structure | MD stable | MD drift (meV/atom) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for split in SPLITS:
            f = f"{split}.force_mae"
            lines.append(
                f"| {r['method']} | {r['parameters']} | {r['train_size']} | {r['seeds']} | {split} | "
                f"{1000 * r[split + '.energy_mae_per_atom']:.1f} | {1000 * r[f]:.0f} [{1000 * r[f + '.min']:.0f}, "
                f"{1000 * r[f + '.max']:.0f}] | {r[split + '.force_cosine']:.3f} | "
                f"{1000 * r[split + '.equivariance_energy_abs_per_atom']:.3f} | "
                f"{r[split + '.equivariance_force_relative']:.1e} | {r['ms_per_structure']:.1f} | "
                f"{r['md_stable']}/{r['seeds']} | {r['md_drift_mev_per_atom']:.2f} |")
    if missing:
        lines += ["", f"**Partial report: {len(missing)} cells are not in it** (not finished yet, or failed; the command "
                  "resumes them): " + ", ".join(f"{c['method']} {c['train_size']} seed {c['seed']}" for c in missing)
                  + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    figure, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    panels = [("test_frames.force_mae", 1000, "force MAE, held-out frames (meV/A)"),
              ("test_molecules.force_mae", 1000, "force MAE, held-out molecules (meV/A)"),
              ("test_frames.energy_mae_per_atom", 1000, "energy MAE, held-out frames (meV/atom)"),
              ("test_frames.equivariance_force_relative", 1, "force change under rotation |dF|/|F|, frames")]
    sizes = sorted({r["train_size"] for r in rows})
    for ax, (key, scale, title) in zip(axes, panels):
        for method in sorted({r["method"] for r in rows}):
            mine = [r for r in rows if r["method"] == method]
            mean = np.array([scale * r[key] for r in mine])
            low = mean - np.array([scale * r[key + ".min"] for r in mine])
            high = np.array([scale * r[key + ".max"] for r in mine]) - mean
            ax.errorbar([r["train_size"] for r in mine], mean, yerr=[low, high], marker="o", capsize=3,
                        label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(size) for size in sizes])  # the sizes trained, not a crowd of minor labels
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training structures")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once, 1 thread each")
    parser.add_argument("--output", type=Path, help="folder for cells and report (default: the config's)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the cells finished so far, training nothing")
    args = parser.parse_args(argv)
    config_path = args.config.resolve()
    config = load_config(config_path)
    if args.output:
        config["output"] = str(args.output.resolve())
    from tqdm import tqdm

    # Longest first (MACE, then the largest sets) so that the last cells running in parallel end together.
    cells = sorted([(m, n, s) for n in config["train_sizes"] for s in config["seeds"] for m in config["methods"]],
                   key=lambda cell: (cell[0] != "mace", -cell[1], cell[2]))
    # The report goes where the config says (the full study: docs/, beside the discussion), else the output folder.
    report = ROOT / config["report"] if "report" in config and not args.output else ROOT / config["output"] / "study"
    if args.report_only:
        finished = {cell: cell_dir(config, *cell) / "result.json" for cell in cells}
        results = [json.loads(path.read_text()) for path in finished.values() if path.exists()]
        if not results:
            raise SystemExit(f"no finished cell under {config['output']}: run the study first")
        write_report(config, summarise(results), report, config_path,
                     missing=[cell for cell, path in finished.items() if not path.exists()])
        return 0
    results, failed = [], []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_cell, config, *cell): cell for cell in cells}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(cells), desc="study cells"):
            try:
                results.append(future.result())
            except Exception as error:  # one broken cell must not lose the others; rerunning retries it
                failed.append(futures[future])
                tqdm.write(f"cell {futures[future]} failed: {error}")
    if not results:
        raise SystemExit("no cell finished")
    write_report(config, summarise(results), report, config_path, missing=failed)
    if failed:
        print(f"{len(failed)} cells failed and are missing from the report: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

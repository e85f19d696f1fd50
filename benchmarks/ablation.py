"""Ablation of the model's changes on the chemistry data: today's model, then each change added in turn.

    python benchmarks/ablation.py --config configs/ablation.json           # hours, resumable (training + accuracy)
    python benchmarks/ablation.py --config configs/ablation.json --cost    # then, on an idle machine: MD cost
    python benchmarks/ablation.py --config configs/ablation_smoke.json --cost   # minutes (CI)
    python benchmarks/ablation.py --config configs/ablation.json --report-only  # the table from finished cells

Every row of the config (a name, ModelConfig fields over `base_model`, TrainConfig fields over the shared
training settings) trains once per seed, in its own folder under the config's `output`, with the same training
budget: the same training subset, epochs, batch size and objective. A cell with `result.json` is done and
skipped; an interrupted cell resumes from its `last.ckpt`. Each cell's best checkpoint is evaluated on the
held-out splits (`split_indices`: held-out scaffolds, held-out clusters, held-out frames, the periodic
condensed-phase boxes): energy MAE per atom, force MAE, and the equivariance error over random rotations.

`--cost` times one MD step of each row's model (seed 0) in OpenMM (CPU platform, VerletIntegrator, the
config's dtype, threads and water box) and writes `cost.json` beside the row's cells. Timing needs an idle
machine, so it is a separate pass. The report (`ablation.{json,md}` under the config's `report`) is rebuilt
from whatever has finished, every time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import folder_name, write_json  # noqa: E402
SPLITS = ("test_scaffolds", "test_clusters", "test_frames", "condensed")


def row_dir(config: dict, row: dict) -> Path:
    return ROOT / config["output"] / folder_name(row["name"])


def train_config(config: dict, row: dict, seed: int, folder: Path):
    from transip.train import TrainConfig

    shared = config["training"]
    return TrainConfig(data=str(ROOT / config["data"]), output=str(folder), seed=seed, threads=config["threads"],
                       progress=False, model={**config["base_model"], **row.get("model", {})},
                       **{**shared, **row.get("train", {})})


def evaluate(config: dict, checkpoint: Path, cfg) -> dict:
    import torch

    from transip.checkpoint import model_from_checkpoint
    from transip.data import read_structures, split_indices
    from transip.metrics import accuracy, equivariance_error, spread_subset
    from transip.model import count_parameters

    structures = read_structures(cfg.data)
    splits = split_indices(structures, cfg.split_seed, cfg.test_molecule_fraction, cfg.val_fraction,
                           cfg.test_frame_fraction)
    model = model_from_checkpoint(checkpoint, dtype=torch.float64).set_kernel("reference")
    evaluation = config["evaluation"]
    result = {"parameters": count_parameters(model)}
    for split in SPLITS:
        chosen = spread_subset([structures[i] for i in splits.get(split, [])], evaluation["structures"])
        if not chosen:
            continue
        metrics = accuracy(model, chosen)
        metrics.update({f"equivariance_{k}": v for k, v in equivariance_error(
            model, spread_subset(chosen, evaluation["equivariance_structures"]), evaluation["rotations"]).items()})
        result[split] = {"structures": len(chosen), **metrics}
    return result


def run_cell(config: dict, row: dict, seed: int) -> dict:
    import torch

    from transip.train import train

    torch.set_num_threads(config["threads"])
    folder = row_dir(config, row) / f"seed{seed}"
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = train_config(config, row, seed, folder)
    train(cfg, resume=True)
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    history = last["history"]
    result = {"row": row["name"], "seed": seed, "steps": last["step"], "train_hours": last["train_seconds"] / 3600,
              "seconds_per_step": statistics.median(r["seconds_per_step"] for r in history),
              **evaluate(config, folder / "best.ckpt", cfg)}
    write_json(done, result)
    return result


def measure_cost(config: dict, row: dict) -> dict:
    """Median time of one OpenMM step of the row's seed-0 model on the config's water box."""
    import tempfile

    import torch

    import transip
    from common import median_seconds, water_system
    from transip.export import export_checkpoint
    from transip.openmm_plugin.md import build_simulation

    cost = config["cost"]
    torch.set_num_threads(cost["threads"])
    transip.native.keep_freed_memory()
    checkpoint = row_dir(config, row) / "seed0" / "best.ckpt"
    box = water_system(cost["atoms"], periodic=True)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "model.pt"
        export_checkpoint(checkpoint, artifact, dtype=cost["dtype"], kernel="fused")
        simulation = build_simulation(artifact, box, timestep_fs=0.5, platform="CPU")
        seconds = median_seconds(simulation.step, 1, cost["blocks"], cost["steps"])
    result = {"row": row["name"], "atoms": len(box.numbers), "dtype": cost["dtype"], "threads": cost["threads"],
              "openmm_ms_per_step": 1000 * seconds}
    write_json(row_dir(config, row) / "cost.json", result)
    return result


def summarise(config: dict) -> list:
    rows = []
    for row in config["rows"]:
        folder = row_dir(config, row)
        cells = [json.loads((folder / f"seed{s}" / "result.json").read_text()) for s in config["seeds"]
                 if (folder / f"seed{s}" / "result.json").exists()]
        if not cells:
            continue
        summary = {"row": row["name"], "seeds": len(cells), "parameters": cells[0]["parameters"],
                   "train_hours": statistics.mean(c["train_hours"] for c in cells),
                   "seconds_per_step": statistics.mean(c["seconds_per_step"] for c in cells)}
        for split in SPLITS:
            for key in ("force_mae", "energy_mae_per_atom", "equivariance_force_relative"):
                values = [c[split][key] for c in cells if split in c]
                if values:
                    summary[f"{split}/{key}"] = statistics.mean(values)
                    summary[f"{split}/{key}/spread"] = (max(values) - min(values)) / 2
        cost = folder / "cost.json"
        summary["openmm_ms_per_step"] = json.loads(cost.read_text())["openmm_ms_per_step"] if cost.exists() else None
        rows.append(summary)
    return rows


def write_report(config: dict, config_path: Path, rows: list) -> None:
    from common import machine, write_results

    training, cost = config["training"], config["cost"]
    lines = [
        f"Command: `python benchmarks/ablation.py --config {config_path.relative_to(ROOT)}` (then `--cost`). "
        f"Data `{config['data']}`; every row trains with objective `{training.get('objective', 'transip')}`, "
        f"{training['max_train_structures']} training structures, {training['epochs']} epochs of batch "
        f"{training['batch_size']}, {config['threads']} thread(s), seeds {config['seeds']}; mean over seeds (half "
        "the spread in brackets). Force MAE in meV/A, energy MAE in meV/atom, equivariance error "
        "|F(Rx) - R F(x)| / |F(x)|. MD cost: one OpenMM step (CPU platform) on a periodic water box of "
        f"{cost['atoms']} atoms, {cost['dtype']}, fused kernel, {cost['threads']} threads.", "",
        "| row | parameters | " + " | ".join(f"F {s}" for s in SPLITS) + " | E scaffolds | E clusters | "
        "equivariance (scaffolds) | train h | s/step | OpenMM ms/step |",
        "| --- " * (len(SPLITS) + 8) + "|"]
    for r in rows:
        def cell(key, scale=1000.0, digits=1):
            if key not in r:
                return "-"
            return f"{scale * r[key]:.{digits}f} ({scale * r[key + '/spread']:.{digits}f})"
        lines.append(
            f"| {r['row']} | {r['parameters']} | " + " | ".join(cell(f"{s}/force_mae") for s in SPLITS)
            + f" | {cell('test_scaffolds/energy_mae_per_atom', digits=2)} | "
            f"{cell('test_clusters/energy_mae_per_atom', digits=2)} | "
            f"{cell('test_scaffolds/equivariance_force_relative', 1.0, 4)} | {r['train_hours']:.2f} | "
            f"{r['seconds_per_step']:.3f} | "
            + (f"{r['openmm_ms_per_step']:.1f}" if r["openmm_ms_per_step"] is not None else "not measured") + " |")
    out = ROOT / config["report"] / "ablation"
    write_results(out, {"config": config, "rows": rows, "machine": machine()}, lines)
    plot_error_against_cost(rows, out.with_suffix(".png"))


def plot_error_against_cost(rows: list, path: Path) -> None:
    """Force MAE on held-out scaffolds against the MD cost of each measured row, in row order."""
    measured = [r for r in rows if r["openmm_ms_per_step"] is not None and "test_scaffolds/force_mae" in r]
    if not measured:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["openmm_ms_per_step"] for r in measured]
    y = [1000 * r["test_scaffolds/force_mae"] for r in measured]
    ax.plot(x, y, color="0.7", zorder=1)
    # Rows that change only training (EMA, schedule) share one MD cost: a marker per row, names in the legend.
    for index, (r, xi, yi) in enumerate(zip(measured, x, y)):
        ax.errorbar([xi], [yi], yerr=[1000 * r["test_scaffolds/force_mae/spread"]], fmt="osD^vP*X"[index % 8],
                    capsize=3, markersize=7, label=f"{index + 1}: {r['row']}", zorder=2)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("OpenMM ms per MD step (999-atom water box)")
    ax.set_ylabel("force MAE, held-out scaffolds (meV/A)")
    ax.set_yscale("log")
    ax.set_title("Each change added in turn (mean of seeds; bars: half the spread)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--cost", action="store_true", help="time each row's model in OpenMM (idle machine)")
    parser.add_argument("--parallel", type=int, default=None, help="cells trained at once (default: config)")
    parser.add_argument("--output", type=Path, default=None, help="cells and report here instead of the config's")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the finished cells")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    config_path = args.config.resolve()
    config = json.loads(config_path.read_text())
    if args.output is not None:
        config["output"] = config["report"] = str(args.output.resolve())
    if args.report_only:
        write_report(config, config_path, summarise(config))
        return 0
    cells = [(row, seed) for row in config["rows"] for seed in config["seeds"]]
    parallel = args.parallel or config.get("parallel", 1)
    with concurrent.futures.ProcessPoolExecutor(parallel) as pool:
        futures = [pool.submit(run_cell, config, row, seed) for row, seed in cells]
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="ablation cells"):
            future.result()
    if args.cost:
        for row in tqdm(config["rows"], desc="MD cost"):
            measure_cost(config, row)
    write_report(config, config_path, summarise(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

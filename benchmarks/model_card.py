"""Writes a shipped model's card (MODEL_DIR/README.md) from its checkpoint and committed results files only.

    python benchmarks/model_card.py models/transip-xtb-chemistry --config configs/chemistry_model.json \\
        --metrics models/transip-xtb-chemistry/test_metrics.json --stability docs/stability/stability.json

Every number in the card comes from one of: the checkpoint (architecture, parameters, trained domain, splits,
training history and budget), the metrics file (`transip evaluate ... --json`), the stability report
(`benchmarks/stability.py`) and the dataset's manifest. Rerun it after any of them changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stability import rdf_summary

ROOT = Path(__file__).resolve().parents[1]
SPLIT_NAMES = {"test_frames": "held-out frames (molecules seen in training)",
               "test_scaffolds": "held-out scaffolds (drug-like molecules never seen)",
               "test_clusters": "held-out clusters (solvent clusters never seen)",
               "condensed": "periodic boxes (water, methanol, drug in water)"}


def dataset_frames(dataset: str):
    """The frame count a sharded dataset's manifest records (None for a single file or an unrecorded count)."""
    manifest = ROOT / dataset / "manifest.json"
    return json.loads(manifest.read_text())["summary"].get("frames") if manifest.exists() else None


def training_time(last: dict, train: dict) -> str:
    wall = f"{last['hours']:.2f} h of wall-clock time"
    if "cpu_hours" not in last:
        return wall
    budget = f" (budget {train['max_hours']} CPU h)" if train.get("budget_clock") == "cpu" else ""
    return f"{last['cpu_hours']:.2f} h of process CPU time{budget}, {wall}"


def unseen_note(metrics: dict) -> str:
    """How much worse molecules never seen are than new frames of seen ones, from the metrics themselves."""
    unseen = metrics.get("test_scaffolds") or metrics.get("test_molecules")
    if not unseen or "test_frames" not in metrics:
        return ""
    ratio = unseen["force_mae"] / metrics["test_frames"]["force_mae"]
    return (f": the force error on molecules never seen is {ratio:.2f}x that on new frames of seen ones, so "
            "measure it on molecules like yours before trusting it")


def card(model_dir: Path, config_path: Path, metrics: dict, stability) -> str:
    from transip.checkpoint import config_of, load_checkpoint

    best = load_checkpoint(model_dir / "best.ckpt")
    arch, train, domain = config_of(best), best["train_config"], best["trained_domain"]
    history = best["history"]
    name = model_dir.name
    rel = model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir
    frames = dataset_frames(train["data"])
    lines = [
        f"# Model card: {name}", "",
        "A TransIP potential (learned rotational equivariance, [docs/model.md](../../docs/model.md)) with a "
        "screened nuclear repulsion and geometry in every attention block, trained on GFN2-xTB labels of drug-like "
        "molecules, their ions and radicals, solvent clusters and a repulsive wall"
        + (", and periodic liquid boxes" if train.get("extra_data") else "") + ". It is the project's default "
        "model: the README demo, the examples, the benchmarks and the tests run it.", "",
        "| | |", "| --- | --- |",
        "| files | `best.ckpt` (lowest validation force MAE, EMA weights: the one to use), `last.ckpt` (resumable), "
        "`train.log`, "
        "`learning_curves.png`, `config.json`, `test_metrics.json` |",
        f"| architecture | d_model {arch['d_model']}, {arch['num_heads']} heads, {arch['num_layers']} layers, cutoff "
        f"{arch['cutoff']} A, {arch['num_rbf']} radial basis functions, edge embedding {arch['edge_hidden']}, "
        f"repulsion `{arch['repulsion']}`, geometry in blocks `{arch['block_geometry']}`; "
        f"{best['provenance']['parameters']} parameters |",
        f"| data | `{train['data']}`" + (f" ({frames} frames)" if frames else "") + "; its card: "
        f"[{train['data']}/README.md](../../{train['data']}/README.md)"
        + "".join(f"; plus every frame of `{extra}` ({dataset_frames(extra) or '?'} frames, repeated "
                  f"{train.get('extra_data_repeats', 1)}x per epoch; [its card](../../{extra}/README.md))"
                  for extra in train.get("extra_data") or []) + " |",
        f"| trained domain | elements {' '.join(domain['elements'])}; total charges {domain['charges']}; spin "
        f"multiplicities {domain['spins']} (recorded in the checkpoint; every front end refuses anything else unless "
        "told to allow it) |",
        "| splits | " + ", ".join(f"{k} {len(v)}" for k, v in best["splits"].items()
                                   if k not in ("held_out_molecules", "test_molecules")) + " |",
        f"| training | objective `{train['objective']}`, {train.get('force_loss', 'mse')} force loss, weight EMA "
        f"{train.get('ema_decay', 0.0)}, `{train.get('lr_schedule', 'cosine')}` schedule from lr {train['lr']}, batch "
        f"{train['batch_size']}, {train['dtype']}, seed {train['seed']}; {best['epoch']} epochs ({best['step']} steps) "
        f"to the best checkpoint; {training_time(history[-1], train)} on {train['threads']} thread(s) |",
        f"| reproduce | `transip train --config {config_path.relative_to(ROOT)} -o {rel}`, then `transip evaluate "
        f"{rel}/best.ckpt --splits {' '.join(metrics)} --json {rel}/test_metrics.json` |", "",
        "## Held-out metrics", "",
        f"From `{rel}/test_metrics.json` (float64; equivariance over random rotations of structures spread over each "
        "split):", "",
        "| test set | structures | energy MAE (meV/atom) | force MAE (meV/A) | force cosine | force equivariance "
        "error |", "| --- | --- | --- | --- | --- | --- |"]
    for split, m in metrics.items():
        lines.append(f"| {SPLIT_NAMES.get(split, split)} | {m['structures']} | {1000 * m['energy_mae_per_atom']:.2f} | "
                     f"{1000 * m['force_mae']:.1f} | {m['force_cosine']:.4f} | {m['equivariance_force_relative']:.4f} |")
    if stability:
        md = stability["config"]["md"]
        lines += ["", "## MD stability", "",
                  f"From `docs/stability/stability.json` (`python benchmarks/stability.py --config "
                  f"configs/stability.json`): {md['temperature_K']} K NVT, {md['time_ps']} ps at {md['timestep_fs']} "
                  "fs in OpenMM and LAMMPS. Intact: the bond graph never changed.", "",
                  "| system | engine | atoms | ps | molecules intact | closest contact between molecules (A) | "
                  "T mean (K) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in stability["runs"]:
            lines.append(f"| {r['system']} | {r['engine']} | {r['atoms']} | {r['time_ps']:.1f} | "
                         f"{'yes' if r['intact'] else 'no'} | {r['closest_intermolecular_A']:.2f} | "
                         f"{r['temperature_mean_K']:.1f} |")
        if stability.get("nve"):
            lines += ["", f"Energy conservation (NVE in OpenMM, float64, {stability['config']['nve']['timestep_fs']} fs, "
                      "same report):", "", "| system | atoms | steps | total-energy change (meV/atom) | fluctuation "
                      "(meV/atom) |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| {r['system']} | {r['atoms']} | {r['steps']} | {r['energy_drift_mev_per_atom']:+.3f} | "
                      f"{r['energy_std_mev_per_atom']:.3f} |" for r in stability["nve"]]
        summary = rdf_summary(stability["runs"], stability.get("reference"), stability["config"])
        if summary:
            lines += ["", summary + " Plot: `docs/stability/stability_rdf.png`."]
    lines += ["", "## Where not to use it", "",
              f"- Outside its trained domain: other elements than {' '.join(domain['elements'])}, charges other "
              f"than {domain['charges']}, multiplicities other than {domain['spins']}. The front ends refuse them.",
              "- For accuracy beyond its reference: the labels are GFN2-xTB, a semi-empirical method; the model "
              "inherits its errors (e.g. in hydrogen-bond strengths and conformational energies).",
              "- Where long-range electrostatics or dispersion beyond the cutoff matter: the energy sees neighbours "
              f"within {arch['cutoff']} A per layer only.",
              "- For reactions: the training data holds no bond breaking beyond thermal vibrations and compressed "
              "contacts.",
              "- Read the held-out errors above against the accuracy your question needs" + unseen_note(metrics) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--config", type=Path, required=True, help="the TrainConfig JSON that trained it")
    parser.add_argument("--metrics", type=Path, required=True, help="transip evaluate --json output")
    parser.add_argument("--stability", type=Path, help="benchmarks/stability.py's stability.json")
    args = parser.parse_args(argv)
    model_dir = args.model_dir.resolve()
    stability = json.loads(args.stability.read_text()) if args.stability else None
    text = card(model_dir, args.config.resolve(), json.loads(args.metrics.read_text()), stability)
    (model_dir / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

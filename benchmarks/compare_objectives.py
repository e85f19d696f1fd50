"""Held-out accuracy and equivariance error of checkpoints trained with different objectives.

    python benchmarks/compare_objectives.py models/transip-xtb-small/best.ckpt runs/compare-augment/best.ckpt \
        runs/compare-none/best.ckpt --json docs/objective_comparison.json --markdown docs/objective_comparison.md

Each checkpoint is evaluated on the splits saved in it (held-out frames and held-out molecules); all must
come from the same dataset and split seed for the comparison to mean anything (checked).
"""

import argparse
import json
from pathlib import Path

from transip.checkpoint import load_checkpoint, model_from_checkpoint
from transip.data import read_structures
from transip.metrics import accuracy, equivariance_error, spread_subset
from transip.train import TrainConfig, Trainer

SPLITS = ("test_frames", "test_molecules")


def time_training_steps(payload, steps: int) -> float:
    """Milliseconds per training step with the checkpoint's settings, timed here (one process at a time,
    same batches for every objective) rather than taken from training logs of runs that shared the CPU."""
    import time

    import torch

    from transip.data import collate

    config = TrainConfig(**{**payload["train_config"], "progress": False})
    trainer = Trainer(config)
    generator = torch.Generator().manual_seed(0)
    chunks = [trainer.train_set[i * config.batch_size:(i + 1) * config.batch_size] for i in range(steps + 5)]
    for chunk in chunks[:5]:
        trainer.train_step(collate(chunk, trainer.model.cutoff, trainer.dtype), generator)
    start = time.perf_counter()  # a whole step: neighbour list, forward, double backward, optimiser
    for chunk in chunks[5:]:
        trainer.train_step(collate(chunk, trainer.model.cutoff, trainer.dtype), generator)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--rotations", type=int, default=8)
    parser.add_argument("--equivariance-structures", type=int, default=128)
    parser.add_argument("--time-steps", type=int, default=40, help="training steps timed per objective")
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args()

    payloads = [load_checkpoint(c) for c in args.checkpoints]
    digests = {p["provenance"]["dataset_sha256"] for p in payloads}
    splits = {json.dumps(p["splits"]["held_out_molecules"]) for p in payloads}
    if len(digests) != 1 or len(splits) != 1:
        raise SystemExit("checkpoints were trained on different datasets or splits: not comparable")
    structures = read_structures(payloads[0]["provenance"]["dataset"])
    rows = []
    for path, payload in zip(args.checkpoints, payloads):
        model = model_from_checkpoint(payload)
        row = {"checkpoint": path, "objective": payload["train_config"]["objective"],
               "epochs": payload["epoch"], "steps": payload["step"],
               "ms_per_step": time_training_steps(payload, args.time_steps)}
        for split in SPLITS:
            chosen = [structures[i] for i in payload["splits"][split]]
            metrics = accuracy(model, chosen)
            metrics.update({f"equivariance_{k}": v for k, v in equivariance_error(
                model, spread_subset(chosen, args.equivariance_structures), args.rotations).items()})
            row[split] = metrics
        rows.append(row)
        print(path, json.dumps(row, indent=1))
    Path(args.json).write_text(json.dumps(rows, indent=1))
    lines = ["| objective | split | E MAE (meV/atom) | F MAE (meV/A) | F cosine | equivariance dE (meV/atom) | "
             "equivariance dF/F | ms/step |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for split in SPLITS:
            m = row[split]
            lines.append(f"| {row['objective']} | {split} | {1000 * m['energy_mae_per_atom']:.2f} | "
                         f"{1000 * m['force_mae']:.1f} | {m['force_cosine']:.4f} | "
                         f"{1000 * m['equivariance_energy_abs_per_atom']:.3f} | "
                         f"{m['equivariance_force_relative']:.4f} | {row['ms_per_step']:.0f} |")
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

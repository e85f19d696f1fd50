"""Training steps per second on the fused path against today's training, same model, same batches, one run.

    python benchmarks/training_speed.py            # writes benchmarks/results/training_speed.{json,md}
    python benchmarks/training_speed.py --smoke    # a few steps of a toy model, for CI

A training step is what `transip train` does per batch (transip.train.Trainer.train_step): the learned-
equivariance objective's two views (the batch and a rotated copy), energy and force losses (the force loss
differentiates the forces: a double backward), the contrastive term, the optimiser step. Batches of the
chemistry data's training split (16 structures, the default batch), the default model size (64 wide, four
heads of 16, two layers) with the repulsion and block geometry, float32. Three settings, each timed on the same batches after warm-up (median
time per step):

- today's training: `transip train` as it ran before the fused path existed: the reference kernel (plain
  autograd), denormal floats kept, freed memory returned to the system, the two views in two model calls
  (TrainConfig kernel="reference", flush_denormals=False, keep_freed_memory=False, joint_views=False);
- the reference kernel with the other three changes (denormals flushed, freed memory kept, both views in one
  call): what they give without the fused path;
- the fused path: native attention, per-edge work with hand-derived second derivatives, and the three changes
  (kernel="fused", the other fields at their defaults).

Each setting runs in its own process, since flushing denormals and keeping freed memory are process-wide. The
settings take turns, `--rounds` times (default 3): a burst of load from elsewhere on a shared machine then hits
one round of every setting instead of all of one setting's steps. Each setting's time is the median of its
rounds; the speed-up of every round is printed as well, so that the spread shows.

The speed-up is the fused path's steps per second over today's training; the losses of every setting must
agree (the script prints their largest relative difference from today's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, write_results

SETTINGS = (("today's training", "reference", False),
            ("reference kernel, the three other changes", "reference", True),
            ("fused path", "fused", True))


def time_steps(setting, args, folder: Path) -> dict:
    import torch

    from transip.data import collate
    from transip.train import TrainConfig, Trainer

    label, kernel, flush = setting
    model = {"d_model": 16, "num_heads": 2, "num_layers": 1, "num_rbf": 8, "edge_hidden": 8} if args.smoke else {}
    config = TrainConfig(data=str(ROOT / "data" / "xtb_chemistry"), output=str(folder / f"{kernel}{flush}"),
                         kernel=kernel, flush_denormals=flush, joint_views=flush, keep_freed_memory=flush,
                         batch_size=args.batch_size, max_train_structures=args.batch_size * args.batches,
                         val_structures=4, progress=False, threads=args.threads, seed=0,
                         model={**model, "repulsion": "zbl", "block_geometry": True})
    trainer = Trainer(config)
    batches = [collate(trainer.train_set[i * args.batch_size:(i + 1) * args.batch_size], trainer.model.cutoff,
                       trainer.dtype) for i in range(args.batches)]
    generator = torch.Generator().manual_seed(0)
    losses, seconds = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(trainer.train_step(batches[step % len(batches)], generator)["loss"])
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    torch.set_flush_denormal(False)
    return {"setting": label, "kernel": kernel, "flush_denormals": flush, "joint_views": flush, "keep_freed_memory": flush,
            "ms_per_step": 1000 * statistics.median(seconds), "losses": losses,
            "atoms_per_batch": statistics.mean(int(b.positions.shape[0]) for b in batches),
            "edges_per_batch": statistics.mean(int(b.edge_index.shape[1]) for b in batches)}


def in_own_process(index: int, argv) -> dict:
    command = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--setting", str(index)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_speed")
    parser.add_argument("--rounds", type=int, default=3, help="turns of all settings (default 3; 1 with --smoke)")
    parser.add_argument("--setting", type=int, help=argparse.SUPPRESS)  # one setting, in a child process
    args = parser.parse_args(argv)
    args.batches, args.warmup, args.steps = (2, 1, 2) if args.smoke else (4, 3, 12)
    if args.setting is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(time_steps(SETTINGS[args.setting], args, Path(tmp))))
        return 0
    from tqdm import tqdm

    rounds = 1 if args.smoke else args.rounds
    runs = [[] for _ in SETTINGS]  # per setting, one result per round
    with tqdm(total=rounds * len(SETTINGS), desc="training speed") as bar:
        for _ in range(rounds):
            for index in range(len(SETTINGS)):
                runs[index].append(in_own_process(index, argv))
                bar.update()
    rows = [dict(results[0], ms_per_step=statistics.median(r["ms_per_step"] for r in results),
                 ms_per_step_rounds=[r["ms_per_step"] for r in results]) for results in runs]
    today, flushed, fused = rows
    speedup = today["ms_per_step"] / fused["ms_per_step"]
    round_speedups = [a / b for a, b in zip(today["ms_per_step_rounds"], fused["ms_per_step_rounds"])]
    loss_difference = max(abs(a - b) / abs(b) for row in rows[1:] for a, b in zip(row["losses"], today["losses"]))

    lines = [f"Training step (objective transip: two views, force loss, contrastive term), batch {args.batch_size} "
             f"of the chemistry training split ({today['atoms_per_batch']:.0f} atoms, "
             f"{today['edges_per_batch']:.0f} edges on average), float32, {args.threads} threads; per setting the median "
             f"of {rounds} round(s) taken in turns, each the median of {args.steps} steps after {args.warmup} warm-up.",
             "",
             "| setting | TrainConfig | ms per step | steps per second | speed-up over today's |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['setting']} | kernel={r['kernel']}, flush_denormals={r['flush_denormals']}, keep_freed_memory="
              f"{r['keep_freed_memory']}, joint_views={r['joint_views']} | {r['ms_per_step']:.1f} | "
              f"{1000 / r['ms_per_step']:.2f} | {today['ms_per_step'] / r['ms_per_step']:.2f}x |" for r in rows]
    lines += ["", f"Fused path: {speedup:.2f}x today's training steps per second (target 3x: "
                  f"{'met' if speedup >= 3.0 else 'not met'}); the three other changes give the reference path "
                  f"{today['ms_per_step'] / flushed['ms_per_step']:.2f}x. Largest relative difference of the losses "
                  f"from today's: {loss_difference:.1e}. Speed-up of each round: "
                  + ", ".join(f"{x:.2f}x" for x in round_speedups) + "."]
    write_results(args.out, {"threads": args.threads, "rounds": rounds, "rows": rows, "speedup": speedup,
                             "round_speedups": round_speedups,
                             "loss_relative_difference": loss_difference, "machine": machine()}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

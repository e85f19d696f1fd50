"""OpenMM steps per second with the shipped model against the bare artifact evaluation, in the same run.

    python benchmarks/openmm_overhead.py            # writes benchmarks/results/openmm_overhead.{json,md}
    python benchmarks/openmm_overhead.py --smoke

For aspirin (21 atoms) and the periodic methanol box (384 atoms, examples/boxes/), the shipped checkpoint
is exported (float64, fused). The script times `compute` of the artifact (energy + forces, neighbour list
included), which is the work of one MD step, and a VerletIntegrator step in OpenMM (CPU platform, 0.5 fs)
with the TorchForce. The overhead is the step time over the evaluation time, minus one. Both are medians of
blocks after warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import MODEL, ROOT, median_seconds, write_results

SYSTEMS = {"aspirin (21 atoms)": ROOT / "examples" / "molecules" / "aspirin.xyz",
           "methanol box (384 atoms, periodic)": ROOT / "examples" / "boxes" / "methanol_box.extxyz"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "openmm_overhead")
    args = parser.parse_args(argv)

    import torch

    import transip
    from transip.data import read_structures
    from transip.export import export_checkpoint, load
    from transip.openmm_plugin.md import build_simulation

    torch.set_num_threads(args.threads)
    transip.native.keep_freed_memory()
    count, size = (2, 2) if args.smoke else (7, 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "model.pt"
        export_checkpoint(MODEL, artifact)
        module, _ = load(artifact)
        for name, path in SYSTEMS.items():
            s = read_structures(path, require_labels=False, index="0")[0]
            cell = torch.tensor(s.cell if s.periodic else [[0.0] * 3] * 3, dtype=torch.float64)
            inputs = (torch.tensor(s.positions), torch.tensor(s.numbers), cell, torch.tensor([s.periodic] * 3),
                      s.charge, s.spin, False)

            def evaluate(n):
                for _ in range(n):
                    module.compute(*inputs)

            simulation = build_simulation(artifact, s, timestep_fs=0.5, platform="CPU")
            bare = median_seconds(evaluate, 1, count, size)
            step = median_seconds(simulation.step, 1, count, size)
            rows.append(dict(system=name, atoms=len(s.numbers), artifact_ms=1e3 * bare, openmm_step_ms=1e3 * step,
                             steps_per_second=1.0 / step, ns_per_day=0.5e-6 / step * 86400,
                             overhead=step / bare - 1.0))
    lines = [f"Shipped model (float64, fused), OpenMM CPU platform, VerletIntegrator 0.5 fs, {args.threads} threads; "
             f"median of {count} blocks of {size}.", "",
             "| system | atoms | artifact evaluation (ms) | OpenMM step (ms) | steps/s | ns/day | OpenMM overhead |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['atoms']} | {r['artifact_ms']:.2f} | {r['openmm_step_ms']:.2f} | "
                     f"{r['steps_per_second']:.1f} | {r['ns_per_day']:.2f} | {100 * r['overhead']:+.1f} % |")
    write_results(args.out, {"threads": args.threads, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

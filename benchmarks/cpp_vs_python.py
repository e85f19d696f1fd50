"""Per-evaluation time of the shipped model: C++ (transip-bench, libtorch only) versus Python, same run.

    python benchmarks/cpp_vs_python.py                 # writes benchmarks/results/cpp_vs_python.{json,md}
    python benchmarks/cpp_vs_python.py --smoke         # one repeat, for CI

For float64 and float32, fused and reference kernels, the shipped checkpoint is exported to a temporary
folder; on aspirin (21 atoms) and a periodic water box (999 atoms) it then times one energy + forces
evaluation, neighbour list included, three ways: `transip-bench` (C++), the artifact loaded in Python
(`transip.export.load(...).compute`) and the eager Python model (`collate` + `evaluate_batch`). The
artifacts build their own neighbour list (native cell list with the fused kernel, the all-pairs reference
otherwise); the eager model always uses the native cell list, which is why it beats the reference
artifacts on the 999-atom box. Each time is
the median of the repeats after warm-up; every process uses the same number of threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MODEL, ROOT, median_seconds, water_system, write_results

KINDS = [(d, k) for d in ("float64", "float32") for k in ("fused", "reference")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpp_vs_python")
    args = parser.parse_args(argv)

    import ase
    import ase.io
    import torch
    from tqdm import tqdm

    from transip import native
    from transip.checkpoint import model_from_checkpoint
    from transip.data import collate, evaluate_batch, structure_from_atoms, write_extxyz_exact
    from transip.export import export_checkpoint, load

    torch.set_num_threads(args.threads)
    warmup, repeat = (1, 1) if args.smoke else (3, 15)
    bench = Path(native.library_path()).parent / "transip-bench"
    structures = {"aspirin (21 atoms)": structure_from_atoms(ase.io.read(ROOT / "examples/molecules/aspirin.xyz"),
                                                             require_labels=False),
                  "water box (999 atoms, periodic)": water_system(999, periodic=True)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, s in structures.items():
            write_extxyz_exact(s, tmp / "structure.extxyz")
            s_inputs = (torch.tensor(s.positions), torch.tensor(s.numbers),
                        torch.tensor(s.cell if s.periodic else [[0.0] * 3] * 3),
                        torch.tensor(s.pbc if s.periodic else [False] * 3))
            for dtype, kernel in tqdm(KINDS, desc=name, unit="artifact"):
                path = tmp / f"{dtype}-{kernel}.pt"
                if not path.exists():
                    export_checkpoint(MODEL, path, dtype=dtype, kernel=kernel)
                run = subprocess.run([str(bench), str(path), str(tmp / "structure.extxyz"), "--warmup", str(warmup),
                                      "--repeat", str(repeat), "--threads", str(args.threads), "--json",
                                      str(tmp / "cpp.json")], capture_output=True, text=True)
                if run.returncode != 0:
                    raise SystemExit(f"transip-bench failed: {run.stderr}")
                cpp = json.loads((tmp / "cpp.json").read_text())
                module, _ = load(path)
                artifact_seconds = median_seconds(lambda calls: module.compute(*s_inputs, 0, 1, False), warmup,
                                                  repeat)
                model = model_from_checkpoint(MODEL, dtype=getattr(torch, dtype)).set_kernel(kernel)
                eager_seconds = median_seconds(
                    lambda calls: evaluate_batch(model, collate([s], model.cutoff, dtype=getattr(torch, dtype))),
                    warmup, repeat)
                energy_python = float(module.compute(*s_inputs, 0, 1, False)["energy"].detach())
                rows.append(dict(structure=name, dtype=dtype, kernel=kernel, cpp_ms=1e3 * cpp["seconds_median"],
                                 python_artifact_ms=1e3 * artifact_seconds, python_eager_ms=1e3 * eager_seconds,
                                 cpp_peak_mib=cpp["peak_rss_mib"], energy_difference=abs(cpp["energy"] - energy_python)))
    lines = [f"Shipped model, energy + forces including the neighbour list, {args.threads} threads, median of "
             f"{repeat} after {warmup} warm-up.", "",
             "| structure | dtype | kernel | C++ (ms) | Python, artifact (ms) | Python, eager model (ms) "
             "| eager / C++ | C++ peak MiB | C++ vs Python energy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['structure']} | {r['dtype']} | {r['kernel']} | {r['cpp_ms']:.2f} | "
                     f"{r['python_artifact_ms']:.2f} | {r['python_eager_ms']:.2f} | "
                     f"{r['python_eager_ms'] / r['cpp_ms']:.2f} | {r['cpp_peak_mib']:.0f} | "
                     f"{r['energy_difference']:.1e} eV |")
    write_results(args.out, {"threads": args.threads, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

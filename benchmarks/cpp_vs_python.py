"""Per-evaluation time of the shipped model: C++ (transip-bench, libtorch only) versus Python, same run.

    python benchmarks/cpp_vs_python.py                 # writes benchmarks/results/cpp_vs_python.{json,md}
    python benchmarks/cpp_vs_python.py --smoke         # one repeat, for CI

For float64 and float32, fused and reference kernels, the shipped checkpoint is exported to a temporary
folder; on aspirin (21 atoms) and periodic water boxes of 999, 3 000 and 9 999 atoms (the larger two with the
fused kernel only) it then times one energy + forces evaluation, neighbour list included, three ways:
`transip-bench` (C++), the artifact loaded in Python (`transip.export.load(...).compute`) and the eager Python
model (`collate` + `evaluate_batch`). The artifacts build their own neighbour list (native cell list with the
fused kernel, the all-pairs reference otherwise); the eager model always uses the native cell list, which is
why it beats the reference artifacts on the 999-atom box. Each time is the median of the repeats after
warm-up; every process uses the same number of threads. Then float32's speed-up on each box: float64 and
float32 in turns, `--rounds` times, the median of the rounds' ratios. On the first box the torch profiler then
shows where one call's time goes in each precision (each op's own time). Then float32's accuracy:
the float32 model's energies and forces against the float64 model's on held-out scaffolds of the chemistry data.
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
WATER_BOXES = (1000, 3000, 10000)  # water boxes (atoms asked for; the lattice of whole molecules gives 999, ...)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpp_vs_python")
    parser.add_argument("--rounds", type=int, default=5, help="turns of float64 and float32 per box (default 5)")
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
                                                             require_labels=False)}
    for atoms in (1000,) if args.smoke else WATER_BOXES:
        box = water_system(atoms, periodic=True)
        structures[f"water box ({len(box.numbers)} atoms, periodic)"] = box
    rows, speedups, profile = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, s in structures.items():
            write_extxyz_exact(s, tmp / "structure.extxyz")
            s_inputs = (torch.tensor(s.positions), torch.tensor(s.numbers),
                        torch.tensor(s.cell if s.periodic else [[0.0] * 3] * 3),
                        torch.tensor(s.pbc if s.periodic else [False] * 3))
            # Past the first box only the fused kernel: the reference's all-pairs neighbour list grows as N^2.
            kinds = KINDS if len(s.numbers) <= 1000 else [(d, k) for d, k in KINDS if k == "fused"]
            for dtype, kernel in tqdm(kinds, desc=name, unit="artifact"):
                path = tmp / f"{dtype}-{kernel}.pt"
                if not path.exists():
                    export_checkpoint(MODEL, path, dtype=dtype, kernel=kernel)
                cpp = run_bench(bench, path, tmp / "structure.extxyz", warmup, repeat, args.threads)
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
            if s.periodic:  # a box: float32 against float64 in turns
                speedups.append(float32_speedup(bench, tmp, name, 1 if args.smoke else args.rounds, warmup, repeat,
                                                args.threads))
                if profile is None:  # the first box: where a call's time goes, per op, in both precisions
                    profile = profile_call(tmp, name, s_inputs, warmup, 1 if args.smoke else 10)
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
    lines += ["", f"float32 speed-up over float64 (fused kernel, C++ program, {args.threads} threads): per box, "
              f"float64 and float32 timed in turns, {speedups[0]['rounds']} round(s) (a burst of load from elsewhere "
              "then hits one round of both, not all of one); the speed-up is the median of the rounds' ratios.", "",
              "| structure | float64 (ms), median of rounds | float32 (ms) | speed-up | speed-up of each round |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['structure']} | {r['float64_ms']:.2f} | {r['float32_ms']:.2f} | {r['speedup']:.2f}x | "
              + ", ".join(f"{x:.2f}" for x in r["round_speedups"]) + " |" for r in speedups]
    lines += ["", f"Where one call's time goes on the {profile['structure']}: each op's own time per call (torch "
              f"profiler, Python artifact, fused kernel, {args.threads} threads, mean of {profile['calls']} calls; the "
              "profiler's own cost per op inflates the small ones), the ops taking most of float32's time. `compute` "
              "is the TorchScript interpreter's own work between the ops.", "",
              "| op | calls | float64 (ms) | float32 (ms) | float64 / float32 |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{r['op']}` | {r['calls']} | {r['float64_ms']:.3f} | {r['float32_ms']:.3f} | "
              f"{r['float64_ms'] / max(r['float32_ms'], 1e-9):.2f} |" for r in profile["ops"]]
    lines.append(f"| all ops | | {profile['total_ms']['float64']:.2f} | {profile['total_ms']['float32']:.2f} | "
                 f"{profile['total_ms']['float64'] / profile['total_ms']['float32']:.2f} |")
    accuracy = float32_accuracy(4 if args.smoke else 100)
    lines += ["", f"float32 against float64, same model (fused kernel), on {accuracy['structures']} held-out scaffold "
                  "structures of the chemistry data (`test_scaffolds`, elements the model knows): differences of the "
                  "float32 evaluation from the float64 one, beside the float64 model's own error against the "
                  "reference labels for scale.", "",
              "| quantity | mean abs. difference float32 - float64 | largest | model error (float64 vs labels) |",
              "| --- | --- | --- | --- |",
              f"| energy per atom (meV/atom) | {accuracy['energy_mean_mev_atom']:.2e} | "
              f"{accuracy['energy_max_mev_atom']:.2e} | {accuracy['model_energy_mae_mev_atom']:.1f} |",
              f"| force component (meV/A) | {accuracy['force_mean_mev_a']:.2e} | {accuracy['force_max_mev_a']:.2e} | "
              f"{accuracy['model_force_mae_mev_a']:.1f} |"]
    write_results(args.out, {"threads": args.threads, "rows": rows, "float32_speedup": speedups,
                             "float32_profile": profile, "float32_accuracy": accuracy}, lines)
    return 0


def run_bench(bench: Path, model: Path, structure: Path, warmup: int, repeat: int, threads: int) -> dict:
    """transip-bench's JSON for one artifact and structure."""
    out = structure.with_name("cpp.json")
    run = subprocess.run([str(bench), str(model), str(structure), "--warmup", str(warmup), "--repeat", str(repeat),
                          "--threads", str(threads), "--json", str(out)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"transip-bench failed: {run.stderr}")
    return json.loads(out.read_text())


def float32_speedup(bench: Path, tmp: Path, name: str, rounds: int, warmup: int, repeat: int, threads: int) -> dict:
    """float64 and float32 (fused) on the structure in tmp, in turns; the median of the rounds' ratios."""
    import statistics

    times = {"float64": [], "float32": []}
    for _ in range(rounds):
        for dtype in times:
            result = run_bench(bench, tmp / f"{dtype}-fused.pt", tmp / "structure.extxyz", warmup, repeat, threads)
            times[dtype].append(1e3 * result["seconds_median"])
    ratios = [a / b for a, b in zip(times["float64"], times["float32"])]
    return {"structure": name, "rounds": rounds, "float64_ms": statistics.median(times["float64"]),
            "float32_ms": statistics.median(times["float32"]), "speedup": statistics.median(ratios),
            "round_speedups": ratios}


def profile_call(tmp: Path, name: str, inputs: tuple, warmup: int, calls: int, shown: int = 14) -> dict:
    """Each op's own CPU time per call (torch profiler) of the fused float64 and float32 artifacts on one
    structure: the `shown` ops with the most float32 time, and the totals."""
    from torch.profiler import ProfilerActivity, profile

    from transip.export import load

    per_op = {}
    for dtype in ("float64", "float32"):
        module, _ = load(tmp / f"{dtype}-fused.pt")
        for _ in range(warmup):
            module.compute(*inputs, 0, 1, False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                module.compute(*inputs, 0, 1, False)
        per_op[dtype] = {e.key: (e.self_cpu_time_total / 1e3 / calls, e.count // calls) for e in prof.key_averages()}
    names = sorted(set(per_op["float64"]) | set(per_op["float32"]), key=lambda k: -per_op["float32"].get(k, (0, 0))[0])
    ops = [{"op": k, "calls": per_op["float32"].get(k, (0, 0))[1], "float64_ms": per_op["float64"].get(k, (0, 0))[0],
            "float32_ms": per_op["float32"].get(k, (0, 0))[0]} for k in names[:shown]]
    return {"structure": name, "calls": calls, "ops": ops,
            "total_ms": {d: sum(t for t, _ in per_op[d].values()) for d in per_op}}


def float32_accuracy(count: int) -> dict:
    """Energy and force differences of the float32 model from the float64 one on held-out scaffolds."""
    import numpy as np
    import torch

    from transip.checkpoint import model_from_checkpoint
    from transip.data import collate, evaluate_batch, read_structures, split_indices
    from transip.metrics import spread_subset

    data = ROOT / "data" / "xtb_chemistry"
    structures = read_structures(str(data))
    held_out = [structures[i] for i in split_indices(structures)["test_scaffolds"]]
    models = {dtype: model_from_checkpoint(MODEL, dtype=dtype).set_kernel("fused")
              for dtype in (torch.float64, torch.float32)}
    known = set(int(z) for z in models[torch.float64].config.elements)
    chosen = spread_subset([s for s in held_out if set(s.numbers.tolist()) <= known], count)
    de, df, me, mf = [], [], [], []
    for s in chosen:
        out = {dtype: evaluate_batch(model, collate([s], model.cutoff, dtype)) for dtype, model in models.items()}
        e64, e32 = (float(out[d]["energy"][0].detach()) for d in (torch.float64, torch.float32))
        f64, f32 = (out[d]["forces"].detach().double().numpy() for d in (torch.float64, torch.float32))
        n = len(s.numbers)
        de.append(abs(e32 - e64) / n)
        df.append(np.abs(f32 - f64).ravel())
        me.append(abs(e64 - s.energy) / n)
        mf.append(np.abs(f64 - s.forces).ravel())
    df, mf = np.concatenate(df), np.concatenate(mf)
    return {"structures": len(chosen), "energy_mean_mev_atom": 1000 * float(np.mean(de)),
            "energy_max_mev_atom": 1000 * float(np.max(de)), "force_mean_mev_a": 1000 * float(df.mean()),
            "force_max_mev_a": 1000 * float(df.max()), "model_energy_mae_mev_atom": 1000 * float(np.mean(me)),
            "model_force_mae_mev_a": 1000 * float(mf.mean())}


if __name__ == "__main__":
    sys.exit(main())

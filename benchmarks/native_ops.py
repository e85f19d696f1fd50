"""Fused (native ops) versus reference (plain PyTorch) path: whole-model energy + forces from 100 to 100 000 atoms.

    python benchmarks/native_ops.py                       # full run, writes benchmarks/results/native_ops.*
    python benchmarks/native_ops.py --smoke               # two small sizes, seconds (CI runs this)
    python benchmarks/native_ops.py --return-freed-memory --out benchmarks/results/native_ops_default_malloc

For every system size, kind (periodic water box; the same water cluster without a box, i.e. a large molecule)
and path, a fresh subprocess loads the shipped model, builds the neighbour list with the native cell list,
and times forward + backward (energy and forces, no neighbour list) after a warm-up: the median over repeats.
Peak memory is the process's resident-set high-water mark during the first evaluation above what it held
before (Linux: /proc/self/clear_refs resets the mark). The attention op alone is timed on the same graphs with
the model's head layout, and its arithmetic rate is compared with the CPU's peak.

Outputs: <out>.json (every measurement), <out>.md (table), <out>.png (time per atom, memory, ratio).
The reference path is skipped where its memory, extrapolated linearly from the previous size, would exceed
--memory-limit-gb; the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (MODEL, ROOT, machine, repeated_seconds, reset_peak_rss, rss_kib, run_task, water_system,
                    with_self_edges)

FULL_SIZES = (100, 300, 1000, 3000, 10000, 30000, 100000)
SMOKE_SIZES = (100, 300)


# ------------------------------------------------------------------------------------------ one measurement
def measure(task: dict) -> dict:
    """Runs in a fresh process: time and peak memory of one (size, kind, path, dtype)."""
    import torch

    from transip.checkpoint import model_from_checkpoint
    from transip.data import collate

    torch.set_num_threads(task["threads"])
    if task["keep_freed_memory"]:
        import transip

        transip.native.keep_freed_memory()
    dtype = getattr(torch, task["dtype"])
    model = model_from_checkpoint(MODEL, dtype=dtype).set_kernel(task["kernel"])
    for p in model.parameters():
        p.requires_grad_(False)  # inference, as in MD
    structure = water_system(task["atoms"], task["kind"] == "box")
    start = time.perf_counter()
    batch = collate([structure], model.cutoff, dtype=dtype)
    neighbor_seconds = time.perf_counter() - start
    shift_vectors = batch.shift_vectors()

    def evaluate():
        return model(batch.positions, batch.numbers, batch.charge, batch.spin, batch.batch, batch.edge_index,
                     shift_vectors, 1, compute_forces=True)

    # Peak memory of the first evaluation, from a clean heap: after it, the allocator keeps freed blocks mapped,
    # which would hide part of the next evaluations' use.
    before = rss_kib("VmRSS")
    reset_peak_rss()
    evaluate()  # also the warm-up
    peak = rss_kib("VmHWM")
    times = repeated_seconds(evaluate, task["min_repeats"], task["max_repeats"], task["min_seconds"])
    result = dict(task, edges=int(batch.edge_index.shape[1]), seconds=statistics.median(times), repeats=len(times),
                  neighbor_seconds=neighbor_seconds, peak_mib=max(0, peak - before) / 1024)
    result.update(attention_rate(model, batch, task, dtype))
    return result


def attention_rate(model, batch, task: dict, dtype) -> dict:
    """Time forward + backward of one attention layer alone on this graph (self edges included)."""
    import torch

    from transip.attention import neighbor_attention_reference

    n = int(batch.positions.shape[0])
    heads, head_dim = model.blocks[0].num_heads, model.blocks[0].head_dim
    receivers, senders, row_ptr = with_self_edges(batch.edge_index, n)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, head_dim, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3))
    bias = torch.randn(receivers.numel(), heads, generator=g, dtype=dtype).requires_grad_(True)
    envelope = torch.rand(receivers.numel(), generator=g, dtype=dtype).requires_grad_(True)
    if task["kernel"] == "fused":
        def layer():
            return torch.ops.transip.neighbor_attention(q, k, v, bias, envelope, row_ptr, senders)
    else:
        def layer():
            return neighbor_attention_reference(q, k, v, bias, envelope, receivers, senders)
    times = []
    for repeat in range(4):
        start = time.perf_counter()
        out = layer()
        torch.autograd.grad(out, (q, k, v, bias, envelope), torch.ones_like(out))
        if repeat:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    # Multiply-adds per edge and head, counting the vector work (scalar exp/max/divide ignored):
    # forward q.k (2D) + weight-and-accumulate v (3D: counted as when the kernel still rescaled its accumulator, so
    # rates stay comparable with earlier results); backward q.k again (2D), g.v (2D), dq (2D), dk (2D), dv (2D).
    flops = 15 * head_dim * heads * receivers.numel()
    return dict(attention_seconds=seconds, attention_gflops=flops / seconds / 1e9, attention_edges=int(receivers.numel()))


# ------------------------------------------------------------------------------------------ report
def write_report(results: list, info: dict, out: Path, dtype: str) -> None:
    peak = info.get(f"peak_gflops_{dtype}")
    by_key = {(r["kind"], r["atoms"], r["kernel"]): r for r in results}
    kept = all(r.get("keep_freed_memory") for r in results)
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, kernels {info['isa']}, {dtype}; "
             f"freed memory {'kept in the heap (transip.native.keep_freed_memory)' if kept else 'returned (glibc default)'}"
             " for both paths.",
             "Energy + forces per evaluation (forward + backward, neighbour list excluded), median of repeats.", "",
             "| system | atoms | edges | fused (ms) | reference (ms) | speed-up | fused us/atom | fused peak MiB "
             "| reference peak MiB | memory ratio | attention op GFLOP/s (% of peak) | attention op speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind in ("box", "molecule"):
        for atoms in sorted({r["atoms"] for r in results}):
            fused, ref = by_key.get((kind, atoms, "fused")), by_key.get((kind, atoms, "reference"))
            if fused is None or "skipped" in fused:
                continue
            row = [kind, str(fused["atoms_actual"]), str(fused["edges"]), f"{1e3 * fused['seconds']:.1f}"]
            if ref is not None and "skipped" not in ref:
                row += [f"{1e3 * ref['seconds']:.1f}", f"{ref['seconds'] / fused['seconds']:.1f}x"]
            else:
                row += [f"not run ({ref['skipped']})" if ref else "not run", "-"]
            row += [f"{1e6 * fused['seconds'] / fused['atoms_actual']:.1f}", f"{fused['peak_mib']:.0f}"]
            if ref is not None and "skipped" not in ref:
                row += [f"{ref['peak_mib']:.0f}", f"{ref['peak_mib'] / max(fused['peak_mib'], 1e-9):.1f}x"]
            else:
                row += ["-", "-"]
            share = f" ({100 * fused['attention_gflops'] / peak:.1f} %)" if peak else ""
            row.append(f"{fused['attention_gflops']:.1f}{share}")
            row.append(f"{ref['attention_seconds'] / fused['attention_seconds']:.1f}x"
                       if ref is not None and "skipped" not in ref else "-")
            lines.append("| " + " | ".join(row) + " |")
    if peak:
        lines += ["", f"Peak {dtype} rate assumed: {peak:.0f} GFLOP/s ({info['peak_assumption']}, "
                      f"{info['ghz']:.2f} GHz)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, out.with_suffix(".png"), dtype)


def plot(results: list, path: Path, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    styles = {("box", "fused"): "C0-o", ("box", "reference"): "C0--s", ("molecule", "fused"): "C1-o",
              ("molecule", "reference"): "C1--s"}
    ok = [r for r in results if "skipped" not in r]
    for (kind, kernel), style in styles.items():
        rows = sorted((r for r in ok if r["kind"] == kind and r["kernel"] == kernel), key=lambda r: r["atoms_actual"])
        if not rows:
            continue
        x = [r["atoms_actual"] for r in rows]
        label = f"{kernel}, {'periodic water box' if kind == 'box' else 'water cluster (no box)'}"
        axes[0].plot(x, [1e6 * r["seconds"] / r["atoms_actual"] for r in rows], style, label=label)
        axes[1].plot(x, [r["peak_mib"] for r in rows], style, label=label)
    for kind, colour in (("box", "C0"), ("molecule", "C1")):
        pairs = []
        for r in ok:
            if r["kind"] == kind and r["kernel"] == "fused":
                ref = next((q for q in ok if q["kind"] == kind and q["kernel"] == "reference"
                            and q["atoms"] == r["atoms"]), None)
                if ref:
                    pairs.append((r["atoms_actual"], ref["seconds"] / r["seconds"], ref["peak_mib"] / r["peak_mib"]))
        pairs.sort()
        if pairs:
            axes[2].plot([p[0] for p in pairs], [p[1] for p in pairs], f"{colour}-o", label=f"time, {kind}")
            axes[2].plot([p[0] for p in pairs], [p[2] for p in pairs], f"{colour}:^", label=f"peak memory, {kind}")
    axes[0].set(xscale="log", yscale="log", xlabel="atoms", ylabel="microseconds per atom (energy + forces)",
                title="Time per atom (flat = linear scaling)")
    axes[1].set(xscale="log", yscale="log", xlabel="atoms", ylabel="peak memory of an evaluation (MiB)",
                title="Peak memory")
    axes[2].axhline(5, color="grey", lw=0.8, ls="--")
    axes[2].axhline(3, color="grey", lw=0.8, ls=":")
    axes[2].set(xscale="log", xlabel="atoms", ylabel="reference / fused", title="Fused advantage (targets 5x, 3x)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"TransIP shipped model, {dtype}, CPU: fused native ops vs plain PyTorch reference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="atom counts (default 100 ... 100000)")
    parser.add_argument("--smoke", action="store_true", help="two small sizes, one repeat: checks the pipeline")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--memory-limit-gb", type=float, default=14.0)
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="leave glibc's default (return big freed blocks to the system) instead of "
                             "transip.native.keep_freed_memory() in every run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "native_ops")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        result = measure(task)
        print(json.dumps(result))
        return 0

    from tqdm import tqdm

    sizes = args.sizes or (SMOKE_SIZES if args.smoke else FULL_SIZES)
    repeats = dict(min_repeats=1, max_repeats=1, min_seconds=0.0) if args.smoke else \
        dict(min_repeats=3, max_repeats=20, min_seconds=3.0)
    tasks = [dict(atoms=n, atoms_actual=3 * max(1, n // 3), kind=kind, kernel=kernel, dtype=args.dtype,
                  threads=args.threads, keep_freed_memory=not args.return_freed_memory, **repeats)
             for kind in ("box", "molecule") for n in sizes for kernel in ("fused", "reference")]
    info = machine()
    results = []
    previous_reference = {}
    for task in tqdm(tasks, desc="native ops benchmark", unit="run"):
        last = previous_reference.get(task["kind"]) if task["kernel"] == "reference" else None
        if last is not None and "peak_mib" in last:
            projected = last["peak_mib"] * task["atoms"] / last["atoms"] / 1024
            if projected > args.memory_limit_gb:
                results.append(dict(task, skipped=f"projected {projected:.0f} GB > {args.memory_limit_gb:.0f} GB"))
                continue
        result = run_task(task, args.timeout, __file__)
        results.append(result)
        if task["kernel"] == "reference" and "skipped" not in result:
            previous_reference[task["kind"]] = result
        tqdm.write(f"{task['kind']:8s} {task['atoms']:7d} {task['kernel']:9s} "
                   + (result["skipped"] if "skipped" in result else
                      f"{1e3 * result['seconds']:9.1f} ms  {result['peak_mib']:8.0f} MiB  "
                      f"attention {result['attention_gflops']:.1f} GFLOP/s"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    write_report(results, info, args.out, args.dtype)
    print(args.out.with_suffix(".md").read_text())
    failed = [r for r in results if "skipped" in r and r["skipped"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

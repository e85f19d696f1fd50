"""Helpers shared by the benchmark scripts: paths, test systems, timing, fresh-process measurements, memory,
the machine's description and the results writer.

The scripts in this folder import it as `common` (Python puts a script's own folder first on `sys.path`), so
each still runs as `python benchmarks/<script>.py` and none edits `sys.path`. A script that measures in fresh
processes passes its own file to `run_task`, which runs it again with `--worker`.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / (ROOT / "models" / "SHIPPED").read_text().strip()  # the shipped checkpoint every benchmark runs
WATER = ((0.0, 0.0, 0.0), (0.9572, 0.0, 0.0), (-0.2400, 0.9266, 0.0))  # O, H, H (Angstrom)
WATER_SPACING = 3.104  # Angstrom per molecule on a cubic lattice: liquid density, 1.0 g/cm^3


# ------------------------------------------------------------------------------------------ systems
def water_system(num_atoms: int, periodic: bool, seed: int = 0):
    """Randomly oriented water molecules on a cubic lattice at liquid density (periodic box or bare cluster)."""
    import numpy as np
    import torch

    from transip.data import Structure
    from transip.model import random_rotation

    molecules = max(1, num_atoms // 3)
    side = int(np.ceil(molecules ** (1.0 / 3.0)))
    generator = torch.Generator().manual_seed(seed)
    sites = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:molecules]
    water = np.array(WATER)
    positions = np.concatenate([water @ random_rotation(generator).numpy().T + site * WATER_SPACING
                                for site in sites])
    numbers = np.tile([8, 1, 1], molecules)
    if periodic:
        return Structure(numbers, positions, cell=np.eye(3) * side * WATER_SPACING, pbc=[True] * 3)
    return Structure(numbers, positions)


def with_self_edges(edge_index, n: int):
    """Receivers, senders and CSR row offsets of the graph plus each atom's own edge, grouped by receiver: what
    one attention layer reads when the self edge is explicit."""
    import torch

    from transip.model import csr_row_ptr

    everyone = torch.arange(n)
    receivers, senders = torch.cat([everyone, edge_index[0]]), torch.cat([everyone, edge_index[1]])
    order = torch.argsort(receivers, stable=True)
    return receivers[order], senders[order], csr_row_ptr(receivers[order], n)


# ------------------------------------------------------------------------------------------ timing
def median_seconds(function, warmup: int, repeat: int, calls: int = 1) -> float:
    """Median seconds per call of `function(calls)`-style work: `warmup` untimed runs, then `repeat` timed
    blocks; `function` is called with `calls` and must do that many evaluations."""
    for _ in range(warmup):
        function(calls)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function(calls)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def repeated_seconds(function, min_repeats: int, max_repeats: int, min_seconds: float) -> list:
    """Seconds of each call of `function()`: at least `min_repeats` calls, more while under `min_seconds` in
    total, at most `max_repeats`."""
    times = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < min_repeats or (time.perf_counter() < deadline and len(times) < max_repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------ fresh processes, memory
def run_task(task: dict, timeout: float, script: str) -> dict:
    """Run `script --worker TASK` in a fresh process (clean heap, own peak-memory mark); its last line of output
    is the result as JSON."""
    env = dict(os.environ, OMP_NUM_THREADS=str(task["threads"]))
    # Its own process group, killed whole on a timeout: a worker's mpirun and LAMMPS ranks would otherwise
    # outlive it and run on beside the next measurements (seen: an orphaned rank for the rest of a suite run).
    with subprocess.Popen([sys.executable, script, "--worker", json.dumps(task)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return dict(task, skipped=f"took longer than {timeout:.0f} s")
    if process.returncode == -signal.SIGKILL:  # what the kernel's out-of-memory killer does: a limit, not a bug
        return dict(task, skipped="out of memory (killed)", out_of_memory=True)
    if process.returncode != 0:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return dict(task, skipped=f"failed (exit {process.returncode}): {tail}")
    return json.loads(stdout.strip().splitlines()[-1])


def rss_kib(field: str) -> int:
    """A memory field of this process from /proc/self/status, in KiB (VmRSS now, VmHWM its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current resident size (Linux), so that the next peak is one
    measurement's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    """CPU model, cores, clock and the double/single-precision peak assumed for the GFLOP/s fraction."""
    info = {"platform": platform.platform(), "cpu": platform.processor() or "unknown", "cores": os.cpu_count()}
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    info["cpu"] = names[0] if names else info["cpu"]
    info["ghz"] = (max(mhz) / 1000) if mhz else None
    # Two FMA pipes per core; an FMA is 2 flops on each lane; AVX-512 holds 8 doubles, AVX2 4.
    lanes64 = 8 if "avx512f" in flags else 4
    if info["ghz"]:
        info["peak_gflops_float64"] = info["cores"] * info["ghz"] * 2 * 2 * lanes64
        info["peak_gflops_float32"] = 2 * info["peak_gflops_float64"]
    info["peak_assumption"] = f"cores x clock x 2 FMA pipes x 2 flops x {lanes64} float64 lanes (twice for float32)"
    import torch

    import transip

    info["torch"] = torch.__version__
    info["isa"] = transip.native.isa()
    return info


# ------------------------------------------------------------------------------------------ output
def write_json(path: Path, payload: dict) -> None:
    """Write JSON through a temporary name, so that a file that exists is complete (resumable studies skip it)."""
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def shown_path(path: Path) -> str:
    """A path as a command line in a report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def folder_name(name: str) -> str:
    """A study row's or model's name as a folder name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_results(out, payload: dict, lines: list) -> None:
    """<out>.json (every number, and the machine unless the payload names it) and <out>.md (the table), and the
    table on standard output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": payload.get("machine") or machine()}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

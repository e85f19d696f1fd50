"""The whole benchmark suite in one run, and BENCHMARKS.md written from its results.

    python benchmarks/suite.py            # about an hour here; results in benchmarks/results/, BENCHMARKS.md
    python benchmarks/suite.py --smoke    # minutes: every script at toy size, into a temporary folder (CI)
    python benchmarks/suite.py --report-only   # BENCHMARKS.md again from benchmarks/results (one script rerun)

Runs, in this order and one at a time (so that none disturbs another's timing): native_ops (whole model,
fused vs reference, to 100 000 atoms), attention_kernels (one layer: fused, reference, dense SDPA),
cpp_vs_python (the C++ inference program against Python, float32/float64), openmm_overhead and
lammps_overhead (the examples), engines (OpenMM, LAMMPS 1 and 2 ranks, TIP3P to 100 000 atoms),
training_speed (training steps on the fused path against today's training), and the MD cost of the accuracy-per-
cost study against MACE (`pareto.py --cost`: its models are trained once, hours, by `pareto.py` itself; the suite
times them again). Then it reads their JSON, checks the targets against the measured numbers, and writes
BENCHMARKS.md: machine, command, verdicts, and every table and plot.
"""

from __future__ import annotations

import argparse
import os
import datetime as _dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, machine

SCRIPTS = ("native_ops", "attention_kernels", "cpp_vs_python", "openmm_overhead", "lammps_overhead", "engines",
           "training_speed")
PARETO = {False: ("configs/pareto.json", None), True: ("configs/pareto_smoke.json", "pareto")}  # smoke: own output


def run_scripts(results: Path, smoke: bool) -> None:
    from tqdm import tqdm

    for script in tqdm(SCRIPTS, desc="benchmark suite", unit="script"):
        command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--out", str(results / script)]
        done = subprocess.run(command + (["--smoke"] if smoke else []), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"benchmarks/{script}.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    config, output = PARETO[smoke]
    command = [sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--config", str(ROOT / config), "--cost"]
    done = subprocess.run(command + (["--output", str(results / output)] if output else []), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks/pareto.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def pareto_report(results: Path, smoke: bool) -> Path:
    """pareto.{json,md,png}: the study's own report folder, or the smoke run's in the results folder."""
    config, output = PARETO[smoke]
    return (results / output if output else ROOT / json.loads((ROOT / config).read_text())["report"]) / "pareto"


def exponent(points) -> float:
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0]) if len(points) > 1 else float("nan")


def verdicts(results: Path) -> list:
    """(target, measured, met) for each target of the benchmark issue, from the scripts' JSON."""
    native = json.loads((results / "native_ops.json").read_text())["results"]
    kernels = json.loads((results / "attention_kernels.json").read_text())["results"]
    engines = json.loads((results / "engines.json").read_text())["rows"]
    rows = []

    def ok(r):
        return r is not None and "skipped" not in r

    def find(items, **keys):
        return next((r for r in items if all(r.get(k) == v for k, v in keys.items())), None)

    boxes = sorted({r["atoms"] for r in native if r["kind"] == "box" and r["atoms"] >= 1000})
    ratios = [(n, find(native, kind="box", atoms=n, kernel="reference")["seconds"]
               / find(native, kind="box", atoms=n, kernel="fused")["seconds"])
              for n in boxes if ok(find(native, kind="box", atoms=n, kernel="reference"))
              and ok(find(native, kind="box", atoms=n, kernel="fused"))]
    if ratios:
        rows.append(("whole model: fused >= 5x faster than reference (boxes >= 1 000 atoms)",
                     ", ".join(f"{n}: {r:.1f}x" for n, r in ratios), all(r >= 5 for _, r in ratios)))
    sizes = sorted({r["atoms"] for r in kernels if r["atoms"] >= 1000})
    layer = [(n, find(kernels, atoms=n, implementation="dense"), find(kernels, atoms=n, implementation="fused"),
              find(kernels, atoms=n, implementation="reference")) for n in sizes]
    if layer:
        rows.append(("attention layer: fused faster than dense masked SDPA (>= 1 000 atoms)",
                     ", ".join(f"{n}: {d['seconds'] / f['seconds']:.1f}x" if ok(d) else f"{n}: dense not run"
                               for n, d, f, _ in layer if ok(f)),
                     all(not ok(d) or d["seconds"] > f["seconds"] for _, d, f, _ in layer if ok(f))))
        rows.append(("attention layer: fused >= 5x faster than reference (>= 1 000 atoms)",
                     ", ".join(f"{n}: {r['seconds'] / f['seconds']:.1f}x" for n, _, f, r in layer if ok(f) and ok(r)),
                     all(r["seconds"] / f["seconds"] >= 5 for _, _, f, r in layer if ok(f) and ok(r))))
    fused = [r for r in native if r["kernel"] == "fused" and r["kind"] == "box" and ok(r) and r["atoms"] >= 1000]
    if len(fused) > 1:
        time_exp = exponent([(r["atoms_actual"], r["seconds"]) for r in fused])
        memory_exp = exponent([(r["atoms_actual"], r["peak_mib"]) for r in fused])
        rows.append((f"linear time to {max(r['atoms_actual'] for r in fused)} atoms (exponent <= 1.1)",
                     f"{time_exp:.2f}", time_exp <= 1.1))
        rows.append(("linear memory (exponent <= 1.1)", f"{memory_exp:.2f}", memory_exp <= 1.1))
    for engine, label in (("openmm", "OpenMM"), ("lammps-1", "LAMMPS 1 rank")):
        overheads = []
        for model in (r for r in engines if r["engine"] == "model" and ok(r) and r["atoms_actual"] >= 1000):
            step = find(engines, system=model["system"], atoms=model["atoms"], engine=engine)
            if ok(step):
                overheads.append((model["atoms_actual"], step["seconds"] / model["seconds"] - 1))
        if overheads:
            rows.append((f"{label} overhead < 10 % of the model call (>= 1 000 atoms)",
                         ", ".join(f"{n}: {100 * o:+.0f} %" for n, o in overheads), all(o < 0.10 for _, o in overheads)))
    speedups = json.loads((results / "cpp_vs_python.json").read_text()).get("float32_speedup", [])
    if speedups:
        rows.append(("fused float32 >= 1.7x faster than float64 (boxes >= 1 000 atoms, C++ program, in turns)",
                     ", ".join(f"{r['structure']}: {r['speedup']:.2f}x" for r in speedups),
                     all(r["speedup"] >= 1.7 for r in speedups)))
    training = json.loads((results / "training_speed.json").read_text())
    rows.append(("training: fused path >= 3x today's training steps per second (same model and batch)",
                 f"{training['speedup']:.2f}x", training["speedup"] >= 3))
    return rows


def pareto_verdict(results: Path, smoke: bool) -> list:
    report = pareto_report(results, smoke).with_suffix(".json")
    verdict = json.loads(report.read_text())["verdict"]
    return [("a TransIP as accurate on held-out scaffolds as the smallest MACE and >= 5x faster per OpenMM step "
             "(same training budget, openmm-ml)", verdict["text"], bool(verdict["met"]))]



def ran_on(result: Path) -> str:
    """'run on <CPU>, <n> cores' from a results file's machine record ('machine not recorded' for older files)."""
    info = json.loads(result.read_text()).get("machine") if result.exists() else None
    return f"run on {info['cpu']}, {info['cores']} cores" if info else "machine not recorded"


def write_benchmarks(results: Path, target: Path, smoke: bool) -> None:
    info = machine()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    relative = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    lines = ["# Benchmarks", "",
             f"Written by `python benchmarks/suite.py{' --smoke' if smoke else ''}` on "
             f"{_dt.date.today().isoformat()} at commit {commit or 'unknown'}: {info['cpu']}, {info['cores']} cores, "
             f"torch {info['torch']}, kernels {info['isa']}. Every table below is the `.md` file its script wrote "
             f"into `{relative}/`, under the machine that script ran on (scripts rerun alone with `--report-only` "
             "may have run on another one); ratios were measured within one run.", "", "## Targets", "",
             "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in verdicts(results) + pareto_verdict(results, smoke)]
    sections = [("Whole model: fused native ops against plain PyTorch", "native_ops"),
                ("One attention layer: fused, reference and dense masked SDPA", "attention_kernels"),
                ("The model from C++ and from Python", "cpp_vs_python"),
                ("OpenMM examples", "openmm_overhead"), ("LAMMPS examples", "lammps_overhead"),
                ("Engines and a classical floor, to 100 000 atoms", "engines"),
                ("Training on the fused kernel", "training_speed")]
    for title, name in sections:
        lines += ["", f"## {title}", "", f"`python benchmarks/{name}.py`, {ran_on(results / f'{name}.json')}", "",
                  (results / f"{name}.md").read_text().strip()]
        if (results / f"{name}.png").exists():
            lines += ["", f"![{name}]({relative}/{name}.png)"]
    pareto = pareto_report(results, smoke)
    shown = os.path.relpath(pareto.with_suffix(".png"), ROOT)
    lines += ["", "## Accuracy per cost against MACE, same engine", "",
              "`python benchmarks/pareto.py --config configs/pareto.json` (training, hours) then `--cost` (the suite "
              "runs this)", "", pareto.with_suffix(".md").read_text().strip(), "", f"![pareto]({shown})"]
    target.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--results", type=Path, help="folder for the scripts' results (default benchmarks/results, "
                                                      "a temporary folder with --smoke)")
    parser.add_argument("--benchmarks-md", type=Path, help="where to write BENCHMARKS.md (default: the repository's; "
                                                           "with --smoke, inside the results folder)")
    parser.add_argument("--report-only", action="store_true", help="write BENCHMARKS.md from the results already "
                                                                      "there (after rerunning one script by hand)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = (args.results or (Path(tmp) if args.smoke else ROOT / "benchmarks" / "results")).resolve()
        results.mkdir(parents=True, exist_ok=True)
        target = args.benchmarks_md or (results / "BENCHMARKS.md" if args.smoke else ROOT / "BENCHMARKS.md")
        if not args.report_only:
            run_scripts(results, args.smoke)
        write_benchmarks(results, target, args.smoke)
        print(target.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

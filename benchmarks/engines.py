"""MD engines and a classical floor on the same structures, from aspirin to 100 000 atoms.

    python benchmarks/engines.py              # writes benchmarks/results/engines.{json,md,png}
    python benchmarks/engines.py --smoke

Structures: aspirin (21 atoms, no box) and periodic water boxes at liquid density (benchmarks/common.py),
the shipped model exported as float64 with the fused kernel. Per structure, each in a fresh process:

- model: the artifact's `compute` (neighbour list included), energy + forces, `--threads` threads;
- OpenMM: CPU platform, TorchForce (transip.openmm_plugin), velocity Verlet 0.5 fs, `--threads` threads;
- LAMMPS: `pair_style transip`, NVE 0.5 fs, 1 rank x `--threads` OpenMP threads and 2 ranks x 1 thread;
- classical: OpenMM CPU platform, flexible TIP3P with PME (0.9 nm cutoff, less in boxes under 1.8 nm),
  0.5 fs, water boxes only: the
  cost floor of a pairwise force field.

Engine overhead = engine step / model call - 1; ns/day at 0.5 fs. The plot shows time per step against atoms
with the fitted exponent from 1 000 atoms up. The equivariant peer (MACE) is compared at the same training budget,
accuracy and cost per step in the same engine by benchmarks/pareto.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MODEL, ROOT, machine, median_seconds, rss_kib, run_task, water_system, write_results

BIN = Path(sys.executable).parent
FULL_SIZES = (1000, 3000, 10000, 30000, 100000)
SMOKE_SIZES = (300,)
ENGINES = ("model", "openmm", "lammps-1", "lammps-2", "classical")
TIMESTEP_FS = 0.5


def structure_of(task: dict):
    from transip.data import read_structures

    if task["system"] == "aspirin":
        return read_structures(ROOT / "examples" / "molecules" / "aspirin.xyz", require_labels=False, index="0")[0]
    return water_system(task["atoms"], periodic=True)


def blocks(atoms: int, smoke: bool) -> tuple:
    """(repeats, calls per repeat) giving roughly a second per repeat on this machine's scale."""
    if smoke:
        return 1, 1
    return (3, max(1, min(200, 20000 // atoms)))


# --------------------------------------------------------------------------------------------- workers
def time_model(task, s):
    import torch

    from transip.export import load

    module, _ = load(task["artifact"])
    cell = torch.tensor(s.cell if s.periodic else [[0.0] * 3] * 3, dtype=torch.float64)
    inputs = (torch.tensor(s.positions), torch.tensor(s.numbers), cell, torch.tensor([s.periodic] * 3), 0, 1, False)

    def evaluate(n):
        for _ in range(n):
            module.compute(*inputs)
    return median_seconds(evaluate, 1, *blocks(len(s.numbers), task["smoke"]))


def time_openmm(task, s):
    from transip.openmm_plugin.md import build_simulation

    simulation = build_simulation(task["artifact"], s, timestep_fs=TIMESTEP_FS, platform="CPU")
    return median_seconds(simulation.step, 1, *blocks(len(s.numbers), task["smoke"]))


def time_lammps(task, s, ranks: int):
    from ase import Atoms
    from ase.io.lammpsdata import write_lammps_data

    from ase.data import chemical_symbols

    species = [chemical_symbols[z] for z in sorted(set(int(z) for z in s.numbers))]  # LAMMPS types 1, 2, ...
    repeats, calls = blocks(len(s.numbers), task["smoke"])
    steps = repeats * calls
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        box = s.cell if s.periodic else [[60.0, 0, 0], [0, 60.0, 0], [0, 0, 60.0]]
        positions = s.positions if s.periodic else s.positions - s.positions.mean(0) + 30.0
        write_lammps_data(tmp / "system.data", Atoms(numbers=s.numbers, positions=positions, cell=box,
                                                      pbc=s.periodic), specorder=species, atom_style="atomic",
                          masses=True)
        (tmp / "in.bench").write_text(f"""units metal
atom_style atomic
boundary {'p p p' if s.periodic else 'f f f'}
read_data system.data
pair_style transip {task['artifact']}
pair_coeff * * {' '.join(species)}
velocity all create 300 4928459 loop geom
fix nve all nve
timestep {TIMESTEP_FS / 1000}
thermo 1000000
run 2
run {steps}
""")
        threads = task["threads"] if ranks == 1 else 1
        command = ([str(BIN / "mpirun"), "-np", str(ranks)] if ranks > 1 else []) + [str(BIN / "lmp"), "-in",
                                                                                     "in.bench"]
        out = subprocess.run(command, cwd=tmp, capture_output=True, text=True,
                             env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp), "OMP_NUM_THREADS": str(threads)})
        if out.returncode != 0:
            raise SystemExit(f"lmp failed: {(out.stdout + out.stderr)[-1500:]}")
        loops = re.findall(r"Loop time of ([0-9.eE+-]+) on", out.stdout)
        return float(loops[-1]) / steps  # the second run: past the model's first (profiling) calls


def time_classical(task, s):
    import numpy as np
    import openmm
    import openmm.app as app
    from openmm import Vec3, unit

    topology = app.Topology()
    chain = topology.addChain()
    for m in range(len(s.numbers) // 3):  # water_system: O H H per molecule
        residue = topology.addResidue("HOH", chain)
        oxygen = topology.addAtom("O", app.element.oxygen, residue)
        for name in ("H1", "H2"):
            topology.addBond(oxygen, topology.addAtom(name, app.element.hydrogen, residue))
    topology.setPeriodicBoxVectors([Vec3(*row) * 0.1 for row in np.asarray(s.cell)] * unit.nanometer)
    cutoff = min(0.9, 0.49 * float(np.min(np.diag(s.cell))) * 0.1)  # OpenMM needs box > 2 x cutoff
    system = app.ForceField("tip3p.xml").createSystem(topology, nonbondedMethod=app.PME,
                                                       nonbondedCutoff=cutoff * unit.nanometer, constraints=None,
                                                       rigidWater=False)
    integrator = openmm.VerletIntegrator(TIMESTEP_FS * unit.femtoseconds)
    platform = openmm.Platform.getPlatformByName("CPU")
    simulation = app.Simulation(topology, system, integrator, platform, {"Threads": str(task["threads"])})
    simulation.context.setPositions(s.positions * 0.1)
    return median_seconds(simulation.step, 1, *blocks(len(s.numbers), task["smoke"]))


def measure(task: dict) -> dict:
    import torch

    import transip

    torch.set_num_threads(task["threads"])
    transip.native.keep_freed_memory()
    s = structure_of(task)
    engine = task["engine"]
    seconds = {"model": time_model, "openmm": time_openmm, "classical": time_classical,
               "lammps-1": lambda t, x: time_lammps(t, x, 1), "lammps-2": lambda t, x: time_lammps(t, x, 2)}[engine](
        task, s)
    # Peak resident memory of the run: this process, or the largest LAMMPS rank (its own processes).
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    peak_mib = children if engine.startswith("lammps") else rss_kib("VmHWM") / 1024
    return dict(task, atoms_actual=len(s.numbers), seconds=seconds, peak_mib=peak_mib)


# --------------------------------------------------------------------------------------------- driver
def fitted_exponent(rows, engine, key):
    """Slope of log(key) against log(atoms) over the water boxes of 1 000 atoms and more."""
    import numpy as np

    points = [(r["atoms_actual"], r[key]) for r in rows
              if r["engine"] == engine and r["system"] == "water" and key in r and r["atoms_actual"] >= 1000]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def write_report(rows: list, info: dict, threads: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(system, atoms, engine):
        return next((r for r in rows if r["system"] == system and r["atoms"] == atoms and r["engine"] == engine), None)

    def ms(r):
        if r is None:
            return "-"
        return f"not run ({r['skipped']})" if "skipped" in r else f"{1e3 * r['seconds']:.1f}"

    lines = [f"{info['cpu']}, {info['cores']} cores; {threads} threads (LAMMPS 2 ranks: 1 thread each); float64. "
             "Times per step (engines) or per energy + forces call (model).", "",
             "| system | atoms | model call (ms) | OpenMM step (ms) | OpenMM overhead | LAMMPS 1 rank (ms) | "
             "LAMMPS overhead | LAMMPS 2 ranks (ms) | 2 vs 1 rank | OpenMM ns/day | classical TIP3P/PME (ms) |",
             "| " + " | ".join(["---"] * 11) + " |"]
    for system, atoms in sorted({(r["system"], r["atoms"]) for r in rows}, key=lambda k: (k[0] != "aspirin", k[1])):
        model, openmm_row, one, two, classical = (get(system, atoms, e) for e in ENGINES)
        if model is None or "skipped" in model:
            continue

        def done(r):
            return r is not None and "skipped" not in r

        def over(r):
            return f"{100 * (r['seconds'] / model['seconds'] - 1):+.0f} %" if done(r) else "-"

        scaling = f"{one['seconds'] / two['seconds']:.2f}x" if done(one) and done(two) else "-"
        ns_day = f"{TIMESTEP_FS * 1e-6 / openmm_row['seconds'] * 86400:.3f}" if done(openmm_row) else "-"
        lines.append(f"| {system} | {model['atoms_actual']} | {ms(model)} | {ms(openmm_row)} | {over(openmm_row)} | "
                     f"{ms(one)} | {over(one)} | {ms(two)} | {scaling} | {ns_day} | {ms(classical)} |")
    exponents = {e: fitted_exponent(rows, e, "seconds") for e in ENGINES}
    memory_exponents = {e: fitted_exponent(rows, e, "peak_mib") for e in ENGINES}
    lines += ["", "Fitted exponent against atoms (water boxes, 1 000 atoms and up): time " +
              (", ".join(f"{e} {x:.2f}" for e, x in exponents.items() if x is not None) or "n/a") +
              "; peak memory " + (", ".join(f"{e} {x:.2f}" for e, x in memory_exponents.items() if x is not None)
                                  or "n/a") + ".", "",
              "Peak resident memory per run (MiB; the whole process with its libraries, LAMMPS: the largest rank):",
              "", "| system | atoms | " + " | ".join(ENGINES) + " |", "| " + " | ".join(["---"] * (2 + len(ENGINES))) + " |"]
    for system, atoms in sorted({(r["system"], r["atoms"]) for r in rows}, key=lambda k: (k[0] != "aspirin", k[1])):
        cells = [get(system, atoms, e) for e in ENGINES]
        lines.append(f"| {system} | {atoms} | " + " | ".join(
            f"{r['peak_mib']:.0f}" if r is not None and "peak_mib" in r else "-" for r in cells) + " |")

    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, scale, fits, label in ((axes[0], "seconds", 1e3, exponents, "ms per step / per call"),
                                        (axes[1], "peak_mib", 1.0, memory_exponents, "peak resident memory (MiB)")):
        for engine in ENGINES:
            done = sorted((r["atoms_actual"], scale * r[key]) for r in rows
                          if r["engine"] == engine and r["system"] == "water" and key in r)
            if done:
                name = engine + (f" (exponent {fits[engine]:.2f})" if fits[engine] is not None else "")
                ax.loglog(*zip(*done), marker="o", label=name)
        ax.set(xlabel="atoms (water box)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("time per MD step against size")
    axes[1].set_title("peak memory against size")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out.with_suffix(".png"), dpi=120)
    write_results(out, {"machine": info, "threads": threads, "rows": rows,
                        "exponents": exponents, "memory_exponents": memory_exponents}, lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", help="water box atom counts (default 1000 ... 100000)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engines")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    from tqdm import tqdm

    from transip.export import export_checkpoint

    sizes = args.sizes or (SMOKE_SIZES if args.smoke else FULL_SIZES)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifact = tmp / "model.pt"
        export_checkpoint(MODEL, artifact)
        systems = [("aspirin", 21)] + [("water", n) for n in sizes]
        tasks = [dict(system=system, atoms=atoms, engine=engine, threads=args.threads, smoke=args.smoke,
                      artifact=str(artifact))
                 for system, atoms in systems for engine in ENGINES
                 if not (engine == "classical" and system == "aspirin")]
        rows, out_of_memory = [], {}  # engine -> atoms at which it ran out of memory
        for task in tqdm(tasks, desc="engines benchmark", unit="run"):
            if task["engine"] in out_of_memory:
                rows.append(dict(task, skipped=f"out of memory at {out_of_memory[task['engine']]} atoms"))
                continue
            result = run_task(task, args.timeout, __file__)
            if result.get("out_of_memory"):
                out_of_memory[task["engine"]] = task["atoms"]
            rows.append(result)
            tqdm.write(f"{task['system']:8s} {task['atoms']:7d} {task['engine']:9s} " + (
                result["skipped"] if "skipped" in result else f"{1e3 * result['seconds']:10.2f} ms"))
        write_report(rows, machine(), args.threads, args.out)
    return 1 if any(r.get("skipped", "").startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

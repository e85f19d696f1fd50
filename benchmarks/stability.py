"""MD that a chemist would run, checked for staying physical: 300 K NVT in OpenMM and in LAMMPS.

    python benchmarks/stability.py --config configs/stability.json           # hours, resumable
    python benchmarks/stability.py --config configs/stability_smoke.json     # minutes (CI)
    python benchmarks/stability.py --config configs/stability.json --reference   # GFN2-xTB water MD (hours)
    python benchmarks/stability.py --config configs/stability.json --report-only # the report from saved runs

For every system of the config (a water box, a methanol box, a held-out drug-like molecule in water) and every
engine (OpenMM: LangevinMiddleIntegrator; LAMMPS: `fix langevin` + `fix nve`; both with a 1 ps damping time),
the model runs `time_ps` of NVT at `temperature_K`, in chunks that save the state, so an interrupted run
resumes. Every `snapshot_every` steps the positions and the temperature are recorded. The report gives, per run:

- molecules intact: the bond graph (pairs closer than 1.2x the sum of their covalent radii, minimum image) is
  the one at the start in every snapshot; bonds broken and formed are counted;
- the closest approach of atoms of different molecules (minimum image), over all snapshots;
- the temperature's mean and standard deviation after the first picosecond;
- for water: the O-O radial distribution function over the second half of the run, plotted against a GFN2-xTB
  reference MD of a small periodic water box (`--reference`, ASE Langevin with periodic GFN2-xTB by tblite).

The config's `model` is a checkpoint, or `shipped` for the default model (`models/SHIPPED`). A run `passes` when
its molecules stay intact, no two molecules come closer than `min_contact_A`, and the mean temperature is within
`temperature_tolerance_K` of the target.

Energy conservation (the config's `nve`): NVE (VerletIntegrator) in OpenMM with the model exported in float64, for
each of its systems (a periodic box relaxed first, as above); the total energy's change from the first to the last
step per atom must stay within `max_drift_mev_per_atom`. Results: `stability.{json,md}` and `stability_rdf.png`
under the config's `report`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
BOLTZMANN_EV = 8.617333262e-5  # eV/K
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------- analysis
def rdf_summary(runs: list, reference: dict | None, config: dict) -> str:
    """One sentence: the water O-O RDF's first peak in each engine and in the GFN2-xTB reference (report and
    model card)."""
    water = [r for r in runs if "rdf_oo_first_peak" in r]  # the saved report keeps the peak, not the curve
    if not (water or reference):
        return ""
    peaks = [f"{r['engine']}: {r['rdf_oo_first_peak']['r_A']:.2f} A, {r['rdf_oo_first_peak']['g']:.2f}" for r in water]
    if reference:
        peaks.append(f"GFN2-xTB reference ({reference['atoms']} atoms, {reference['time_ps']:.2f} ps, "
                     f"{reference['frames_in_rdf']} frames after {config['reference']['equilibration_ps']} ps, mean "
                     f"temperature {reference['temperature_mean_K']:.0f} K): {reference['rdf_oo_first_peak']['r_A']:.2f} "
                     f"A, {reference['rdf_oo_first_peak']['g']:.2f}")
    else:
        peaks.append("GFN2-xTB reference not run or not past its equilibration yet (`--reference`, resumable)")
    return "Water O-O radial distribution function, first peak (position, height): " + "; ".join(peaks) + "."


def check_trajectory(numbers: np.ndarray, frames: np.ndarray, cell: np.ndarray) -> dict:
    """transip md's check (bond graph unchanged, closest approach of different molecules) over the frames."""
    from transip.md_summary import structure_check

    return structure_check(numbers, frames, cell)


def radial_distribution(frames: np.ndarray, cell: np.ndarray, selected: np.ndarray, r_max: float,
                        bin_width: float = 0.05):
    """g(r) between the `selected` atoms (e.g. water oxygens), averaged over frames; bin centres and g."""
    from transip.md_summary import pair_distances

    edges = np.arange(0.0, r_max + bin_width, bin_width)
    counts = np.zeros(len(edges) - 1)
    n = int(selected.sum())
    for positions in frames:
        d = pair_distances(positions[selected], cell)[np.triu_indices(n, 1)]
        counts += np.histogram(d, edges)[0]
    density = n / np.linalg.det(cell)
    shells = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    g = counts / (len(frames) * 0.5 * n * density * shells)
    return 0.5 * (edges[1:] + edges[:-1]), g


# ------------------------------------------------------------------------------------------------- engines
class RunState:
    """What a run has recorded so far, saved after every chunk: the step, the last positions and velocities
    (Angstrom, Angstrom/ps) and the snapshots (positions, temperatures)."""

    def __init__(self, path: Path, numbers, positions, cell):
        self.path = path
        if path.exists():
            saved = np.load(path)
            self.step, self.positions, self.velocities = int(saved["step"]), saved["positions"], saved["velocities"]
            self.frames, self.temperatures = list(saved["frames"]), list(saved["temperatures"])
            self.seconds = float(saved["seconds"])
        else:
            self.step, self.positions, self.velocities = 0, np.asarray(positions, float), None
            self.frames, self.temperatures, self.seconds = [np.asarray(positions, float)], [], 0.0
        self.numbers, self.cell = numbers, cell

    def save(self) -> None:
        tmp = self.path.with_suffix(".partial.npz")
        np.savez_compressed(tmp, step=self.step, positions=self.positions,
                            velocities=self.velocities if self.velocities is not None else np.zeros(0),
                            frames=np.array(self.frames), temperatures=np.array(self.temperatures),
                            seconds=self.seconds)
        os.replace(tmp, self.path)


def temperature_of(kinetic_ev: float, atoms: int) -> float:
    return 2.0 * kinetic_ev / (3 * atoms * BOLTZMANN_EV)


def run_openmm(artifact: Path, structure, state: RunState, md: dict, steps: int) -> None:
    from openmm import unit

    from transip.export.contract import KJ_PER_MOL_PER_EV
    from transip.openmm_plugin.md import NM_PER_ANGSTROM, build_simulation

    fresh = state.velocities is None or not len(state.velocities)
    # A fresh start relaxes the packed box first, as a user would; a resumed one continues from its saved state.
    simulation = build_simulation(artifact, structure, md["timestep_fs"], md["temperature_K"], platform="CPU",
                                  thermostat=True, seed=md["seed"] + state.step,
                                  minimize_fmax=md["minimize_fmax_ev_per_A"] if fresh else None,
                                  minimize_iterations=md["minimize_iterations"])
    if not fresh:
        simulation.context.setPositions(state.positions * NM_PER_ANGSTROM)
        simulation.context.setVelocities(state.velocities * NM_PER_ANGSTROM)  # A/ps -> nm/ps
    done = 0
    while done < steps:
        simulation.step(md["snapshot_every"])
        done += md["snapshot_every"]
        snap = simulation.context.getState(getPositions=True, getVelocities=True, getEnergy=True)
        positions = snap.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        state.frames.append(np.asarray(positions))
        kinetic = snap.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole) / KJ_PER_MOL_PER_EV
        state.temperatures.append(temperature_of(kinetic, len(structure.numbers)))
    state.positions = np.asarray(positions)
    state.velocities = np.asarray(snap.getVelocities(asNumpy=True).value_in_unit(unit.angstrom / unit.picosecond))


def run_lammps(artifact: Path, structure, state: RunState, md: dict, steps: int, threads: int) -> None:
    from ase.data import atomic_masses, chemical_symbols

    species = sorted(set(int(z) for z in structure.numbers))
    types = np.searchsorted(species, structure.numbers) + 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = ["stability run", "", f"{len(types)} atoms", f"{len(species)} atom types", ""]
        lines += [f"0 {state.cell[i, i]:.10f} {'xyz'[i]}lo {'xyz'[i]}hi" for i in range(3)]
        lines += ["", "Masses", ""] + [f"{t + 1} {atomic_masses[z]:.6f}" for t, z in enumerate(species)]
        lines += ["", "Atoms # atomic", ""] + [f"{i + 1} {t} {x:.10f} {y:.10f} {z:.10f}" for i, (t, (x, y, z))
                                                 in enumerate(zip(types, state.positions))]
        if state.velocities is not None and len(state.velocities):
            lines += ["", "Velocities", ""] + [f"{i + 1} {vx:.10f} {vy:.10f} {vz:.10f}" for i, (vx, vy, vz)
                                               in enumerate(state.velocities)]
        (tmp / "system.data").write_text("\n".join(lines) + "\n")
        fresh = state.velocities is None or not len(state.velocities)
        # A fresh start relaxes the packed box first, as a user would (then the step count starts again at 0).
        minimize = (f"minimize 0.0 {md['minimize_fmax_ev_per_A']} {md['minimize_iterations']} "
                    f"{10 * md['minimize_iterations']}\nreset_timestep 0")
        every = md["snapshot_every"]
        (tmp / "in.stability").write_text(f"""units metal
atom_style atomic
boundary p p p
read_data system.data
pair_style transip {artifact}
pair_coeff * * {' '.join(chemical_symbols[z] for z in species)}
{minimize if fresh else ""}
{f"velocity all create {md['temperature_K']} {md['seed'] + 1} loop geom" if fresh else ""}
fix thermostat all langevin {md['temperature_K']} {md['temperature_K']} 1.0 {md['seed'] + 1 + state.step}
fix integrate all nve
timestep {md['timestep_fs'] / 1000}
compute kinetic all ke
thermo_style custom step c_kinetic
thermo {every}
dump frames all custom {every} frames.dump id x y z vx vy vz
dump_modify frames sort id format float %.10g
run {steps}
""")
        out = subprocess.run([str(BIN / "lmp"), "-in", "in.stability", "-log", "log.lammps"], cwd=tmp,
                             capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads), "HOME": str(tmp)})
        if out.returncode != 0:
            raise RuntimeError(f"lmp failed: {(out.stdout + out.stderr)[-2000:]}")
        kinetic = [float(k) for k in re.findall(r"^\s*\d+\s+([-0-9.eE+]+)\s*$", out.stdout, re.M)]
        blocks = (tmp / "frames.dump").read_text().split("ITEM: TIMESTEP")[1:]
    n = len(types)
    for block, k in zip(blocks[1:], kinetic[1:]):  # the first dump and thermo line are the start
        rows = np.array([line.split() for line in block.split("ITEM: ATOMS")[1].splitlines()[1:n + 1]], float)
        state.frames.append(rows[:, 1:4])
        state.temperatures.append(temperature_of(k, n))
    state.positions, state.velocities = rows[:, 1:4], rows[:, 4:7]


def run_system(config: dict, artifact: Path, name: str, engine: str) -> dict:
    import torch

    from transip.data import read_structures

    torch.set_num_threads(config["threads"])
    md = config["md"]
    structure = read_structures(ROOT / config["systems"][name], require_labels=False, index="0")[0]
    cell = np.asarray(structure.cell, float)
    folder = ROOT / config["output"] / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    state = RunState(folder / f"{name}-{engine}.npz", structure.numbers, structure.positions, cell)
    total = int(round(md["time_ps"] * 1000 / md["timestep_fs"]))
    chunk = md["snapshot_every"] * max(1, int(md["chunk_ps"] * 1000 / md["timestep_fs"]) // md["snapshot_every"])
    while state.step < total:
        steps = min(chunk, total - state.step)
        start = time.perf_counter()
        if engine == "openmm":
            run_openmm(artifact, structure, state, md, steps)
        else:
            run_lammps(artifact, structure, state, md, steps, config["threads"])
        state.seconds += time.perf_counter() - start
        state.step += steps
        state.save()
    return summarise_run(config, name, engine, state)


def summarise_run(config: dict, name: str, engine: str, state: RunState) -> dict:
    md = config["md"]
    frames = np.array(state.frames)
    checks = check_trajectory(state.numbers, frames, state.cell)
    snapshot_ps = md["snapshot_every"] * md["timestep_fs"] / 1000
    settled = np.array(state.temperatures[int(1.0 / snapshot_ps):] or state.temperatures)
    result = {"system": name, "engine": engine, "atoms": len(state.numbers), "time_ps": state.step *
              md["timestep_fs"] / 1000, "ms_per_step": 1000 * state.seconds / max(1, state.step), **checks,
              "temperature_mean_K": float(settled.mean()), "temperature_std_K": float(settled.std())}
    result["passes"] = bool(result["intact"] and result["closest_intermolecular_A"] >= config["min_contact_A"]
                            and abs(result["temperature_mean_K"] - md["temperature_K"])
                            <= config["temperature_tolerance_K"])
    if name == "water":
        oxygens = state.numbers == 8
        second_half = frames[len(frames) // 2:]
        r, g = radial_distribution(second_half, state.cell, oxygens, min(6.0, 0.5 * state.cell[0, 0]))
        result["rdf_oo"] = {"r": r.tolist(), "g": g.tolist()}
        result["rdf_oo_first_peak"] = {"r_A": float(r[np.argmax(g)]), "g": float(g.max())}
    return result


# ------------------------------------------------------------------------------------------------------ NVE
def run_nve(config: dict, artifact: Path, name: str) -> dict:
    """NVE in OpenMM (float64 artifact): the total energy's change and fluctuation per atom over the run, saved to
    runs/nve-NAME.json so that a later report (e.g. after --reference) shows it without running it again."""
    import torch
    from common import write_json

    from transip.data import read_structures
    from transip.openmm_plugin.md import run

    torch.set_num_threads(config["threads"])
    nve, md = config["nve"], config["md"]
    saved = ROOT / config["output"] / "runs" / f"nve-{name}.json"
    if saved.exists():
        return json.loads(saved.read_text())
    structure = read_structures(ROOT / nve["systems"][name], require_labels=False, index="0")[0]
    with open(os.devnull, "w") as quiet:
        summary = run(artifact, structure, nve["steps"], timestep_fs=nve["timestep_fs"],
                      temperature=md["temperature_K"], platform="CPU", report_every=nve["report_every"],
                      seed=md["seed"], stream=quiet,
                      minimize_fmax=md["minimize_fmax_ev_per_A"] if structure.periodic else None)
    drift = 1000 * summary["energy_drift_per_atom_ev"]
    result = {"system": name, "engine": "openmm", "atoms": summary["atoms"], "steps": nve["steps"],
              "timestep_fs": nve["timestep_fs"], "steps_per_second": summary["steps_per_second"],
              "energy_drift_mev_per_atom": drift,
              "energy_std_mev_per_atom": 1000 * summary["energy_std_per_atom_ev"], "intact": summary["intact"],
              "passes": bool(abs(drift) <= nve["max_drift_mev_per_atom"] and summary["intact"])}
    saved.parent.mkdir(parents=True, exist_ok=True)
    write_json(saved, result)
    return result


def saved_nve(config: dict) -> list:
    folder = ROOT / config["output"] / "runs"
    names = config.get("nve", {}).get("systems", {})
    return [json.loads((folder / f"nve-{n}.json").read_text()) for n in names if (folder / f"nve-{n}.json").exists()]


# ----------------------------------------------------------------------------------------------- reference
def run_reference(config: dict) -> dict:
    """GFN2-xTB (tblite, periodic) Langevin MD of a small water box: the O-O g(r) the model's is compared to."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    sys.path.insert(0, str(ROOT / "examples" / "boxes"))
    from make_solvated_box import water_box

    from transip.datagen import xtb_calculator

    ref, md = config["reference"], config["md"]
    atoms = water_box(ref["waters"], seed=1)
    folder = ROOT / config["output"] / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    state = RunState(folder / "water-xtb.npz", atoms.numbers, atoms.positions, np.asarray(atoms.cell[:]))
    atoms.positions = state.positions
    atoms.calc = xtb_calculator(0, 1)
    if state.velocities is not None and len(state.velocities):
        atoms.set_velocities(state.velocities / (1000 * units.fs))  # A/ps -> ASE units
    else:
        MaxwellBoltzmannDistribution(atoms, temperature_K=md["temperature_K"], rng=np.random.default_rng(1))
    if state.step == 0:  # relax the packed box first, as for the model's runs
        from ase.optimize import FIRE

        FIRE(atoms, logfile=None).run(fmax=md["minimize_fmax_ev_per_A"], steps=md["minimize_iterations"])
        state.positions = atoms.positions.copy()
    total = int(round(ref["time_ps"] * 1000 / ref["timestep_fs"]))
    every = ref["snapshot_every"]
    from tqdm import tqdm

    bar = tqdm(total=total, initial=state.step, desc="GFN2-xTB water MD", unit="step")
    equilibration = int(round(ref["equilibration_ps"] * 1000 / ref["timestep_fs"]))
    while state.step < total:
        # The relaxed box starts cold (equipartition halves the drawn kinetic energy), and a 1 ps damping time
        # would take picoseconds this MD cannot afford to reheat it: 10/ps during equilibration, 1/ps after.
        friction = (0.01 if state.step < equilibration else 0.001) / units.fs
        dynamics = Langevin(atoms, ref["timestep_fs"] * units.fs, temperature_K=md["temperature_K"],
                            friction=friction, fixcm=False,  # the centre of mass may drift
                            rng=np.random.default_rng(state.step + 1))
        start = time.perf_counter()
        chunk = min(ref["chunk_steps"], (equilibration if state.step < equilibration else total) - state.step)
        for _ in range(max(1, chunk // every)):
            dynamics.run(every)
            state.frames.append(atoms.positions.copy())
            state.temperatures.append(float(atoms.get_temperature()))
            state.step += every
            bar.update(every)
        state.seconds += time.perf_counter() - start
        state.positions = atoms.positions.copy()
        state.velocities = atoms.get_velocities() * 1000 * units.fs  # ASE units -> A/ps
        state.save()
    bar.close()
    return summarise_reference(config, state)


def summarise_reference(config: dict, state: RunState) -> dict:
    ref = config["reference"]
    frames = np.array(state.frames)
    snapshot_ps = ref["snapshot_every"] * ref["timestep_fs"] / 1000
    skipped = int(round(ref["equilibration_ps"] / snapshot_ps))
    kept = frames[skipped + 1:]  # frames[0] is the start, temperatures[k] belongs to frames[k + 1]
    r, g = radial_distribution(kept, state.cell, state.numbers == 8, 0.5 * state.cell[0, 0])
    return {"system": f"water ({ref['waters']} molecules)", "engine": "GFN2-xTB (tblite), ASE Langevin",
            "atoms": len(state.numbers), "time_ps": state.step * ref["timestep_fs"] / 1000,
            "frames_in_rdf": len(kept), "ms_per_step": 1000 * state.seconds / max(1, state.step),
            **check_trajectory(state.numbers, frames, state.cell),
            "temperature_mean_K": float(np.mean(state.temperatures[skipped:] or state.temperatures)),
            "rdf_oo": {"r": r.tolist(), "g": g.tolist()},
            "rdf_oo_first_peak": {"r_A": float(r[np.argmax(g)]), "g": float(g.max())}}


# ------------------------------------------------------------------------------------------------- report
def write_report(config: dict, config_path: Path, runs: list, reference, nve: list) -> None:
    from common import machine, shown_path, write_results

    md = config["md"]
    lines = [
        f"Command: `python benchmarks/stability.py --config {shown_path(config_path)}`. Model "
        f"`{config['model']}` ({config['dtype']}), {md['temperature_K']} K NVT for {md['time_ps']} ps at "
        f"{md['timestep_fs']} fs (OpenMM: LangevinMiddleIntegrator, 1/ps; LAMMPS: `fix langevin` with a 1 ps damping "
        f"time and `fix nve`), {config['threads']} thread(s), snapshots every {md['snapshot_every']} steps. Intact: the "
        "bond graph (pairs within 1.2x their covalent radii) is the starting one in every snapshot. Closest contact: "
        "atoms of different molecules, minimum image. Temperature after the first picosecond. A run passes when its "
        f"molecules stay intact, no contact is closer than {config['min_contact_A']} A and the mean temperature is "
        f"within {config['temperature_tolerance_K']} K of the target. ms/step is wall-clock time with the runs sharing "
        "the machine (and any pause counted): not a speed benchmark.", "",
        "| system | engine | atoms | ps | ms/step | molecules | intact | most bonds broken / formed | closest contact "
        "(A) | T mean (K) | T std (K) | passes |", "| --- " * 12 + "|"]
    for r in runs:
        lines.append(f"| {r['system']} | {r['engine']} | {r['atoms']} | {r['time_ps']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['molecules']} | {'yes' if r['intact'] else 'no'} | {r['most_bonds_broken']} / "
                     f"{r['most_bonds_formed']} | {r['closest_intermolecular_A']:.2f} | {r['temperature_mean_K']:.1f} | "
                     f"{r['temperature_std_K']:.1f} | {'yes' if r['passes'] else '**no**'} |")
    water = [r for r in runs if "rdf_oo" in r]
    summary = rdf_summary(runs, reference, config)
    if summary:
        lines += ["", summary]
    if nve:
        bound = config["nve"]["max_drift_mev_per_atom"]
        lines += ["", f"Energy conservation: NVE in OpenMM (VerletIntegrator, {config['nve']['timestep_fs']} fs, from "
                  f"{md['temperature_K']} K; float64 artifact; a periodic box relaxed first). Passes when the total "
                  f"energy changes by at most {bound} meV/atom from the first to the last step.", "",
                  "| system | atoms | steps | steps/s | total-energy change (meV/atom) | fluctuation (meV/atom) | "
                  "passes |", "| --- " * 7 + "|"]
        lines += [f"| {r['system']} | {r['atoms']} | {r['steps']} | {r['steps_per_second']:.1f} | "
                  f"{r['energy_drift_mev_per_atom']:+.3f} | {r['energy_std_mev_per_atom']:.3f} | "
                  f"{'yes' if r['passes'] else '**no**'} |" for r in nve]
    out = ROOT / config["report"] / "stability"
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "rdf_oo"} for r in runs]
    write_results(out, {"config": config, "runs": slim, "nve": nve, "reference": reference, "machine": machine(),
                        "rdf": {f"{r['system']}-{r['engine']}": r["rdf_oo"] for r in water}}, lines)
    plot_rdf(water, reference, ROOT / config["report"] / "stability_rdf.png")


def plot_rdf(water: list, reference, path: Path) -> None:
    if not water and not reference:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in water:
        ax.plot(r["rdf_oo"]["r"], r["rdf_oo"]["g"], label=f"TransIP, {r['engine']} ({r['atoms']} atoms)")
    if reference:
        ax.plot(reference["rdf_oo"]["r"], reference["rdf_oo"]["g"], "k--",
                label=f"GFN2-xTB ({reference['atoms']} atoms, {reference['time_ps']:.1f} ps)")
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.set_xlabel("O-O distance (A)")
    ax.set_ylabel("g(r)")
    ax.set_title("Water O-O radial distribution function, 300 K", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def saved_runs(config: dict) -> list:
    """Summaries of the model runs saved so far (complete or not), in config order, without running anything."""
    from transip.data import read_structures

    runs = []
    for name in config["systems"]:
        structure = read_structures(ROOT / config["systems"][name], require_labels=False, index="0")[0]
        for engine in config["engines"]:
            path = ROOT / config["output"] / "runs" / f"{name}-{engine}.npz"
            if path.exists():
                state = RunState(path, structure.numbers, None, np.asarray(structure.cell, float))
                runs.append(summarise_run(config, name, engine, state))
    return runs


def saved_reference(config: dict):
    saved = ROOT / config["output"] / "runs" / "water-xtb.npz"
    if not saved.exists():
        return None
    sys.path.insert(0, str(ROOT / "examples" / "boxes"))
    from make_solvated_box import water_box

    ref = config["reference"]
    box = water_box(ref["waters"], seed=1)
    state = RunState(saved, box.numbers, None, np.asarray(box.cell[:]))
    if state.step * ref["timestep_fs"] / 1000 <= ref["equilibration_ps"]:
        return None  # still equilibrating: no g(r) yet
    return summarise_reference(config, state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=None, help="runs and report here instead of the config's")
    parser.add_argument("--reference", action="store_true",
                        help="run (or resume) only the GFN2-xTB water MD; the report shows the model runs saved so far")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs saved so far (finished or not: see their ps) and exit")
    args = parser.parse_args(argv)
    import concurrent.futures

    import torch
    from tqdm import tqdm

    from transip.export import export_checkpoint

    config_path = args.config.resolve()
    config = json.loads(config_path.read_text())
    if config["model"] == "shipped":  # the default model (models/SHIPPED), whichever it is: what CI checks
        from common import MODEL, shown_path

        config["model"] = shown_path(MODEL)
    if args.output is not None:
        config["output"] = config["report"] = str(args.output.resolve())
    folder = ROOT / config["output"]
    folder.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(config, config_path, saved_runs(config), saved_reference(config), saved_nve(config))
        return 0
    if args.reference:
        reference = run_reference(config)
        write_report(config, config_path, saved_runs(config), reference, saved_nve(config))
        return 0
    artifacts = {}
    for dtype in {config["dtype"], "float64"} if config.get("nve") else {config["dtype"]}:
        # Exported on every start (seconds), never reused: an artifact left by an earlier run may come from
        # another checkpoint or older code.
        artifacts[dtype] = folder / f"model-{dtype}.pt"
        export_checkpoint(ROOT / config["model"], artifacts[dtype], dtype=dtype, kernel="fused")
    torch.set_num_threads(config["threads"])
    jobs = [(name, engine) for name in config["systems"] for engine in config["engines"]]
    nve_jobs = list(config.get("nve", {}).get("systems", {}))
    with concurrent.futures.ProcessPoolExecutor(config.get("parallel", 1)) as pool:
        futures = {pool.submit(run_system, config, artifacts[config["dtype"]], name, engine): (name, engine)
                   for name, engine in jobs}
        futures.update({pool.submit(run_nve, config, artifacts["float64"], name): ("nve", name) for name in nve_jobs})
        done = {}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="stability runs"):
            done[futures[future]] = future.result()
    runs = [done[job] for job in jobs]
    nve = [done["nve", name] for name in nve_jobs]
    write_report(config, config_path, runs, saved_reference(config), nve)
    return 0 if all(r["passes"] for r in runs + nve) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The MD stability check (benchmarks/stability.py): its analysis on hand-made trajectories, and the check
itself at reduced length on the shipped model in both engines."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from stability import check_trajectory, radial_distribution  # noqa: E402

from transip.md_summary import describe_check, pair_distances  # noqa: E402

WATER = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.24, 0.9266, 0.0]])


def two_waters(shift):
    return np.concatenate([WATER, WATER + shift])


def test_minimum_image_distance_wraps_across_the_box():
    cell = np.eye(3) * 10.0
    d = pair_distances(np.array([[0.5, 0.0, 0.0], [9.5, 0.0, 0.0]]), cell)
    assert d[0, 1] == pytest.approx(1.0)
    assert pair_distances(np.array([[0.5, 0.0, 0.0], [9.5, 0.0, 0.0]]))[0, 1] == pytest.approx(9.0)  # no box


def test_intact_water_passes_and_a_broken_bond_or_a_close_contact_is_reported():
    cell, numbers = np.eye(3) * 12.0, np.array([8, 1, 1, 8, 1, 1])
    start = two_waters([3.0, 0.0, 0.0])
    moved = start + 0.05  # a rigid shift changes nothing
    intact = check_trajectory(numbers, np.array([start, moved]), cell)
    assert intact["intact"] and intact["molecules"] == 2 and intact["bonds"] == 4
    cross = np.linalg.norm(start[:3, None] - start[None, 3:], axis=-1)
    assert intact["closest_intermolecular_A"] == pytest.approx(cross.min())

    stretched = start.copy()
    stretched[1, 2] += 1.2  # one O-H to ~1.53 A, away from the other molecule: broken
    broken = check_trajectory(numbers, np.array([start, stretched]), cell)
    assert not broken["intact"] and broken["most_bonds_broken"] == 1 and broken["frames_with_changed_bonds"] == 1

    fused = start.copy()
    fused[3:] += fused[1] - fused[3] + [0.3, 0.0, 0.0]  # the second oxygen 0.3 A from the first molecule's H
    contact = check_trajectory(numbers, np.array([start, fused]), cell)
    assert contact["closest_intermolecular_A"] == pytest.approx(0.3) and contact["most_bonds_formed"] >= 1
    assert describe_check(intact).startswith("molecules intact (2 molecules, 4 bonds); closest approach")
    assert describe_check(broken).startswith("molecules NOT intact: up to 1 bonds broken and 0 formed in 1 of 2")


def test_radial_distribution_of_uniform_points_is_one():
    rng = np.random.default_rng(0)
    cell = np.eye(3) * 20.0
    frames = rng.uniform(0, 20.0, size=(20, 400, 3))
    r, g = radial_distribution(frames, cell, np.ones(400, bool), 8.0, bin_width=0.5)
    assert np.abs(g[r > 3.0] - 1.0).max() < 0.1


@pytest.mark.slow
def test_model_keeps_every_system_physical_in_both_engines(tmp_path):
    """The stability check at reduced length (configs/stability_smoke.json: relaxation, then 0.1 ps of 300 K NVT)
    on the model that config names: water, methanol and a held-out drug-like molecule in water stay intact in
    OpenMM and in LAMMPS, with no two molecules closer than 1.2 A; NVE conserves the total energy; the report and
    the g(r) plot are written."""
    command = [sys.executable, str(ROOT / "benchmarks" / "stability.py"), "--config",
               str(ROOT / "configs" / "stability_smoke.json"), "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    report = json.loads((tmp_path / "stability.json").read_text())
    runs = {(r["system"], r["engine"]): r for r in report["runs"]}
    assert set(runs) == {(s, e) for s in ("water", "methanol", "solvated") for e in ("openmm", "lammps")}
    for key, r in runs.items():
        assert r["time_ps"] == pytest.approx(0.1) and r["frames_checked"] == 11, key
        assert r["intact"] and r["closest_intermolecular_A"] >= 1.2, (key, r)
        assert r["passes"], (key, r)
    assert runs[("water", "openmm")]["molecules"] == 96 and runs[("solvated", "lammps")]["molecules"] == 101
    # Energy conservation: NVE in OpenMM, float64, aspirin in vacuum and the relaxed water box.
    nve = {r["system"]: r for r in report["nve"]}
    assert set(nve) == {"aspirin", "water"} and nve["water"]["atoms"] == 288
    for name, r in nve.items():
        assert r["steps"] == 200 and abs(r["energy_drift_mev_per_atom"]) <= 0.5 and r["intact"], (name, r)
        assert r["passes"], (name, r)
    assert "Energy conservation: NVE in OpenMM" in (tmp_path / "stability.md").read_text()
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "stability_rdf.png").stat().st_size > 10_000
    # --report-only rebuilds the same report from the saved runs without running anything
    (tmp_path / "stability.json").unlink()
    again = subprocess.run(command + ["--report-only"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rebuilt = json.loads((tmp_path / "stability.json").read_text())
    assert rebuilt["runs"] == report["runs"] and rebuilt["nve"] == report["nve"]

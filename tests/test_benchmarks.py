"""Smoke runs of the benchmark scripts, so that they cannot rot (the numbers are not judged here)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run_smoke(script: str, tmp_path) -> tuple:
    """Run benchmarks/<script>.py --smoke into tmp_path; returns (its JSON, the output path without suffix)."""
    out = tmp_path / script
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.with_suffix(".json").read_text()), out


@pytest.mark.slow
def test_native_ops_benchmark_smoke(tmp_path):
    data, out = run_smoke("native_ops", tmp_path)
    runs = data["results"]
    assert {(r["kind"], r["kernel"]) for r in runs} == {("box", "fused"), ("box", "reference"),
                                                        ("molecule", "fused"), ("molecule", "reference")}
    for r in runs:
        assert "skipped" not in r, r
        assert r["seconds"] > 0 and r["edges"] > 0 and r["attention_gflops"] > 0
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| box |") == 2 and table.count("\n| molecule |") == 2
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_cpp_vs_python_benchmark_smoke(tmp_path):
    rows = run_smoke("cpp_vs_python", tmp_path)[0]["rows"]
    assert len(rows) == 8 and all(r["cpp_ms"] > 0 and r["energy_difference"] < 1e-6 for r in rows)


@pytest.mark.slow
def test_openmm_overhead_benchmark_smoke(tmp_path):
    rows = run_smoke("openmm_overhead", tmp_path)[0]["rows"]
    assert [r["atoms"] for r in rows] == [21, 384] and all(r["openmm_step_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_lammps_overhead_benchmark_smoke(tmp_path):
    rows = run_smoke("lammps_overhead", tmp_path)[0]["rows"]
    assert [(r["atoms"], r["ranks"]) for r in rows] == [(21, 1), (21, 2), (384, 1), (384, 2)]
    assert all(r["lammps_step_ms"] > 0 and r["artifact_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_accuracy_study_smoke(tmp_path):
    """The whole study pipeline at toy size: TransIP's three objectives and MACE through its own training
    command, evaluation on both held-out splits, equivariance, timing, NVE stability, report files; then a
    rerun that finds every cell done and retrains nothing."""
    pytest.importorskip("mace")
    command = [sys.executable, str(ROOT / "benchmarks" / "accuracy_study.py"), "--config",
               str(ROOT / "configs" / "accuracy_study_smoke.json"), "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert {(r["method"], r["train_size"]) for r in rows} == {
        (m, n) for m in ("transip", "augment", "none", "mace") for n in (16, 160)}
    for r in rows:
        for split in ("test_frames", "test_molecules"):
            assert 0 < r[f"{split}.force_mae"] < 10 and -1 <= r[f"{split}.force_cosine"] <= 1
        assert r["ms_per_structure"] > 0 and r["md_stable"] in (0, 1)
        rotation_error = r["test_frames.equivariance_force_relative"]
        # MACE is equivariant by construction; a barely trained TransIP is not
        assert rotation_error < 1e-6 if r["method"] == "mace" else rotation_error > 1e-4
    assert (tmp_path / "study.png").stat().st_size > 10_000 and (tmp_path / "study.csv").exists()
    stamps = {p: p.stat().st_mtime for p in tmp_path.glob("*/*/result.json")}
    assert len(stamps) == 8
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and {p: p.stat().st_mtime for p in stamps} == stamps

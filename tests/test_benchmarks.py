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

"""Smoke runs of the benchmark scripts, so that they cannot rot (the numbers are not judged here)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """`benchmarks/suite.py --smoke` once: every benchmark script at toy size, then BENCHMARKS.md from them."""
    pytest.importorskip("mace")
    results = tmp_path_factory.mktemp("suite")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--smoke", "--results", str(results)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return results


def load(results, script):
    return json.loads((results / f"{script}.json").read_text())


@pytest.mark.slow
def test_native_ops_benchmark_smoke(suite):
    runs = load(suite, "native_ops")["results"]
    assert {(r["kind"], r["kernel"]) for r in runs} == {("box", "fused"), ("box", "reference"),
                                                        ("molecule", "fused"), ("molecule", "reference")}
    for r in runs:
        assert "skipped" not in r, r
        assert r["seconds"] > 0 and r["edges"] > 0 and r["attention_gflops"] > 0
    table = (suite / "native_ops.md").read_text()
    assert table.count("\n| box |") == 2 and table.count("\n| molecule |") == 2
    assert (suite / "native_ops.png").stat().st_size > 10_000


@pytest.mark.slow
def test_attention_kernels_benchmark_smoke(suite):
    """Fused, reference and dense SDPA run on the same graphs (each checked against the reference inside)."""
    runs = load(suite, "attention_kernels")["results"]
    assert {(r["atoms"], r["implementation"]) for r in runs} == {
        (n, i) for n in (100, 300) for i in ("fused", "reference", "dense")}
    assert all("skipped" not in r and r["seconds"] > 0 and r["gflops"] > 0 for r in runs)


@pytest.mark.slow
def test_cpp_vs_python_benchmark_smoke(suite):
    result = load(suite, "cpp_vs_python")
    rows = result["rows"]
    assert len(rows) == 8 and all(r["cpp_ms"] > 0 and r["energy_difference"] < 1e-6 for r in rows)
    # the profile names the native ops among the costs, in both precisions
    profiled = {r["op"]: r for r in result["float32_profile"]["ops"]}
    assert {"transip::neighbor_attention_backward", "transip::edge_encoder"} <= set(profiled)
    assert all(r["float64_ms"] > 0 and r["float32_ms"] > 0 for r in profiled.values() if r["op"].startswith("transip::"))


@pytest.mark.slow
def test_engine_example_benchmarks_smoke(suite):
    openmm_rows = load(suite, "openmm_overhead")["rows"]
    assert [r["atoms"] for r in openmm_rows] == [21, 384] and all(r["openmm_step_ms"] > 0 for r in openmm_rows)
    lammps_rows = load(suite, "lammps_overhead")["rows"]
    assert [(r["atoms"], r["ranks"]) for r in lammps_rows] == [(21, 1), (21, 2), (384, 1), (384, 2)]
    assert all(r["lammps_step_ms"] > 0 and r["artifact_ms"] > 0 for r in lammps_rows)


@pytest.mark.slow
def test_engines_benchmark_smoke(suite):
    """Every engine and the classical floor ran on aspirin and a water box."""
    rows = load(suite, "engines")["rows"]
    ran = {(r["system"], r["engine"]) for r in rows if "skipped" not in r and r["seconds"] > 0}
    assert ran == {(s, e) for s in ("aspirin", "water") for e in ("model", "openmm", "lammps-1", "lammps-2",
                                                                   "classical") if (s, e) != ("aspirin", "classical")}
    assert all(50 < r["peak_mib"] < 8000 for r in rows if "skipped" not in r)  # resident memory, in MiB


@pytest.mark.slow
def test_benchmarks_md_is_written_from_the_results(suite):
    text = (suite / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks") and "python benchmarks/suite.py --smoke" in text
    for script in ("native_ops", "attention_kernels", "cpp_vs_python", "openmm_overhead", "lammps_overhead",
                   "engines", "training_speed"):
        assert (suite / f"{script}.md").read_text().strip() in text
    # The MACE comparison is the Pareto study's (same training budget, same engine), run by the suite too.
    assert "| a TransIP as accurate on held-out scaffolds as the smallest MACE" in text
    assert (suite / "pareto" / "pareto.md").read_text().strip() in text
    assert "| fused float32 >= 1.7x faster than float64" in text and "| training: fused path >= 3x" in text


def test_training_speed_benchmark_smoke(suite):
    """Today's training, the reference path with denormals flushed and the fused path, timed in one run on the same
    batches; their losses agree."""
    result = json.loads((suite / "training_speed.json").read_text())
    assert [(r["kernel"], r["flush_denormals"]) for r in result["rows"]] == [("reference", False),
                                                                             ("reference", True), ("fused", True)]
    assert all(r["ms_per_step"] > 0 and len(r["losses"]) == 3 for r in result["rows"])
    assert result["loss_relative_difference"] < 1e-5 and result["speedup"] > 0


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
        assert r["ms_per_structure"] > 0 and r["md_stable"] in (0, 1) and r["parameters"] > 100
        rotation_error = r["test_frames.equivariance_force_relative"]
        # MACE is equivariant by construction; a barely trained TransIP is not
        assert rotation_error < 1e-6 if r["method"] == "mace" else rotation_error > 1e-4
    assert (tmp_path / "study.png").stat().st_size > 10_000 and (tmp_path / "study.csv").exists()
    from transip.checkpoint import load_checkpoint

    trained = load_checkpoint(tmp_path / "transip" / "n16-seed0" / "best.ckpt")["train_config"]
    assert (trained["force_loss"], trained["ema_decay"]) == ("huber", 0.9)  # the config's "training" fields
    stamps = {p: p.stat().st_mtime for p in tmp_path.glob("*/*/result.json")}
    assert len(stamps) == 8
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and {p: p.stat().st_mtime for p in stamps} == stamps
    # A report of the cells finished so far: one result removed, --report-only names it and trains nothing.
    (tmp_path / "none" / "n160-seed0" / "result.json").unlink()
    partial = subprocess.run(command + ["--report-only"], capture_output=True, text=True, timeout=300)
    assert partial.returncode == 0, partial.stderr[-3000:]
    report = json.loads((tmp_path / "study.json").read_text())
    assert report["missing_cells"] == [{"method": "none", "train_size": 160, "seed": 0}]
    assert not (tmp_path / "none" / "n160-seed0" / "result.json").exists()
    assert "**Partial report: 1 cells are not in it**" in (tmp_path / "study.md").read_text()


def test_ablation_smoke(tmp_path):
    """The ablation pipeline at toy size on the chemistry data: every row trains (today's model and one with
    repulsion, block geometry and the weight EMA), is evaluated on every held-out split and timed in OpenMM;
    the report names every row; a rerun finds every cell done and retrains nothing."""
    command = [sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--config",
               str(ROOT / "configs" / "ablation_smoke.json"), "--cost", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["today's model", "+ repulsion and geometry"]
    for r in rows:
        for split in ("test_scaffolds", "test_clusters", "test_frames", "condensed"):
            assert 0 < r[f"{split}/force_mae"] < 10
        assert r["openmm_ms_per_step"] > 0 and r["parameters"] > 1000
    assert rows[1]["parameters"] > rows[0]["parameters"]  # the block geometry projections
    table = (tmp_path / "ablation.md").read_text()
    assert "| today's model |" in table and "| + repulsion and geometry |" in table
    stamps = {p: p.stat().st_mtime for p in tmp_path.glob("*/seed*/result.json")}
    assert len(stamps) == 2
    rerun = subprocess.run(command[:-3] + ["--output", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and {p: p.stat().st_mtime for p in stamps} == stamps
    (tmp_path / "ablation.md").unlink()
    report = subprocess.run(command[:-3] + ["--output", str(tmp_path), "--report-only"], capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 0 and (tmp_path / "ablation.md").read_text() == table


@pytest.mark.slow
def test_pareto_smoke(suite):
    """The accuracy-per-cost pipeline at toy size, as the suite ran it: a TransIP and a MACE (mace-torch's own
    training command) with the same CPU-time budget, evaluated on every held-out split, timed in OpenMM through
    openmm-ml (both) and in LAMMPS (TransIP), float32 and float64, on the water and the solvated box; the report
    states the target; a rerun retrains nothing."""
    out = suite / "pareto"
    report = json.loads((out / "pareto.json").read_text())
    rows = {r["family"]: r for r in report["rows"]}
    assert set(rows) == {"transip", "mace"}
    budget = report["config"]["budget_hours"]
    for family, r in rows.items():
        for split in ("test_scaffolds", "test_clusters", "test_frames", "test_frames_neutral", "condensed"):
            assert 0 < r[split]["force_mae"] < 10 and r[split]["structures"] > 0
        # The budget is spent, and at most one more epoch (tiny here) follows it.
        assert budget <= r["training"]["cpu_hours"] < budget + 0.01 and r["training"]["epochs"] >= 1
        assert r["training"]["machine"]  # where the budget was spent
        timed = {(c["system"], c["dtype"]) for c in r["cost"]["rows"]}
        assert timed == {(s, d) for s in ("water", "solvated") for d in ("float32", "float64")}
        assert all(c["openmm_ms"] > 0 for c in r["cost"]["rows"])
        assert all(c["lammps_ms"] > 0 for c in r["cost"]["rows"]) if family == "transip" else True
    solvated = next(c for c in rows["mace"]["cost"]["rows"] if c["system"] == "solvated")
    assert solvated["atoms"] == 36 + 3 * 40
    assert report["verdict"]["met"] in (True, False) and report["verdict"]["smallest_mace"] == rows["mace"]["name"]
    table = (out / "pareto.md").read_text()
    assert "**met**" in table or "**not met**" in table
    assert (out / "pareto.png").stat().st_size > 10_000
    stamps = {p: p.stat().st_mtime for p in out.glob("*/result.json")}
    assert len(stamps) == 2
    rerun = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--config",
                            str(ROOT / "configs" / "pareto_smoke.json"), "--output", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and {p: p.stat().st_mtime for p in stamps} == stamps


def test_pareto_only_refuses_a_model_the_config_lacks():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pareto.py"), "--config",
                          str(ROOT / "configs" / "pareto_smoke.json"), "--only", "TransIP 99x9", "--report-only"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--only" in out.stderr and "'TransIP 99x9'" in out.stderr and "'TransIP 32x1 r5'" in out.stderr


def test_pareto_model_with_its_own_seed_trains_with_it(tmp_path, monkeypatch):
    """A config entry's `seed` (a second training of a cell) reaches both families: MACE's command, TransIP's
    TrainConfig (which picks the training subset from it); entries without one take the study's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pareto
    import transip.train

    config = pareto.load_config(ROOT / "configs" / "pareto_smoke.json")
    trained = []
    monkeypatch.setattr(transip.train, "train", lambda cfg, resume: trained.append(cfg))
    for family in ("mace", "transip"):
        entry = next(e for e in config["models"] if e["family"] == family)
        for model, seed in ((entry, config["seed"]), ({**entry, "seed": config["seed"] + 7}, config["seed"] + 7)):
            assert pareto.entry_seed(config, model) == seed
            if family == "mace":
                command = pareto.mace_command(config, model, tmp_path, 1, [1, 6])
                assert command[command.index("--seed") + 1] == str(seed)
            else:
                pareto.train_transip(config, model, tmp_path)
                assert trained[-1].seed == seed


def test_pareto_refuses_a_second_training_that_does_not_name_its_cell(tmp_path):
    """The report pairs a second training with its cell by name, so a seeded entry must be `<cell> seed N`."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pareto

    config = json.loads((ROOT / "configs" / "pareto_smoke.json").read_text())
    first = config["models"][0]
    for name in (f"{first['name']} again", f"{first['name']} seed 2", "Nothing seed 1"):
        config["models"].append({**first, "name": name, "seed": 1})
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        with pytest.raises(SystemExit, match=f"{name!r} has its own seed 1, so it must be named"):
            pareto.load_config(path)
        config["models"].pop()
    config["models"].append({**first, "name": f"{first['name']} seed 1", "seed": 1})
    path.write_text(json.dumps(config))
    assert pareto.load_config(path)["models"][-1]["seed"] == 1


def test_pareto_reports_the_spread_between_trainings_and_the_means():
    """Cells trained twice (an entry with its own seed) are reported with each training's error and the mean; the
    best TransIP mean is compared with the smallest MACE's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pareto

    def row(name, family, mae):
        return {"name": name, "family": family, "test_scaffolds": {"force_mae": mae}}

    config = {"models": [{"name": "T"}, {"name": "M"}, {"name": "T seed 1", "seed": 1},
                         {"name": "M seed 1", "seed": 1}, {"name": "U seed 3", "seed": 3}]}
    rows = [row("T", "transip", 0.150), row("M", "mace", 0.156), row("T seed 1", "transip", 0.160),
            row("M seed 1", "mace", 0.152)]
    spread = pareto.seed_spread(config, rows)  # "U seed 3" has no finished base cell: left out
    assert [(s["cell"], s["values"]) for s in spread] == [("T", [0.150, 0.160]), ("M", [0.156, 0.152])]
    assert [round(1000 * s["std"], 3) for s in spread] == [7.071, 2.828]  # sample standard deviations
    text = pareto.seed_text(spread, "M")
    assert ("T: 150.0 and 160.0 (mean 155.0, standard deviation 7.1)" in text
            and "M: 156.0 and 152.0 (mean 154.0, standard deviation 2.8)" in text)
    # Standard error of the difference of means: sqrt(7.071^2 / 2 + 2.828^2 / 2) = 5.385
    assert ("T (155.0) is less accurate than the smallest MACE (154.0); the difference, 1.0, against a standard "
            "error of 5.4") in text
    assert pareto.seed_text([], "M") == ""

    # A third training is listed with commas.
    config["models"].append({"name": "T seed 2", "seed": 2})
    three = pareto.seed_spread(config, rows + [row("T seed 2", "transip", 0.155)])
    assert "T: 150.0, 160.0 and 155.0 (mean 155.0, standard deviation 5.0)" in pareto.seed_text(three, "M")

    # The verdict judges such cells on their means: T's first training (150) beats M's (156), but on the means
    # (155 against 154) T is less accurate, so the target is not met however fast T is.
    cost = lambda ms: {"rows": [{"system": s, "dtype": d, "openmm_ms": ms} for s in ("water", "solvated")
                                for d in ("float32", "float64")]}
    for r in rows:
        r.update(parameters=10 if r["family"] == "transip" else 100, cost=cost(1.0 if r["family"] == "transip" else 50.0))
    config["cost"] = {"dtypes": ["float32", "float64"]}
    result = pareto.verdict(config, rows)
    assert result["met"] is False and result["smallest_mace"] == "M"
    assert [(c["name"], round(c["force_mae"], 4), c["trainings"]) for c in result["candidates"]] == [("T", 0.155, 2)]
    assert "154.0 meV/A (mean of 2 trainings)" in result["text"]
    rows[2]["test_scaffolds"]["force_mae"] = 0.150  # T's second training as good as its first: mean 150, met
    result = pareto.verdict(config, rows)
    assert result["met"] is True and result["within_noise"] == []  # 4.0 ahead; M's trainings spread by 2.8
    rows[0]["test_scaffolds"]["force_mae"] = rows[2]["test_scaffolds"]["force_mae"] = 0.153  # mean 153: 1.0 ahead
    result = pareto.verdict(config, rows)
    assert result["met"] is True and result["within_noise"] == ["T"]
    assert ("Within noise: T is 1.0 meV/A ahead on the mean of 2 trainings, less than the largest standard "
            "deviation between trainings of one cell (2.8 meV/A)") in result["text"]


def test_model_card_comes_from_the_checkpoint_and_results_files(tmp_path):
    """benchmarks/model_card.py writes the shipped model's card from its checkpoint, its metrics file and the
    stability report: their numbers appear in its tables, the trained domain in its limits."""
    import shutil

    from conftest import SHIPPED, SHIPPED_MODEL

    shipped = SHIPPED_MODEL.parent
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(SHIPPED_MODEL, model / "best.ckpt")
    metrics = json.loads((shipped / "test_metrics.json").read_text())
    stability = {"config": {"md": {"temperature_K": 300.0, "time_ps": 0.1, "timestep_fs": 0.5},
                            "nve": {"timestep_fs": 0.5}},
                 "runs": [{"system": "water", "engine": "lammps", "atoms": 288, "time_ps": 0.1, "intact": True,
                           "closest_intermolecular_A": 1.4567, "temperature_mean_K": 301.23,
                           "rdf_oo_first_peak": {"r_A": 2.876, "g": 2.512}}],
                 "nve": [{"system": "aspirin", "atoms": 21, "steps": 200, "energy_drift_mev_per_atom": -0.0123,
                          "energy_std_mev_per_atom": 0.0456}]}
    (tmp_path / "stability.json").write_text(json.dumps(stability))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "model_card.py"), str(model), "--config",
                           str(ROOT / "configs" / "chemistry_model.json"), "--metrics", str(shipped / "test_metrics.json"),
                           "--stability", str(tmp_path / "stability.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    card = (model / "README.md").read_text()
    for split, m in metrics.items():
        assert f"| {m['structures']} | {1000 * m['energy_mae_per_atom']:.2f} | {1000 * m['force_mae']:.1f} |" in card, split
    assert f"elements {SHIPPED['elements']};" in card and f"other elements than {SHIPPED['elements']}," in card
    assert "| water | lammps | 288 | 0.1 | yes | 1.46 | 301.2 |" in card
    assert "| aspirin | 21 | 200 | -0.012 | 0.046 |" in card
    assert ("first peak (position, height): lammps: 2.88 A, 2.51; GFN2-xTB reference not run or not past its "
            "equilibration yet") in card

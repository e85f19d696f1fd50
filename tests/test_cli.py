"""The `transip` command line and the shipped model."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHIPPED, SHIPPED_MODEL

ASPIRIN = ROOT / "examples" / "molecules" / "aspirin.xyz"


def transip(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "transip", *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"transip {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_check_equivariance_reports_small_errors_for_the_shipped_model():
    out = transip("check-equivariance", SHIPPED_MODEL, ASPIRIN, "--rotations", 4)
    assert "energy invariance error" in out.stdout and "force equivariance error" in out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # A trained TransIP has learned near-equivariance: forces rotate with the molecule to within a few %.
    assert 0 < result["force_relative"] < 0.05
    assert 0 <= result["energy_abs_per_atom"] < 0.01


def test_md_conserves_energy_and_writes_a_trajectory(tmp_path):
    from transip.calculator import run_md
    from transip.data import read_structures

    s = read_structures(ASPIRIN, require_labels=False)[0]
    traj = tmp_path / "md.extxyz"
    result = run_md(SHIPPED_MODEL, s, steps=40, timestep_fs=0.5, temperature=300.0, trajectory=str(traj),
                    log=lambda line: None)
    frames = read_structures(traj, require_labels=False)
    assert len(frames) == 11 and all(len(f.numbers) == 21 for f in frames)
    assert abs(result["energy_drift_per_atom_ev"]) < 1e-3  # eV/atom over 20 fs of NVE
    assert np.isfinite(frames[-1].positions).all()


def test_cli_errors_name_the_problem(tmp_path):
    out = transip("check-equivariance", tmp_path / "none.ckpt", ASPIRIN, check=False)
    assert out.returncode == 2 and "none.ckpt does not exist" in out.stderr
    out = transip("check-equivariance", SHIPPED_MODEL, tmp_path / "missing.xyz", check=False)
    assert out.returncode == 2 and "missing.xyz does not exist" in out.stderr
    silane = tmp_path / "si.xyz"
    silane.write_text("2\n\nC 0 0 0\nSi 1.9 0 0\n")
    out = transip("check-equivariance", SHIPPED_MODEL, silane, check=False)
    # issue 14: the symbol, the first atom and the model's elements, not a bare atomic number
    assert out.returncode == 2 and ("element Si (atom 1, 1 atom(s) in all) is not among the trained elements "
                                    f"{SHIPPED['elements']}") in out.stderr
    out = transip("train", "--data", tmp_path / "nothing.extxyz", "-o", tmp_path / "run", check=False)
    assert out.returncode == 2 and "nothing.extxyz does not exist" in out.stderr


def test_train_command_writes_checkpoint_log_and_plot(small_dataset, tmp_path):
    out = transip("train", "--data", small_dataset, "-o", tmp_path / "run", "--epochs", 1, "--batch-size", 16,
                  "--objective", "augment", "--val-structures", 20, "--no-progress",
                  "--model", '{"d_model": 16, "num_heads": 2, "num_layers": 1, "cutoff": 4.0}')
    assert "epoch   1" in out.stdout
    for name in ("last.ckpt", "best.ckpt", "train.log", "learning_curves.png", "config.json"):
        assert (tmp_path / "run" / name).exists(), name


@pytest.mark.slow
def test_shipped_model_card_metrics_are_reproduced(tmp_path):
    """The held-out metrics in the model card come from `transip evaluate` on the shipped files."""
    card = json.loads((SHIPPED_MODEL.parent / "test_metrics.json").read_text())
    out = transip("evaluate", SHIPPED_MODEL, "--splits", "test_frames", "--rotations", 2,
                  "--json", tmp_path / "m.json")
    metrics = json.loads((tmp_path / "m.json").read_text())["test_frames"]
    assert "test_frames" in out.stdout
    for key in ("energy_mae_per_atom", "force_mae", "force_cosine"):
        assert metrics[key] == pytest.approx(card["test_frames"][key], rel=1e-6)


def test_ase_calculator_energy_forces_and_stress_of_a_periodic_box():
    import ase

    from transip.calculator import TransIPCalculator
    from transip.data import read_structures

    s = read_structures(ASPIRIN, require_labels=False)[0]
    atoms = ase.Atoms(s.numbers, positions=s.positions + 1.0, cell=[14.0, 14.5, 15.0], pbc=True)
    atoms.calc = TransIPCalculator(SHIPPED_MODEL)
    energy = atoms.get_potential_energy()
    assert np.sum(atoms.get_potential_energies()) == pytest.approx(energy, abs=1e-8)  # neutral singlet: no offset
    stress = atoms.get_stress()
    h = 1e-5
    strained = []
    for sign in (1, -1):
        a = atoms.copy()
        a.calc = atoms.calc
        a.set_cell(atoms.cell * (1 + sign * h), scale_atoms=True)
        strained.append(a.get_potential_energy())
    # isotropic strain: dE/d(eps) = V * trace(stress)
    assert (strained[0] - strained[1]) / (2 * h) == pytest.approx(atoms.get_volume() * stress[:3].sum(), rel=1e-5)


# ---------------------------------------------------------------- trained domain (issue 14, item 4)
def test_shipped_checkpoint_records_its_trained_domain():
    from transip.checkpoint import load_checkpoint
    from transip.domain import domain_from_training_data, trained_domain

    payload = load_checkpoint(SHIPPED_MODEL)
    domain = trained_domain(payload)
    from ase.data import chemical_symbols

    assert {"H", "C", "N", "O", "F", "S", "Cl"} <= set(domain["elements"])  # every shipped model knows these
    assert domain["elements"] == [chemical_symbols[z] for z in domain["atomic_numbers"]]
    assert domain["charges"] == [-1, 0, 1] and domain["spins"] == [1, 2, 3]
    assert domain_from_training_data(payload, SHIPPED_MODEL) == domain


def test_ase_calculator_refuses_untrained_charge_unless_allowed():
    import ase.io

    from transip.calculator import TransIPCalculator

    atoms = ase.io.read(ASPIRIN)
    atoms.info["charge"] = 3
    atoms.calc = TransIPCalculator(SHIPPED_MODEL)
    with pytest.raises(ValueError, match=r"total charge 3 is not among the trained charges \[-1, 0, 1\].*"
                                         r"allow_untrained=True"):
        atoms.get_potential_energy()
    atoms.info["charge"], atoms.info["spin"] = 0, 5
    atoms.calc = TransIPCalculator(SHIPPED_MODEL)
    with pytest.raises(ValueError, match=r"spin multiplicity 5 is not among the trained multiplicities \[1, 2, 3\]"):
        atoms.get_potential_energy()
    atoms.calc = TransIPCalculator(SHIPPED_MODEL, allow_untrained=True)
    with pytest.warns(UserWarning, match="outside the trained domain: spin multiplicity 5"):
        assert np.isfinite(atoms.get_potential_energy())


def test_cli_refuses_untrained_element_charge_and_spin(tmp_path):
    import ase.io

    silicon = ase.io.read(ASPIRIN)
    silicon.numbers[20] = 14  # an H becomes Si, which the shipped model never saw
    path = tmp_path / "silicon.xyz"
    ase.io.write(path, silicon)
    for command in (("md", SHIPPED_MODEL, path, "--steps", 2, "--trajectory", tmp_path / "t.extxyz"),
                    ("check-equivariance", SHIPPED_MODEL, path, "--rotations", 2)):
        out = transip(*command, check=False)
        assert out.returncode == 2
        assert out.stderr.strip() == (
            f"transip {command[0]}: error: element Si (atom 20, 1 atom(s) in all) is not among the trained "
            f"elements {SHIPPED['elements']}: the model would give an arbitrary energy. Pass --allow-untrained to run it "
            "anyway"), out.stderr
        assert not out.stdout, "nothing (no progress bar) before the error"
    out = transip("md", SHIPPED_MODEL, ASPIRIN, "--charge", 3, "--steps", 2, "--trajectory", tmp_path / "t.extxyz",
                  check=False)
    assert out.returncode == 2 and "total charge 3 is not among the trained charges [-1, 0, 1]" in out.stderr
    out = transip("md", SHIPPED_MODEL, ASPIRIN, "--charge", 1, "--spin", 2, "--steps", 2, "--trajectory",
                  tmp_path / "t.extxyz")
    assert out.returncode == 0
    out = transip("check-equivariance", SHIPPED_MODEL, ASPIRIN, "--charge", 3, "--rotations", 2,
                  "--allow-untrained")
    assert out.returncode == 0 and "outside the trained domain: total charge 3" in out.stderr


# ---------------------------------------------------------------- output paths (issue 14, item 6)
def test_export_to_a_bad_path_says_so_in_one_line(tmp_path):
    import os

    folder = tmp_path / "existing"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    unwritable = tmp_path / "locked" / "model.pt"
    if os.geteuid() == 0:  # root writes anywhere a folder's mode forbids: use a file system that refuses files
        unwritable = ROOT.anchor + "proc/transip-model.pt"
    else:
        unwritable.parent.mkdir()
        unwritable.parent.chmod(0o500)
    cases = {folder: "it is an existing folder; give a file name",
             a_file / "model.pt": f"{a_file} is a file, not a folder",
             unwritable: ""}
    for path, reason in cases.items():
        out = transip("export", SHIPPED_MODEL, "-o", path, check=False)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert lines[0].startswith(f"transip export: error: cannot write {path}: {reason}"), lines[0]
        assert "partial" not in lines[0] and "Traceback" not in out.stderr
    assert list(folder.iterdir()) == []


def test_written_files_follow_the_umask(tmp_path):
    import os

    from transip.files import write_atomically

    path = write_atomically(tmp_path / "x.txt", lambda tmp: tmp.write_text("done"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "done" and (path.stat().st_mode & 0o777) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_md_with_openmm_refuses_untrained_charge_naming_the_cli_override(tmp_path):
    out = transip("md", SHIPPED_MODEL, ASPIRIN, "--engine", "openmm", "--charge", 3, "--steps", 2,
                  "--trajectory", tmp_path / "t.dcd", check=False)
    assert out.returncode == 2, out.stderr
    assert "total charge 3 is not among the trained charges [-1, 0, 1]" in out.stderr
    assert "Pass --allow-untrained" in out.stderr
    out = transip("md", SHIPPED_MODEL, ASPIRIN, "--engine", "openmm", "--charge", 3, "--steps", 2,
                  "--trajectory", tmp_path / "t.dcd", "--allow-untrained")
    assert "outside the trained domain: total charge 3" in out.stderr

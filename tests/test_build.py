"""The native build refuses, with a clear message, a toolchain it cannot build the ops with."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

CMAKE = Path(sys.executable).with_name("cmake")


def configure(tmp_path, **env):
    """Run only CMake's configure step of the project's build, as pip install would."""
    return subprocess.run([str(CMAKE), "-S", str(ROOT), "-B", str(tmp_path / "build"), "-G", "Ninja",
                           f"-DPython_EXECUTABLE={sys.executable}", "-DSKBUILD_PROJECT_VERSION=0.0.0"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not CMAKE.exists() or shutil.which("g++") is None, reason="needs cmake and g++")
def test_build_without_openmp_fails_with_a_clear_message(tmp_path):
    # A compiler that works but rejects -fopenmp, as a compiler without OpenMP support does.
    compiler = tmp_path / "cxx-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in *openmp*) echo "no OpenMP" >&2; exit 1;; '
                        'esac; done\nexec g++ "$@"\n')
    compiler.chmod(0o755)
    result = configure(tmp_path, CXX=str(compiler))
    assert result.returncode != 0
    assert "transip: no OpenMP support found for the C++ compiler" in result.stdout + result.stderr


@pytest.mark.skipif(not CMAKE.exists(), reason="needs cmake")
def test_build_without_a_compiler_fails_with_a_clear_message(tmp_path):
    result = configure(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert result.returncode != 0
    assert "CMAKE_CXX_COMPILER" in result.stdout + result.stderr


@pytest.mark.slow
def test_setup_leaves_the_shipped_artifact_where_the_lammps_decks_run_as_they_are(tmp_path):
    """`bash run.sh setup` exports the shipped model to lammps/examples/model.pt; the aspirin deck then runs
    unchanged from its folder (issue 14: no manual export step)."""
    import json
    import re

    from transip.export import read_metadata

    examples = ROOT / "lammps" / "examples"
    artifact = examples / "model.pt"
    assert artifact.exists(), "run `bash run.sh setup` first: it exports the shipped model to " + str(artifact)
    assert read_metadata(artifact)["provenance"]["checkpoint"] == "best.ckpt"
    # One passive OpenMP thread: on a loaded machine (CI beside background jobs) spinning threads made this
    # 1-minute run exceed 10 minutes; the deck itself is run unchanged.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}
    result = subprocess.run([str(Path(sys.executable).with_name("lmp")), "-in", "in.aspirin_nve", "-log",
                             str(tmp_path / "log.lammps"), "-screen", "none"], cwd=examples, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "log.lammps").read_text()
    rows = [line.split() for line in log.splitlines() if re.fullmatch(r"\s*\d+(\s+[-+\d.eE]+){4}\s*", line)]
    steps, etotal = [int(r[0]) for r in rows], [float(r[4]) for r in rows]
    assert steps[0] == 0 and steps[-1] == 2000
    assert max(etotal) - min(etotal) < 0.01 * 21, json.dumps(rows)  # NVE: total energy within 10 meV/atom


def test_methanol_example_box_has_liquid_density_and_no_overlapping_molecules():
    """examples/boxes/methanol_box.extxyz (written by make_methanol_box.py): 64 methanols at 0.787 g/cm^3, and no
    two atoms of different molecules closer than 2.0 A (minimum image), where random orientations alone put
    hydrogens 0.7 A apart."""
    import ase.io
    import numpy as np

    box = ase.io.read(ROOT / "examples" / "boxes" / "methanol_box.extxyz")
    grams = box.get_masses().sum() / 6.02214076e23
    assert len(box) == 64 * 6 and abs(grams / (box.get_volume() * 1e-24) - 0.787) < 0.005
    molecule = np.repeat(np.arange(64), 6)  # the script writes each molecule's six atoms together
    distances = box.get_all_distances(mic=True)
    assert distances[molecule[:, None] != molecule[None, :]].min() >= 2.0
    assert distances[molecule[:, None] == molecule[None, :]].max() < 3.0  # and every molecule is whole


def test_solvated_and_water_example_boxes_hold_whole_molecules_at_liquid_density():
    """examples/boxes/{water,solvated}_box.extxyz (make_solvated_box.py): 96 waters, and the held-out drug-like
    molecule in 100 waters, at 1.0 g/cm^3 with no two molecules closer than 1.7 A; the LAMMPS data files hold the
    same atoms; rebuilding gives the same boxes."""
    import ase.io
    import numpy as np

    sys.path.insert(0, str(ROOT / "examples" / "boxes"))
    from make_solvated_box import solvated_box, water_box

    from transip.md_summary import structure_check

    for name, waters, extra_atoms, rebuild in (("water_box", 96, 0, water_box), ("solvated_box", 100, 36, solvated_box)):
        box = ase.io.read(ROOT / "examples" / "boxes" / f"{name}.extxyz")
        assert len(box) == 3 * waters + extra_atoms and (box.numbers == 8).sum() == waters + (1 if extra_atoms else 0)
        grams = box.get_masses().sum() / 6.02214076e23
        assert abs(grams / (box.get_volume() * 1e-24) - 1.0) < 0.01
        check = structure_check(box.numbers, [box.positions], np.asarray(box.cell))
        assert check["molecules"] == waters + (1 if extra_atoms else 0) and check["closest_intermolecular_A"] >= 1.7
        assert np.allclose(rebuild().positions, box.positions, atol=1e-6)
        data = ase.io.read(ROOT / "lammps" / "examples" / f"{name}.data", format="lammps-data", atom_style="atomic")
        assert len(data) == len(box) and np.allclose(data.cell.lengths(), box.cell.lengths())

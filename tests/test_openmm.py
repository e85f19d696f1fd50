"""OpenMM front end: TorchForce energies and forces against the artifact, NVE conservation, openmm-ml, ML/MM,
errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SHIPPED, SHIPPED_MODEL
from transip.data import Structure, read_structures
from transip.export import export_checkpoint, load

openmm = pytest.importorskip("openmm")
from openmm import unit  # noqa: E402

from transip.openmm_plugin import KJ_PER_MOL_PER_EV, create_force  # noqa: E402
from transip.openmm_plugin.md import build_simulation, platform_by_name, run, topology_of  # noqa: E402

ASPIRIN = ROOT / "examples" / "molecules" / "aspirin.xyz"
BOX = ROOT / "examples" / "boxes" / "methanol_box.extxyz"
NVE_STEPS = 2000
NVE_DRIFT_BOUND_MEV_PER_ATOM = 0.5  # stated in the README


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, engine_checkpoint):
    """The engines run a model with repulsion and block geometry (conftest.engine_checkpoint)."""
    path = tmp_path_factory.mktemp("openmm") / "model.pt"
    export_checkpoint(engine_checkpoint, path)
    return path


def structure(path) -> Structure:
    return read_structures(path, require_labels=False, index="0")[0]


def artifact_result(artifact, s: Structure):
    module, _ = load(artifact)
    cell = torch.tensor(np.asarray(s.cell) if s.periodic else np.zeros((3, 3)))
    pbc = torch.tensor([bool(s.periodic)] * 3)
    out = module.compute(torch.tensor(s.positions), torch.tensor(s.numbers), cell, pbc, s.charge, s.spin, False)
    return float(out["energy"].detach()) * KJ_PER_MOL_PER_EV, out["forces"].detach().numpy() * KJ_PER_MOL_PER_EV * 10


def triclinic_box() -> Structure:
    """The methanol box in a sheared cell (OpenMM's reduced form: a along x, b in the xy plane)."""
    s = structure(BOX)
    side = float(s.cell[0, 0])
    cell = np.array([[side, 0.0, 0.0], [2.0, side, 0.0], [-1.0, 1.5, side]])
    return Structure(s.numbers, s.positions, cell=cell, pbc=[True] * 3)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
@pytest.mark.parametrize("system", ["molecule", "periodic box", "triclinic box"])
def test_openmm_equals_the_artifact(artifact, platform, system):
    s = {"molecule": lambda: structure(ASPIRIN), "periodic box": lambda: structure(BOX),
         "triclinic box": triclinic_box}[system]()
    simulation = build_simulation(artifact, s, platform=platform)
    state = simulation.context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    expected_energy, expected_forces = artifact_result(artifact, s)
    assert abs(energy - expected_energy) <= 1e-10 * abs(expected_energy)
    np.testing.assert_allclose(forces, expected_forces, rtol=0, atol=1e-9 * np.abs(expected_forces).max())


def test_minimize_relaxes_a_strained_molecule_to_the_tolerance(artifact):
    """`transip md --minimize` (build_simulation's minimize_fmax): aspirin with every atom displaced by up to
    0.1 A relaxes, its energy falls, and the RMS force component reaches the tolerance."""
    s = structure(ASPIRIN)
    strained = Structure(s.numbers, s.positions + np.random.default_rng(0).uniform(-0.1, 0.1, s.positions.shape))

    def energy_and_rms_force(simulation):
        state = simulation.context.getState(getEnergy=True, getForces=True)
        forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / KJ_PER_MOL_PER_EV,
                float(np.sqrt(np.mean(forces ** 2))) / KJ_PER_MOL_PER_EV / 10)  # eV, eV/A

    before, rms_before = energy_and_rms_force(build_simulation(artifact, strained, platform="Reference"))
    after, rms_after = energy_and_rms_force(build_simulation(artifact, strained, platform="Reference",
                                                             minimize_fmax=0.05, minimize_iterations=2000))
    assert rms_before > 0.5 and after < before - 0.5
    assert rms_after <= 0.05


def test_nve_energy_conservation(artifact):
    """VerletIntegrator, 0.5 fs, 2000 steps of aspirin from 300 K: total-energy change below the README's bound."""
    summary = run(artifact, structure(ASPIRIN), NVE_STEPS, timestep_fs=0.5, temperature=300.0, platform="CPU",
                  report_every=200, stream=open("/dev/null", "w"))
    print(summary)
    assert abs(summary["energy_drift_per_atom_ev"]) * 1000 < NVE_DRIFT_BOUND_MEV_PER_ATOM
    assert summary["energy_std_per_atom_ev"] * 1000 < NVE_DRIFT_BOUND_MEV_PER_ATOM


def test_openmm_ml_finds_the_potential_by_name(artifact):
    script = ("from openmmml import MLPotential; import openmm.app as app, sys\n"
              "sys.path.insert(0, %r)\n"
              "from transip.data import read_structures\n"
              "from transip.openmm_plugin.md import topology_of\n"
              "s = read_structures(%r, require_labels=False, index='0')[0]\n"
              "system = MLPotential('transip', modelPath=%r).createSystem(topology_of(s))\n"
              "import openmm\n"
              "context = openmm.Context(system, openmm.VerletIntegrator(0.001))\n"
              "context.setPositions(s.positions * 0.1)\n"
              "print(system.getNumParticles(), context.getState(getEnergy=True).getPotentialEnergy()._value)\n"
              ) % (str(ROOT), str(ASPIRIN), str(artifact))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    particles, energy = out.stdout.split()
    assert int(particles) == 21
    assert abs(float(energy) - artifact_result(artifact, structure(ASPIRIN))[0]) < 1e-6


@pytest.mark.parametrize("interpolate", [False, True])
def test_create_mixed_system_replaces_only_the_ml_region(artifact, interpolate):
    """Aspirin (ML) plus two MM argon-like atoms with Lennard-Jones and charges on everything. The mixed energy
    must be E_TransIP(aspirin) + the MM energy with every aspirin-aspirin nonbonded pair removed. With
    interpolate=True (openmm-ml builds the ML force in an empty System, then deep-copies it into a CustomCVForce)
    lambda_interpolate=1 gives the same and lambda_interpolate=0 the MM energy."""
    from openmmml import MLPotential

    from transip.openmm_plugin import serialization_problem

    if interpolate and serialization_problem():
        pytest.fail(serialization_problem())  # the deep copy would crash pytest itself

    a = structure(ASPIRIN)
    s = Structure(np.concatenate([a.numbers, [18, 18]]),
                  np.concatenate([a.positions, [[8.0, 0.0, 0.0], [0.0, 9.0, 1.0]]]))
    topology = topology_of(s)
    n_ml = len(a.numbers)
    rng = np.random.default_rng(0)
    charges = rng.uniform(-0.3, 0.3, len(s.numbers))

    def mm_system(exclude_ml_pairs: bool):
        system = openmm.System()
        for atom in topology.atoms():
            system.addParticle(atom.element.mass)
        nonbonded = openmm.NonbondedForce()
        for q in charges:
            nonbonded.addParticle(q, 0.3, 0.5)
        if exclude_ml_pairs:
            for i in range(n_ml):
                for j in range(i + 1, n_ml):
                    nonbonded.addException(i, j, 0.0, 0.3, 0.0)
        system.addForce(nonbonded)
        return system

    def energy(system, **parameters):
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform_by_name("Reference"))
        context.setPositions(np.asarray(s.positions) * 0.1)
        for name, value in parameters.items():
            context.setParameter(name, value)
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    potential = MLPotential("transip", modelPath=str(artifact))
    mixed = potential.createMixedSystem(topology, mm_system(False), list(range(n_ml)), interpolate=interpolate)
    ml_energy, _ = artifact_result(artifact, a)
    expected = ml_energy + energy(mm_system(True))
    assert abs(energy(mixed, **({"lambda_interpolate": 1.0} if interpolate else {})) - expected) <= 1e-9 * abs(expected)
    if interpolate:
        mm_energy = energy(mm_system(False))
        assert abs(energy(mixed, lambda_interpolate=0.0) - mm_energy) <= 1e-9 * abs(mm_energy)


def test_errors_name_the_problem(artifact):
    a = structure(ASPIRIN)
    topology = topology_of(a)
    with pytest.raises(ValueError, match="the topology has 21 atoms but the System has 20 particles"):
        create_force(artifact, topology=topology, num_particles=20)
    with pytest.raises(ValueError, match="element Si \\(ML atom 1\\) is not known to the model model.pt, which knows "
                                         f"{SHIPPED['elements']}(?! [A-Z])"):
        create_force(artifact, numbers=[6, 14])
    thin = 2 * SHIPPED["cutoff"] - 1.0
    small = Structure(a.numbers, a.positions, cell=np.eye(3) * thin, pbc=[True] * 3)
    with pytest.raises(ValueError, match=f"periodic box is {thin:.2f} A thick, less than twice the model's cutoff "
                                         f"\\({2 * SHIPPED['cutoff']:.1f} A\\)"):
        create_force(artifact, topology=topology_of(small))
    with pytest.raises(ValueError, match="OpenMM platform 'Quantum' is not available here; available: Reference"):
        platform_by_name("Quantum")
    with pytest.raises(ValueError, match="charge 9 / spin multiplicity 1 outside the model's range"):
        create_force(artifact, topology=topology, charge=9)


def test_md_command_with_openmm(tmp_path):
    out = subprocess.run([sys.executable, "-m", "transip", "md", str(SHIPPED_MODEL), str(ASPIRIN), "--engine", "openmm",
                          "--steps", "100", "--report-every", "50", "--trajectory", str(tmp_path / "md.dcd")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OpenMM (CPU): 21 atoms" in out.stdout and (tmp_path / "md.dcd").stat().st_size > 500  # 2 frames of 21 atoms


# --- ML/MM in a periodic solvated box (issue 14, 5a) ------------------------------------------------------------

# A small molecule needs MM parameters for its interactions with the solvent (mechanical embedding). openmm.app
# ships none for methanol, so here are OPLS-AA's methanol charges, Lennard-Jones, bonds and angles (the hydroxyl
# H has epsilon 0, its sigma is only a placeholder), with the 1-4 scaling of amber14/tip3p.xml, which the same
# ForceField loads for the water.
METHANOL_FFXML = """<ForceField>
 <AtomTypes>
  <Type name="moh-C" class="moh-C" element="C" mass="12.011"/>
  <Type name="moh-O" class="moh-O" element="O" mass="15.999"/>
  <Type name="moh-HC" class="moh-HC" element="H" mass="1.008"/>
  <Type name="moh-HO" class="moh-HO" element="H" mass="1.008"/>
 </AtomTypes>
 <Residues>
  <Residue name="MOH">
   <Atom name="C" type="moh-C" charge="0.145"/>
   <Atom name="O" type="moh-O" charge="-0.683"/>
   <Atom name="H1" type="moh-HC" charge="0.040"/>
   <Atom name="H2" type="moh-HC" charge="0.040"/>
   <Atom name="H3" type="moh-HC" charge="0.040"/>
   <Atom name="HO" type="moh-HO" charge="0.418"/>
   <Bond atomName1="C" atomName2="O"/>
   <Bond atomName1="C" atomName2="H1"/>
   <Bond atomName1="C" atomName2="H2"/>
   <Bond atomName1="C" atomName2="H3"/>
   <Bond atomName1="O" atomName2="HO"/>
  </Residue>
 </Residues>
 <HarmonicBondForce>
  <Bond class1="moh-C" class2="moh-O" length="0.141" k="267776.0"/>
  <Bond class1="moh-C" class2="moh-HC" length="0.109" k="284512.0"/>
  <Bond class1="moh-O" class2="moh-HO" length="0.0945" k="462750.4"/>
 </HarmonicBondForce>
 <HarmonicAngleForce>
  <Angle class1="moh-HC" class2="moh-C" class3="moh-HC" angle="1.881465" k="276.144"/>
  <Angle class1="moh-HC" class2="moh-C" class3="moh-O" angle="1.911136" k="292.88"/>
  <Angle class1="moh-C" class2="moh-O" class3="moh-HO" angle="1.893682" k="460.24"/>
 </HarmonicAngleForce>
 <NonbondedForce coulomb14scale="0.8333333333333334" lj14scale="0.5">
  <UseAttributeFromResidue name="charge"/>
  <Atom type="moh-C" sigma="0.35" epsilon="0.276144"/>
  <Atom type="moh-O" sigma="0.312" epsilon="0.71128"/>
  <Atom type="moh-HC" sigma="0.25" epsilon="0.12552"/>
  <Atom type="moh-HO" sigma="0.1" epsilon="0.0"/>
 </NonbondedForce>
</ForceField>
"""
# methanol (rdkit ETKDG + MMFF), Angstrom, in the residue's atom order
METHANOL = [("C", "C", [-0.3689, -0.0363, -0.0202]), ("O", "O", [0.9790, -0.4055, -0.2460]),
            ("H1", "H", [-0.5581, 0.0160, 1.0548]), ("H2", "H", [-1.0231, -0.7887, -0.4668]),
            ("H3", "H", [-0.5643, 0.9342, -0.4830]), ("HO", "H", [1.5353, 0.2803, 0.1611])]


def solvated_methanol():
    """Methanol in a 2.5 nm TIP3P box (room for PME's 1 nm cutoff; the model needs twice its own, 12 A), PME.
    Returns the Modeller (topology with box, positions) and the MM System."""
    import io

    import openmm.app as app
    from openmm import Vec3

    topology = app.Topology()
    residue = topology.addResidue("MOH", topology.addChain())
    atoms = {name: topology.addAtom(name, app.Element.getBySymbol(symbol), residue) for name, symbol, _ in METHANOL}
    for other in ("O", "H1", "H2", "H3"):
        topology.addBond(atoms["C"], atoms[other])
    topology.addBond(atoms["O"], atoms["HO"])
    positions = [Vec3(*xyz) * 0.1 for _, _, xyz in METHANOL] * unit.nanometer
    forcefield = app.ForceField("amber14/tip3p.xml", io.StringIO(METHANOL_FFXML))
    modeller = app.Modeller(topology, positions)
    modeller.addSolvent(forcefield, model="tip3p", boxSize=Vec3(2.5, 2.5, 2.5) * unit.nanometer)
    mm_system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                        nonbondedCutoff=1.0 * unit.nanometer, constraints=app.HBonds)
    return modeller, mm_system


def test_the_potential_answers_openmm_mls_long_range_query(artifact):
    """openmm-ml's mechanical embedding asks every potential whether it is long-ranged before embedding it in a
    periodic MM system, and refuses (mlLongRange error) when the answer is None, the default."""
    from openmmml import MLPotential

    assert MLPotential("transip", modelPath=str(artifact))._impl.getMLLongRange() is False


def test_ml_mm_in_a_periodic_solvated_box(artifact):
    """The common ML/MM case: a solute (ML) in a water box with PME (MM). The mixed System builds, its energy and
    forces are finite, and its ML part (force group 1) is the artifact's for the solute in the periodic box."""
    from openmmml import MLPotential

    modeller, mm_system = solvated_methanol()
    assert mm_system.usesPeriodicBoundaryConditions()
    ml_atoms = list(range(len(METHANOL)))
    mixed = MLPotential("transip", modelPath=str(artifact)).createMixedSystem(modeller.topology, mm_system, ml_atoms,
                                                                             forceGroup=1)
    for force in mixed.getForces():  # methanol's own MM bonds and angles are gone: TransIP computes them
        if isinstance(force, openmm.HarmonicBondForce):
            assert all(not {force.getBondParameters(i)[0], force.getBondParameters(i)[1]} <= set(ml_atoms)
                       for i in range(force.getNumBonds()))
        if isinstance(force, openmm.HarmonicAngleForce):
            assert all(not set(force.getAngleParameters(i)[:3]) <= set(ml_atoms) for i in range(force.getNumAngles()))
    context = openmm.Context(mixed, openmm.VerletIntegrator(0.0005), platform_by_name("CPU"))
    context.setPositions(modeller.positions)
    total = context.getState(getEnergy=True, getForces=True)
    assert np.isfinite(total.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    assert np.isfinite(total.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)).all()
    ml = context.getState(getEnergy=True, getForces=True, groups={1})
    ml_energy = ml.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    ml_forces = ml.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    positions = modeller.positions.value_in_unit(unit.angstrom)
    box = np.array([v.value_in_unit(unit.angstrom) for v in mixed.getDefaultPeriodicBoxVectors()])
    solute = Structure([1 if symbol == "H" else {"C": 6, "O": 8}[symbol] for _, symbol, _ in METHANOL],
                       [list(positions[i]) for i in ml_atoms], cell=box, pbc=[True] * 3)
    expected_energy, expected_forces = artifact_result(artifact, solute)
    assert abs(ml_energy - expected_energy) <= 1e-10 * abs(expected_energy)
    np.testing.assert_allclose(ml_forces[ml_atoms], expected_forces, rtol=0,
                               atol=1e-9 * np.abs(expected_forces).max())
    assert not ml_forces[len(ml_atoms):].any()  # the ML force acts on the solute only


# --- box vectors as a numpy array (5b) ---------------------------------------------------------------------------

def test_create_system_takes_numpy_box_vectors(artifact):
    """Topology.setPeriodicBoxVectors keeps a numpy-array Quantity as given (e.g. from
    State.getPeriodicBoxVectors(asNumpy=True)); createSystem must not take its truth value."""
    from openmmml import MLPotential

    a = structure(ASPIRIN)
    potential = MLPotential("transip", modelPath=str(artifact))
    topology = topology_of(a)
    topology.setPeriodicBoxVectors(np.eye(3) * 3.0 * unit.nanometer)
    system = potential.createSystem(topology)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform_by_name("Reference"))
    context.setPositions(np.asarray(a.positions) * 0.1)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    expected, _ = artifact_result(artifact, Structure(a.numbers, a.positions, cell=np.eye(3) * 30.0, pbc=[True] * 3))
    assert abs(energy - expected) <= 1e-10 * abs(expected)
    thin = 2 * SHIPPED["cutoff"] - 1.0  # A
    topology.setPeriodicBoxVectors(np.eye(3) * 0.1 * thin * unit.nanometer)  # the numpy box reaches the thickness check
    with pytest.raises(ValueError, match=f"periodic box is {thin:.2f} A thick, less than twice the model's cutoff"):
        potential.createSystem(topology)


# --- saving Systems: XmlSerializer in a fresh process, deepcopy, pickle (5c) -------------------------------------

# Run in child processes: with an incompatible openmm / openmmtorch pair these end in a segmentation fault, which
# must fail the test instead of killing pytest.
SAVED_SYSTEM_CHILD = r"""
import copy, pickle, sys
import numpy as np
import transip  # registers the native ops that the artifact's TorchScript code calls, before OpenMM loads it
import openmm

mode, source, positions_path, out_path = sys.argv[1:5]
positions = np.load(positions_path)


def evaluate(system):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return state.getPotentialEnergy()._value, state.getForces(asNumpy=True)._value


if mode == "reload":  # source: a System saved by XmlSerializer in another process
    with open(source) as handle:
        results = {"reloaded": evaluate(openmm.XmlSerializer.deserialize(handle.read()))}
else:  # source: a structure file; the System is built here, as a user script would, then copied
    from transip.data import read_structures
    from transip.openmm_plugin.md import build_simulation

    artifact, path = source.split("::")
    system = build_simulation(artifact, read_structures(path, require_labels=False, index="0")[0],
                              platform="Reference").system
    # deepcopy (replica exchange tools, openmm-ml's interpolation) and pickle go through XmlSerializer in memory
    results = {"deepcopy": evaluate(copy.deepcopy(system)), "pickle": evaluate(pickle.loads(pickle.dumps(system)))}
np.savez(out_path, **{f"{key}_energy": value[0] for key, value in results.items()},
         **{f"{key}_forces": value[1] for key, value in results.items()})
"""
SAVED_SYSTEMS = {"molecule": ASPIRIN, "periodic box": BOX}


def saved_system_case(artifact, name):
    simulation = build_simulation(artifact, structure(SAVED_SYSTEMS[name]), platform="Reference")
    state = simulation.context.getState(getEnergy=True, getForces=True, getPositions=True)
    return (simulation.system, state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
            state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def run_saved_system_child(tmp_path, mode, source, positions):
    np.save(tmp_path / "positions.npy", positions)
    script = tmp_path / "child.py"
    script.write_text(SAVED_SYSTEM_CHILD)
    out = subprocess.run([sys.executable, str(script), mode, source, str(tmp_path / "positions.npy"),
                          str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, f"child exited with {out.returncode}:\n{out.stderr[-3000:]}"
    return np.load(tmp_path / "out.npz")


@pytest.mark.parametrize("name", ["molecule", "periodic box"])
def test_saved_system_reloads_in_a_fresh_process(artifact, tmp_path, name):
    system, positions, energy, forces = saved_system_case(artifact, name)
    xml = tmp_path / "system.xml"
    xml.write_text(openmm.XmlSerializer.serialize(system))
    out = run_saved_system_child(tmp_path, "reload", str(xml), positions)
    assert abs(float(out["reloaded_energy"]) - energy) <= 1e-10 * abs(energy)
    np.testing.assert_allclose(out["reloaded_forces"], forces, rtol=0, atol=1e-9 * np.abs(forces).max())


def test_system_deepcopies_and_pickles(artifact, tmp_path):
    _, positions, energy, forces = saved_system_case(artifact, "molecule")
    out = run_saved_system_child(tmp_path, "copy", f"{artifact}::{ASPIRIN}", positions)
    for key in ("deepcopy", "pickle"):
        assert abs(float(out[f"{key}_energy"]) - energy) <= 1e-10 * abs(energy), key
        np.testing.assert_allclose(out[f"{key}_forces"], forces, rtol=0, atol=1e-9 * np.abs(forces).max(), err_msg=key)


def test_serialization_problem_names_the_crashing_version_pair():
    """openmmtorch 1.5 was built against OpenMM 8.5's SerializationNode, which OpenMM 8.6 changed: saving then
    crashes the process, so the pair is recognised from the versions."""
    from transip.openmm_plugin import serialization_problem

    message = serialization_problem("8.6.1", "1.5")
    assert message.startswith("openmm 8.6.1 with openmmtorch 1.5: a System holding a TorchForce cannot be saved")
    assert "segmentation fault" in message and "`pip install openmm==8.5.2 openmmml==1.7` (constraints.txt)" in message
    assert serialization_problem("8.6.0", "1.5") is not None
    assert serialization_problem("8.5.2", "1.5") is None and serialization_problem("8.4.0.post2", "1.5") is None
    assert serialization_problem("8.6.1", "1.6") is None  # a release built against 8.6
    installed = serialization_problem()
    assert installed is None, f"the installed set cannot save Systems: {installed}"


def test_create_force_warns_once_where_saving_would_crash(artifact, monkeypatch):
    import importlib.metadata

    from transip.openmm_plugin import force as force_module

    monkeypatch.setattr(openmm, "__version__", "8.6.1")
    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.5" if name == "openmmtorch" else installed(name))
    monkeypatch.setattr(force_module, "_serialization_warned", False)
    topology = topology_of(structure(ASPIRIN))
    with pytest.warns(UserWarning, match="openmm 8.6.1 with openmmtorch 1.5: a System holding a TorchForce cannot "
                                         "be saved or copied"):
        create_force(artifact, topology=topology)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_force(artifact, topology=topology)  # once per process


# --- trained domain (issue 14, item 4) ---------------------------------------------------------------------------

UNTRAINED_CHARGE = ("total charge 3 is not among the trained charges \\[-1, 0, 1\\]: the model would give an "
                    "arbitrary energy. Pass allow_untrained=True \\(openmm-ml: allowUntrained=True\\) to run it anyway")


def test_untrained_charge_is_refused_naming_the_override(artifact):
    """Charge 3 lies inside the embeddings' range (|charge| <= 4) but outside the charges the model was trained
    on: refused by create_force and by openmm-ml, with the value, the trained set and the override named."""
    from openmmml import MLPotential

    from transip.export import read_metadata

    assert read_metadata(artifact)["trained_domain"]["charges"] == [-1, 0, 1]
    topology = topology_of(structure(ASPIRIN))
    with pytest.raises(ValueError, match=UNTRAINED_CHARGE):
        create_force(artifact, topology=topology, charge=3)
    with pytest.raises(ValueError, match=UNTRAINED_CHARGE):
        MLPotential("transip", modelPath=str(artifact)).createSystem(topology, charge=3)
    with pytest.raises(ValueError, match="spin multiplicity 5 is not among the trained multiplicities \\[1, 2, 3\\]"):
        create_force(artifact, topology=topology, spin=5)


@pytest.mark.parametrize("route", ["create_force", "build_simulation", "MLPotential(allowUntrained)",
                                   "createSystem(allowUntrained)"])
def test_untrained_charge_override_warns_and_runs(artifact, monkeypatch, route):
    from openmmml import MLPotential

    from transip import domain

    monkeypatch.setattr(domain, "_warned", set())  # check_trained_domain warns once per process and problem
    a = structure(ASPIRIN)
    topology = topology_of(a)
    with pytest.warns(UserWarning, match="running outside the trained domain: total charge 3 is not among the "
                                         "trained charges \\[-1, 0, 1\\]"):
        if route == "create_force":
            system = openmm.System()
            for atom in topology.atoms():
                system.addParticle(atom.element.mass)
            system.addForce(create_force(artifact, topology=topology, charge=3, allow_untrained=True))
        elif route == "build_simulation":  # transip md --engine openmm
            system = build_simulation(artifact, Structure(a.numbers, a.positions, charge=3), platform="Reference",
                                      allow_untrained=True).system
        elif route == "MLPotential(allowUntrained)":
            system = MLPotential("transip", modelPath=str(artifact), allowUntrained=True).createSystem(topology,
                                                                                                       charge=3)
        else:
            system = MLPotential("transip", modelPath=str(artifact)).createSystem(topology, charge=3,
                                                                                  allowUntrained=True)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform_by_name("Reference"))
    context.setPositions(np.asarray(a.positions) * 0.1)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    expected, _ = artifact_result(artifact, Structure(a.numbers, a.positions, charge=3))
    assert abs(energy - expected) <= 1e-10 * abs(expected)
    assert abs(expected - artifact_result(artifact, a)[0]) > 1.0  # the charge reached the model

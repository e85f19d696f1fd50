"""OpenMM front end: TorchForce energies and forces against the artifact, NVE conservation, openmm-ml, ML/MM,
errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SHIPPED_MODEL
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
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("openmm") / "model.pt"
    export_checkpoint(SHIPPED_MODEL, path)
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
    cell = np.array([[13.8, 0.0, 0.0], [2.0, 13.8, 0.0], [-1.0, 1.5, 13.8]])
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


def test_create_mixed_system_replaces_only_the_ml_region(artifact):
    """Aspirin (ML) plus two MM argon-like atoms with Lennard-Jones and charges on everything. The mixed energy
    must be E_TransIP(aspirin) + the MM energy with every aspirin-aspirin nonbonded pair removed."""
    from openmmml import MLPotential

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

    def energy(system):
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform_by_name("Reference"))
        context.setPositions(np.asarray(s.positions) * 0.1)
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    mixed = MLPotential("transip", modelPath=str(artifact)).createMixedSystem(topology, mm_system(False),
                                                                              list(range(n_ml)))
    ml_energy, _ = artifact_result(artifact, a)
    expected = ml_energy + energy(mm_system(True))
    assert abs(energy(mixed) - expected) <= 1e-9 * abs(expected)


def test_errors_name_the_problem(artifact):
    a = structure(ASPIRIN)
    topology = topology_of(a)
    with pytest.raises(ValueError, match="the topology has 21 atoms but the System has 20 particles"):
        create_force(artifact, topology=topology, num_particles=20)
    with pytest.raises(ValueError, match="element Si \\(ML atom 1\\) is not known to the model model.pt, which knows "
                                         "H C N O F S Cl"):
        create_force(artifact, numbers=[6, 14])
    small = Structure(a.numbers, a.positions, cell=np.eye(3) * 10.0, pbc=[True] * 3)
    with pytest.raises(ValueError, match="periodic box is 10.00 A thick, less than twice the model's cutoff \\(12.0 A\\)"):
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

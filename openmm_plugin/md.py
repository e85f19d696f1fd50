"""MD in OpenMM with a TransIP artifact: `transip md --engine openmm ...` and the tests use this.

Builds a Topology from the structure (one residue of all atoms; the box from the file's cell), a System with
the TransIP force only, and runs Verlet (NVE) or Langevin (NVT) dynamics, reporting step, energies,
temperature and speed, and writing a DCD or PDB trajectory.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import numpy as np

from transip.export.contract import ANGSTROM_PER_NM, KJ_PER_MOL_PER_EV
from transip.md_summary import md_summary

from .force import create_force

# Multiplied by 1/10 (the double 0.1), not divided by 10: positions bit for bit as OpenMM's own Angstrom -> nm.
NM_PER_ANGSTROM = 1.0 / ANGSTROM_PER_NM


def topology_of(structure):
    import openmm.app as app
    from openmm import Vec3, unit

    topology = app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    for index, z in enumerate(structure.numbers):
        element = app.Element.getByAtomicNumber(int(z))
        topology.addAtom(f"{element.symbol}{index}", element, residue)
    if structure.periodic:
        if not all(structure.pbc):
            raise ValueError("OpenMM boxes are periodic in all three directions; the structure has pbc "
                             f"{list(structure.pbc)}")
        topology.setPeriodicBoxVectors([Vec3(*row) * NM_PER_ANGSTROM for row in np.asarray(structure.cell)]
                                       * unit.nanometer)
    return topology


def platform_by_name(name: str):
    import openmm

    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name not in names:
        raise ValueError(f"OpenMM platform {name!r} is not available here; available: {', '.join(names)}")
    return openmm.Platform.getPlatformByName(name)


def build_simulation(artifact, structure, timestep_fs: float = 0.5, temperature: float = 300.0,
                     platform: str = "CPU", thermostat: bool = False, seed: int = 0, allow_untrained: bool = False,
                     minimize_fmax: Optional[float] = None, minimize_iterations: int = 500):
    """A Simulation of the structure with the TransIP force only, velocities drawn at `temperature`. With
    `minimize_fmax` (eV/A) the structure is first relaxed by OpenMM's minimiser until the RMS of the force
    components is that small (or for `minimize_iterations`), as a packed box needs before dynamics."""
    import openmm
    import openmm.app as app
    from openmm import unit

    from transip import native

    if native.available():
        native.keep_freed_memory()  # an MD process evaluates the same sizes over and over (docs/native_ops.md)
    topology = topology_of(structure)
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    if topology.getPeriodicBoxVectors() is not None:
        system.setDefaultPeriodicBoxVectors(*topology.getPeriodicBoxVectors())
    system.addForce(create_force(artifact, topology=topology, charge=structure.charge, spin=structure.spin,
                                 allow_untrained=allow_untrained))
    step = timestep_fs * unit.femtoseconds
    if thermostat:
        integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond, step)
        integrator.setRandomNumberSeed(seed)
    else:
        integrator = openmm.VerletIntegrator(step)
    simulation = app.Simulation(topology, system, integrator, platform_by_name(platform))
    simulation.context.setPositions(np.asarray(structure.positions) * NM_PER_ANGSTROM)
    if minimize_fmax is not None:
        simulation.minimizeEnergy(tolerance=minimize_fmax * KJ_PER_MOL_PER_EV * ANGSTROM_PER_NM,  # kJ/mol/nm
                                  maxIterations=minimize_iterations)
    simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    return simulation


def run(artifact, structure, steps: int, timestep_fs: float = 0.5, temperature: float = 300.0,
        platform: str = "CPU", thermostat: bool = False, trajectory: Optional[str] = None, report_every: int = 50,
        seed: int = 0, stream=sys.stdout, allow_untrained: bool = False, minimize_fmax: Optional[float] = None) -> dict:
    """Run MD and return `transip.md_summary.md_summary`: steps per second, ns/day, total-energy drift and
    fluctuation per atom in eV, and whether the molecules stayed whole over the reported frames (the keys the ASE
    driver returns too).
    allow_untrained: run a structure outside the model's trained domain with a warning (create_force)."""
    import openmm.app as app
    from openmm import unit

    simulation = build_simulation(artifact, structure, timestep_fs, temperature, platform, thermostat, seed,
                                  allow_untrained, minimize_fmax)
    n = len(structure.numbers)
    simulation.reporters.append(app.StateDataReporter(stream, report_every, step=True, potentialEnergy=True,
                                                      kineticEnergy=True, totalEnergy=True, temperature=True,
                                                      speed=True, separator="  "))
    if trajectory:
        reporter = (app.DCDReporter if str(trajectory).endswith(".dcd") else app.PDBReporter)(str(trajectory),
                                                                                              report_every)
        simulation.reporters.append(reporter)
    totals, frames = [], []

    def total_energy() -> float:
        state = simulation.context.getState(getEnergy=True, getPositions=True)
        frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom))
        return (state.getPotentialEnergy() + state.getKineticEnergy()).value_in_unit(unit.kilojoule_per_mole)

    totals.append(total_energy())
    start = time.perf_counter()
    done = 0
    while done < steps:
        chunk = min(report_every, steps - done)
        simulation.step(chunk)
        done += chunk
        totals.append(total_energy())
    seconds = time.perf_counter() - start
    # The structure check starts from the input, so whatever the minimiser changed counts too.
    frames.insert(0, np.asarray(structure.positions))
    return md_summary(np.array(totals) / KJ_PER_MOL_PER_EV, n, steps, seconds, timestep_fs, structure.numbers, frames,
                      np.asarray(structure.cell) if structure.periodic else None)

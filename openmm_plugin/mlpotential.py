"""openmm-ml potential `transip`, registered through the `openmmml.potentials` entry point:

    from openmmml import MLPotential
    potential = MLPotential("transip", modelPath="model.pt")
    system = potential.createSystem(topology, charge=0, spin=1)
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms, charge=0, spin=1)   # ML/MM
"""

from __future__ import annotations

from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

from .force import create_force


class TransIPPotentialImplFactory(MLPotentialImplFactory):
    def createImpl(self, name: str, modelPath: str = None, **args) -> MLPotentialImpl:
        if modelPath is None:
            raise ValueError("MLPotential('transip') needs modelPath=<artifact from `transip export`>")
        return TransIPPotentialImpl(modelPath)


class TransIPPotentialImpl(MLPotentialImpl):
    def __init__(self, model_path: str):
        self.model_path = model_path

    def addForces(self, topology, system, atoms, forceGroup: int, charge: int = 0, spin: int = 1, **args):
        force = create_force(self.model_path, topology=topology, charge=charge, spin=spin,
                             atoms=None if atoms is None else list(atoms),
                             periodic=topology.getPeriodicBoxVectors() is not None
                             or system.usesPeriodicBoundaryConditions(),
                             box_vectors=topology.getPeriodicBoxVectors() or
                             (system.getDefaultPeriodicBoxVectors() if system.usesPeriodicBoundaryConditions()
                              else None),
                             num_particles=system.getNumParticles())
        force.setForceGroup(forceGroup)
        system.addForce(force)

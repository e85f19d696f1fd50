"""openmm-ml potential `transip`, registered through the `openmmml.potentials` entry point:

    from openmmml import MLPotential
    potential = MLPotential("transip", modelPath="model.pt")
    system = potential.createSystem(topology, charge=0, spin=1)
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms, charge=0, spin=1)   # ML/MM

Options: `modelPath` (constructor, required); `charge`, `spin` (createSystem / createMixedSystem);
`allowUntrained` (constructor or createSystem / createMixedSystem; the latter wins when given) runs a charge,
spin or element outside the model's trained domain with a warning instead of refusing it.
"""

from __future__ import annotations

from typing import Optional

from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

from transip.export import read_metadata

from .force import create_force


class TransIPPotentialImplFactory(MLPotentialImplFactory):
    def createImpl(self, name: str, modelPath: str = None, allowUntrained: bool = False, **args) -> MLPotentialImpl:
        if modelPath is None:
            raise ValueError("MLPotential('transip') needs modelPath=<artifact from `transip export`>")
        return TransIPPotentialImpl(modelPath, allowUntrained)


class TransIPPotentialImpl(MLPotentialImpl):
    def __init__(self, model_path: str, allow_untrained: bool = False):
        self.model_path = model_path
        self.allow_untrained = bool(allow_untrained)
        # Checked now (metadata only: no model load, no native ops) so that a wrong path fails at MLPotential(...).
        read_metadata(model_path)

    def getMLLongRange(self) -> Optional[bool]:
        """False: a TransIP energy is a sum over atoms of terms that see only neighbours within the artifact's
        `cutoff` (metadata); there is no Ewald or other long-range term. openmm-ml 1.8 asks this before embedding
        the ML region in a periodic MM System and refuses when the answer is None (its default: "provide the
        mlLongRange option"). With False, its mechanical embedding leaves the Coulomb interactions between ML atoms
        and each other's periodic images to the MM force field's PME. (openmm-ml 1.7 does not ask.)"""
        return False

    def addForces(self, topology, system, atoms, forceGroup: int, charge: int = 0, spin: int = 1,
                  allowUntrained: Optional[bool] = None, **args):
        periodic = topology.getPeriodicBoxVectors() is not None or system.usesPeriodicBoundaryConditions()
        # Explicit None tests: the topology's box may be a numpy-array Quantity, whose truth value is an error.
        box_vectors = topology.getPeriodicBoxVectors()
        if box_vectors is None and system.usesPeriodicBoundaryConditions():
            box_vectors = system.getDefaultPeriodicBoxVectors()
        # createMixedSystem(interpolate=True) has the forces built in an empty System and then copies them into a
        # CustomCVForce of the real one: no particle count to check then.
        force = create_force(self.model_path, topology=topology, charge=charge, spin=spin,
                             atoms=None if atoms is None else list(atoms), periodic=periodic, box_vectors=box_vectors,
                             num_particles=system.getNumParticles() or None,
                             allow_untrained=self.allow_untrained if allowUntrained is None else bool(allowUntrained))
        force.setForceGroup(forceGroup)
        system.addForce(force)

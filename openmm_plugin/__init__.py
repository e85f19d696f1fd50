"""transip.openmm_plugin: TransIP in OpenMM through openmm-torch's TorchForce, and the openmm-ml potential `transip`."""

from .force import KJ_PER_MOL_PER_EV, TransIPOpenMMModule, create_force, serialization_problem

__all__ = ["create_force", "serialization_problem", "TransIPOpenMMModule", "KJ_PER_MOL_PER_EV"]

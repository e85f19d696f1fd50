"""transip.openmm_plugin: TransIP in OpenMM through openmm-torch's TorchForce, and the openmm-ml potential `transip`."""

from .force import KJ_PER_MOL_PER_EV, TransIPOpenMMModule, create_force

__all__ = ["create_force", "TransIPOpenMMModule", "KJ_PER_MOL_PER_EV"]

"""transip.export: one TorchScript artifact per trained model, with its metadata inside (see artifact.py)."""

from . import contract
from .artifact import METHODS, TransIPArtifact, describe, export_checkpoint
from .contract import FORMAT, FORMAT_VERSION, METADATA_FILE
from .load import ArtifactError, load, read_metadata

__all__ = ["contract", "FORMAT", "FORMAT_VERSION", "METADATA_FILE", "METHODS", "TransIPArtifact", "describe",
           "export_checkpoint",
           "ArtifactError", "load", "read_metadata"]

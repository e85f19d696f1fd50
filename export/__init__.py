"""transip.export: one TorchScript artifact per trained model, with its metadata inside (see artifact.py)."""

from .artifact import FORMAT, FORMAT_VERSION, METADATA_FILE, TransIPArtifact, describe, export_checkpoint
from .load import ArtifactError, load, read_metadata

__all__ = ["FORMAT", "FORMAT_VERSION", "METADATA_FILE", "TransIPArtifact", "describe", "export_checkpoint",
           "ArtifactError", "load", "read_metadata"]

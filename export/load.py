"""Reading artifacts back: metadata without running the model, and a checked load.

Every way an artifact can be unusable gets its own message that says which and what to do: missing file,
not a TorchScript file (including a training checkpoint given by mistake), truncated or corrupt file, no
TransIP metadata, another format version (older: export it again; newer: upgrade), native ops missing or of
another version, dtype or device not available.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from transip import native

from . import contract as c
from .contract import FORMAT, FORMAT_VERSION, METADATA_FILE


class ArtifactError(ValueError):
    """An artifact that cannot be used here; the message says why and what to do (a ValueError, so that every
    front end reports it as a user-facing error without importing the export stage)."""


def _check_archive(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist")
    if path.is_dir():
        raise ArtifactError(f"artifact {path} is a directory, not a file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        raise ArtifactError(f"{path} is not a TorchScript file (no zip archive header); create one with "
                            "`transip export CHECKPOINT -o model.pt`")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"artifact {path} is truncated or corrupt ({exc}); export it again") from exc
    names = archive.namelist()
    if not any("/code/" in name for name in names):
        hint = (" It looks like a training checkpoint (torch.save): run `transip export` on it."
                if any(name.endswith("data.pkl") for name in names) else "")
        raise ArtifactError(f"{path} is a zip archive but not a TorchScript module.{hint}")
    return archive


def read_metadata(path) -> dict:
    """The metadata of an artifact, without loading the model (no native ops needed)."""
    path = Path(path)
    archive = _check_archive(path)
    entry = next((name for name in archive.namelist() if name.endswith("/extra/" + METADATA_FILE)), None)
    if entry is None:
        raise ArtifactError(f"{path} is a TorchScript file without TransIP metadata ({METADATA_FILE}); "
                            "it was not written by `transip export`")
    try:
        metadata = json.loads(archive.read(entry))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ArtifactError(f"artifact {path}: metadata unreadable ({exc}); the file is corrupt, export it again") \
            from exc
    if c.metadata_path(metadata, c.KEY_FORMAT) != FORMAT:
        raise ArtifactError(f"{path}: metadata format {c.metadata_path(metadata, c.KEY_FORMAT)!r} is not {FORMAT!r}")
    check_format_version(path, c.metadata_path(metadata, c.KEY_FORMAT_VERSION))
    return metadata


def check_format_version(path, version) -> None:
    """Only this transip's format version loads: an older artifact lacks or misnames methods that engines call."""
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise ArtifactError(f"artifact {path} has format version {version}, older than the version {FORMAT_VERSION} "
                            "this transip reads (its methods differ): export it again with `transip export "
                            f"CHECKPOINT -o {path}`")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact {path} has format version {version}; this transip reads version "
                            f"{FORMAT_VERSION}: upgrade transip, or export it again with this transip")


def check_native_ops(path, metadata: dict) -> None:
    ops = c.metadata_path(metadata, c.KEY_NATIVE_OPS)
    if not ops:
        return
    if not native.available():
        raise ArtifactError(f"artifact {path} needs the TransIP native ops library ({ops['library']} {ops['version']}: "
                            f"{', '.join(ops['ops'])}), which is not loaded: {native.load_error()}. Rebuild transip "
                            "(`bash run.sh setup`), or export with `--kernel reference` for an artifact without ops")
    if ops["version"] != native.version():
        raise ArtifactError(f"artifact {path} was exported with TransIP native ops {ops['version']}, but this process "
                            f"has version {native.version()} loaded: export it again with this transip, or install "
                            f"transip {ops['version']}")


def check_device(path, metadata: dict, device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"device {device} requested for {path}, but CUDA is not available here; use device='cpu'")
    if device.type != "cpu" and c.metadata_path(metadata, c.KEY_KERNEL) == "fused":
        raise ArtifactError(f"artifact {path} uses the fused kernel, which runs on the CPU only; load it with "
                            "device='cpu' or export with `--kernel reference`")
    if device.type == "mps" and c.metadata_path(metadata, c.KEY_DTYPE) == "float64":
        raise ArtifactError(f"artifact {path} is float64, which device {device} does not support; export with "
                            "`--dtype float32`")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ArtifactError(f"device {device} is not supported for TransIP artifacts; use 'cpu'")


def load(path, device="cpu"):
    """Load an artifact after checking its metadata, ops and the device. Returns (module, metadata)."""
    path = Path(path)
    metadata = read_metadata(path)
    check_native_ops(path, metadata)
    device = torch.device(device)
    check_device(path, metadata, device)
    try:
        module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"artifact {path} could not be loaded ({first}); the file is corrupt or was written by "
                            "an incompatible torch: export it again") from exc
    module.eval()
    return module, metadata

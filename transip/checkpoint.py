"""Checkpoints: model + transformation network + optimiser state + provenance, in one torch file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from .files import write_atomically
from .model import ModelConfig, TransIP

CHECKPOINT_FORMAT = "transip-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "model_config", "model_state")


def save_checkpoint(path, payload: Dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated file under the final name."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path) -> Dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is corrupt or not a TransIP checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a TransIP checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if payload["version"] > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {payload['version']}; this transip reads up to "
                         f"{CHECKPOINT_VERSION}: upgrade transip")
    return payload


# What a checkpoint written before a ModelConfig field existed was trained with (new configs default otherwise).
FIELDS_BEFORE_THEY_EXISTED = {"repulsion": "none", "block_geometry": False}


def config_of(payload: Dict[str, Any]) -> Dict[str, Any]:
    """The checkpoint's ModelConfig fields, completed with what older checkpoints were trained with."""
    return {**FIELDS_BEFORE_THEY_EXISTED, **payload["model_config"]}


def model_from_checkpoint(payload_or_path, dtype: torch.dtype = torch.float64) -> TransIP:
    payload = payload_or_path if isinstance(payload_or_path, dict) else load_checkpoint(payload_or_path)
    model = TransIP(ModelConfig(**config_of(payload))).to(dtype)  # before loading: float64 stays float64
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint weights do not match its model_config: {exc}") from exc
    return model.to(dtype).eval()

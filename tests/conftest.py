import random
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DATA = ROOT / "data" / "xtb_organics.extxyz.xz"
SHIPPED_MODEL = ROOT / "models" / "transip-xtb-small" / "best.ckpt"
SMALL_MOLECULES = ("water", "methanol", "formaldehyde", "acetate", "methyl_radical", "ammonia", "ethylene",
                   "hydroxyl_radical")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A slice of the shipped xTB dataset: a few small molecules, 60 frames each, as extended XYZ."""
    import ase.io

    from transip.data import _read_extxyz

    frames = _read_extxyz(SHIPPED_DATA, ":")
    chosen = []
    for name in SMALL_MOLECULES:
        chosen += [f for f in frames if f.info["name"] == name][::6][:60]
    path = tmp_path_factory.mktemp("data") / "small.extxyz"
    ase.io.write(path, chosen, format="extxyz")
    return path


@pytest.fixture(scope="session")
def repulsive_checkpoint(tmp_path_factory) -> Path:
    """The shipped model's weights with the ZBL repulsion switched on (it has no weights of its own, and the
    shipped checkpoint predates it): the model the engine tests run, so that every engine path carries the
    repulsion."""
    from transip.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(SHIPPED_MODEL)
    payload["model_config"] = {**payload["model_config"], "repulsion": "zbl"}
    path = tmp_path_factory.mktemp("repulsive") / "repulsive.ckpt"
    save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return path

import random
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DATA = ROOT / "data" / "xtb_organics.extxyz.xz"
SHIPPED_MODEL = ROOT / (ROOT / "models" / "SHIPPED").read_text().strip()  # the default model (run.sh reads it too)


def shipped_model_facts() -> dict:
    """What messages about the shipped model name: its trained elements as the front ends list them, its cutoff,
    and whether it has the repulsion and geometry in every block (models trained before them do not)."""
    from transip.checkpoint import config_of, load_checkpoint

    payload = load_checkpoint(SHIPPED_MODEL)
    config = config_of(payload)
    return {"elements": " ".join(payload["trained_domain"]["elements"]), "cutoff": config["cutoff"],
            "repulsion": config.get("repulsion", "none"), "block_geometry": bool(config.get("block_geometry"))}


SHIPPED = shipped_model_facts()
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
def engine_checkpoint(tmp_path_factory) -> Path:
    """The shipped model's weights with what the model gained after it was trained switched on: the ZBL repulsion
    (no weights of its own) and geometry in every block (its projections drawn small, seeded, so the model stays
    close to the shipped one). The engine tests run this model, so that every engine path carries both. A shipped
    model trained with both is used as it is."""
    from transip.checkpoint import config_of, load_checkpoint, save_checkpoint
    from transip.model import ModelConfig, TransIP

    if SHIPPED["repulsion"] == "zbl" and SHIPPED["block_geometry"]:
        return SHIPPED_MODEL
    payload = load_checkpoint(SHIPPED_MODEL)
    config = {**config_of(payload), "repulsion": "zbl", "block_geometry": True}
    torch.manual_seed(1234)
    model = TransIP(ModelConfig(**config))
    missing, unexpected = model.load_state_dict(payload["model_state"], strict=False)
    assert not unexpected and all(name.endswith(".geometry") for name in missing), missing
    with torch.no_grad():
        for block in model.blocks:
            block.geometry.mul_(0.2)
    payload["model_config"], payload["model_state"] = config, model.state_dict()
    path = tmp_path_factory.mktemp("engine") / "engine.ckpt"
    save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return path

"""The trained domain of a model: the elements, total charges and spin multiplicities present in its training
data. The embeddings accept more (|charge| <= max_abs_charge, multiplicity <= max_multiplicity), but a value
the model never saw gives an arbitrary energy, so every front end refuses it unless the user insists (then it
warns once).

`python -m transip.domain CHECKPOINT...` records the domain in checkpoints trained before it was recorded,
from the training split of the dataset they name (checked against its SHA-256).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .elements import ELEMENT_SYMBOLS

OVERRIDE_HINT = {  # how each front end spells the override, for the error message
    "python": "allow_untrained=True",
    "cli": "--allow-untrained",
    "openmm": "allow_untrained=True (openmm-ml: allowUntrained=True)",
    "lammps": "pair_style transip ... untrained warn",
}
_warned: set = set()


def domain_of(structures: Iterable) -> dict:
    """The domain covered by some structures (transip.data.Structure)."""
    numbers, charges, spins = set(), set(), set()
    for s in structures:
        numbers.update(int(z) for z in np.unique(s.numbers))
        charges.add(int(s.charge))
        spins.add(int(s.spin))
    numbers = sorted(numbers)
    return {"elements": [ELEMENT_SYMBOLS[z] for z in numbers], "atomic_numbers": numbers,
            "charges": sorted(charges), "spins": sorted(spins)}


def untrained_values(domain: Optional[dict], numbers: Sequence[int], charge: int, spin: int) -> list[str]:
    """Descriptions of whatever in the input lies outside `domain` (empty when all is inside or no domain)."""
    if not domain:
        return []
    problems = []
    known = set(domain["atomic_numbers"])
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    unknown = [i for i, z in enumerate(numbers.tolist()) if z not in known]
    if unknown:
        z = int(numbers[unknown[0]])
        symbol = ELEMENT_SYMBOLS[z] if 0 < z < len(ELEMENT_SYMBOLS) else f"Z={z}"
        problems.append(f"element {symbol} (atom {unknown[0]}, {len(unknown)} atom(s) in all) is not among the "
                        f"trained elements {' '.join(domain['elements'])}")
    if int(charge) not in domain["charges"]:
        problems.append(f"total charge {int(charge)} is not among the trained charges {domain['charges']}")
    if int(spin) not in domain["spins"]:
        problems.append(f"spin multiplicity {int(spin)} is not among the trained multiplicities {domain['spins']}")
    return problems


def check_trained_domain(domain: Optional[dict], numbers: Sequence[int], charge: int, spin: int,
                         allow_untrained: bool = False, where: str = "python") -> None:
    """Raise ValueError naming each value outside the trained domain, the trained set and the override; with
    `allow_untrained`, warn once per problem instead. `where` picks the override's spelling in the message."""
    problems = untrained_values(domain, numbers, charge, spin)
    if not problems:
        return
    if not allow_untrained:
        raise ValueError("; ".join(problems) + ": the model would give an arbitrary energy. Pass "
                         f"{OVERRIDE_HINT.get(where, OVERRIDE_HINT['python'])} to run it anyway")
    for problem in problems:
        if problem not in _warned:
            _warned.add(problem)
            warnings.warn(f"running outside the trained domain: {problem}", stacklevel=3)


def trained_domain(payload: dict) -> Optional[dict]:
    """The domain a checkpoint records (None for checkpoints trained before it was recorded)."""
    return payload.get("trained_domain")


def domain_for(payload: dict, config) -> dict:
    """The domain to enforce for a checkpoint: the recorded one, or else everything its embeddings accept
    (model config `elements`, `max_abs_charge`, `max_multiplicity`)."""
    recorded = trained_domain(payload)
    if recorded:
        return recorded
    numbers = sorted(int(z) for z in config.elements)
    return {"elements": [ELEMENT_SYMBOLS[z] for z in numbers], "atomic_numbers": numbers,
            "charges": list(range(-config.max_abs_charge, config.max_abs_charge + 1)),
            "spins": list(range(1, config.max_multiplicity + 1))}


def domain_from_training_data(payload: dict, checkpoint: Path) -> dict:
    """Recompute a checkpoint's domain from what it trained on: its dataset's training split and every frame of its
    extra datasets (each found by the name it recorded and verified by SHA-256; a dataset is a file or a folder of
    shards)."""
    from .data import file_digest, read_structures
    from .train import training_subset

    provenance, config = payload.get("provenance") or {}, payload.get("train_config") or {}

    def located(name: str, digest) -> Path:
        dataset = Path(name)
        candidates = [dataset, checkpoint.parent / dataset, Path(__file__).resolve().parents[1] / dataset]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"checkpoint {checkpoint}: its training dataset {dataset} was not found")
        if file_digest(path) != digest:
            raise ValueError(f"checkpoint {checkpoint}: {path} is not the dataset it was trained on (SHA-256 differs)")
        return path

    structures = read_structures(located(provenance.get("dataset", ""), provenance.get("dataset_sha256")))
    train = training_subset(payload["splits"]["train"], config.get("max_train_structures"), config.get("seed", 0))
    extra = [s for name, digest in (provenance.get("extra_datasets") or {}).items()
             for s in read_structures(located(name, digest))]
    return domain_of([structures[i] for i in train] + extra)


def record_trained_domain(checkpoint) -> dict:
    from .checkpoint import load_checkpoint, save_checkpoint

    checkpoint = Path(checkpoint)
    payload = load_checkpoint(checkpoint)
    payload["trained_domain"] = domain_from_training_data(payload, checkpoint)
    save_checkpoint(checkpoint, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return payload["trained_domain"]


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(name, record_trained_domain(name))

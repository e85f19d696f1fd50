"""How far should the ZBL repulsion reach? For each `repulsion_range` (the switch-off distance in units of the sum
of covalent radii), on the shipped model's weights with the repulsion added:

- what the term adds at equilibrium bond lengths (energy, force, stiffness d2E/dr2): what the network must learn
  to cancel;
- the pair scan of `tests/test_model.py` (weakest repulsive force below 0.6 A over all element pairs; C-H at
  0.3 A above the scan's minimum);
- NVE of aspirin in OpenMM (0.5 fs, 1 ps from 300 K): energy drift per atom.

    python benchmarks/repulsion_range.py [--ranges 1.0 1.25 1.5] [--out benchmarks/results/repulsion_range]

Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, write_results  # noqa: E402
from transip.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from transip.data import Structure, read_structures  # noqa: E402
from transip.export import export_checkpoint  # noqa: E402
from transip.kernels import smooth_step_down  # noqa: E402
from transip.metrics import predict  # noqa: E402
from transip.repulsion import repulsion_tables, zbl_pair_energy, zbl_screening_function  # noqa: E402

# The model this study adds the repulsion to: the first shipped model, trained before the repulsion existed.
BASE_MODEL = ROOT / "models" / "transip-xtb-small" / "best.ckpt"
BONDS = [("C-H", 6, 1, 1.09), ("O-H", 8, 1, 0.96), ("C-C aromatic", 6, 6, 1.40), ("C=O", 6, 8, 1.23),
         ("C-N", 6, 7, 1.47)]


def term_at(zi: int, zj: int, r: float, switch_range: float) -> dict:
    """Energy (eV), dE/dr (eV/A) and d2E/dr2 (eV/A^2) of the switched repulsion of one pair at r."""
    charge_product, inverse_screening, switch_off = repulsion_tables([zi, zj], switch_range)
    length = torch.tensor([r], dtype=torch.float64, requires_grad=True)
    energy = (zbl_pair_energy(length, charge_product[0, 1], inverse_screening[0, 1], *zbl_screening_function())
              * smooth_step_down(length / switch_off[0, 1]))
    (slope,) = torch.autograd.grad(energy.sum(), [length], create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), [length])
    return {"energy_ev": float(energy), "slope_ev_per_a": float(slope), "stiffness_ev_per_a2": float(curvature)}


def with_repulsion(folder: Path, switch_range: float) -> Path:
    payload = load_checkpoint(BASE_MODEL)
    payload["model_config"] = {**payload["model_config"], "repulsion": "zbl", "repulsion_range": switch_range}
    path = folder / f"range-{switch_range}.ckpt"
    save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return path


def pair_scan(model) -> dict:
    distances = np.round(np.arange(1.5, 0.2999, -0.01), 3)
    short = distances <= 0.6
    weakest, ch_rise = None, None
    for zi, zj in itertools.combinations_with_replacement(model.config.elements, 2):
        spin = 1 if (zi + zj) % 2 == 0 else 2
        out = predict(model, [Structure([zi, zj], np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]]), spin=spin)
                              for r in distances])
        energies, forces = np.array(out["energy"]), np.array([f[1, 0] for f in out["forces"]])
        if weakest is None or forces[short].min() < weakest[2]:
            weakest = (int(zi), int(zj), float(forces[short].min()))
        if (zi, zj) == (1, 6):
            ch_rise = float(energies[-1] - energies.min())
    return {"weakest_force_below_0.6_ev_per_a": weakest[2], "weakest_pair": weakest[:2],
            "ch_at_0.3_above_minimum_ev": ch_rise}


def nve_drift(checkpoint: Path, folder: Path) -> dict:
    from transip.openmm_plugin.md import run

    artifact = folder / (checkpoint.stem + ".pt")
    export_checkpoint(checkpoint, artifact)
    aspirin = read_structures(ROOT / "examples" / "molecules" / "aspirin.xyz", require_labels=False, index="0")[0]
    with open("/dev/null", "w") as quiet:
        summary = run(artifact, aspirin, 2000, timestep_fs=0.5, temperature=300.0, platform="CPU", report_every=200,
                      stream=quiet)
    return {"drift_mev_per_atom": 1000 * summary["energy_drift_per_atom_ev"],
            "std_mev_per_atom": 1000 * summary["energy_std_per_atom_ev"]}


def main(argv=None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranges", type=float, nargs="+", default=[1.0, 1.25, 1.5])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "repulsion_range"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for switch_range in tqdm(args.ranges, desc="repulsion ranges"):
            checkpoint = with_repulsion(Path(tmp), switch_range)
            model = model_from_checkpoint(checkpoint).set_kernel("reference")
            rows.append({"repulsion_range": switch_range,
                         "at_equilibrium": {name: term_at(zi, zj, r, switch_range) for name, zi, zj, r in BONDS},
                         "scan": pair_scan(model), "aspirin_nve": nve_drift(checkpoint, Path(tmp))})
    lines = ["# ZBL repulsion: switch-off range", "",
             "Shipped weights (trained without repulsion) plus the repulsion at each range. `python "
             "benchmarks/repulsion_range.py`.", "",
             "| range | " + " | ".join(f"{name} at {r} A: E (eV) / stiffness (eV/A^2)" for name, _, _, r in BONDS)
             + " | weakest force below 0.6 A (eV/A) | C-H 0.3 A above minimum (eV) | aspirin NVE drift "
             "(meV/atom, 1 ps, 0.5 fs) |",
             "| --- " * (len(BONDS) + 4) + "|"]
    for row in rows:
        eq = row["at_equilibrium"]
        lines.append(f"| {row['repulsion_range']} | "
                     + " | ".join(f"{eq[name]['energy_ev']:.3f} / {eq[name]['stiffness_ev_per_a2']:.1f}"
                                  for name, *_ in BONDS)
                     + f" | {row['scan']['weakest_force_below_0.6_ev_per_a']:.2f} "
                       f"({'-'.join(map(str, row['scan']['weakest_pair']))}) | "
                       f"{row['scan']['ch_at_0.3_above_minimum_ev']:.1f} | "
                       f"{row['aspirin_nve']['drift_mev_per_atom']:+.3f} |")
    write_results(Path(args.out), {"rows": rows, "machine": machine(), "command": " ".join(sys.argv)}, lines)


if __name__ == "__main__":
    main()

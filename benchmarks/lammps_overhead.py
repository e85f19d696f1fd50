"""LAMMPS steps per second with pair_style transip against the bare artifact call, in the same run.

    python benchmarks/lammps_overhead.py          # writes benchmarks/results/lammps_overhead.{json,md}
    python benchmarks/lammps_overhead.py --smoke

Runs the example decks of lammps/examples (aspirin NVE in a non-periodic box; the periodic 384-atom methanol box
NVT) with the shipped model (float64, fused) on 1 and 2 MPI ranks, 1 OpenMP thread per rank, and compares
LAMMPS's loop time per step with the artifact methods the pair style calls, on the same atoms and pairs, in this
process on 1 thread: `edge_energy_gradients` with periodic images folded onto their owners (what one rank calls),
or the halo methods block by block with the images as ghosts (what the ranks call between them, here as one
domain), each with `energy_offset`. That is the model's work for one step, with nothing of the engine around it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MODEL, ROOT, median_seconds, write_results

EXAMPLES = ROOT / "lammps" / "examples"
BIN = Path(sys.executable).parent
TIMESTEP_FS = 0.5  # both decks
# (label, deck, data file, periodic, steps per run: full, smoke)
SYSTEMS = [
    ("aspirin (21 atoms, non-periodic, NVE)", "in.aspirin_nve", "aspirin.data", False, 2000, 50),
    ("methanol box (384 atoms, periodic, NVT)", "in.methanol_nvt", "methanol_box.data", True, 200, 10),
]


def bare_call_seconds(data: Path, periodic: bool, ranks: int, module, num_layers: int, smoke: bool) -> float:
    """Median time of the artifact calls pair_style transip makes for one step on `ranks` ranks (module
    docstring), on the data file's atoms and their pairs within the cutoff."""
    import ase.io
    import torch

    from transip.export.halo import halo_energy_gradients
    from transip.neighbors import structure_neighbors

    atoms = ase.io.read(data, format="lammps-data", atom_style="atomic")
    positions, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    edge_index, shifts = structure_neighbors(positions, 6.0, cell if periodic else None,
                                             torch.tensor([periodic] * 3) if periodic else None)
    receivers, senders = edge_index
    vectors = positions[senders] - positions[receivers] + shifts.double() @ cell
    numbers = torch.tensor(atoms.numbers)
    if ranks == 1:
        def step():
            module.edge_energy_gradients(vectors, numbers, receivers, senders, 0, 1)
    else:
        senders, owner = images_as_ghosts(senders, shifts, len(atoms))

        def step():
            halo_energy_gradients(module, vectors, numbers[owner], receivers, senders, owner, num_layers, 0, 1)

    def evaluate(n):
        for _ in range(n):
            step()
            module.energy_offset(0, 1)

    calls = 2 if smoke else max(1, 4000 // len(atoms))  # about 0.2 s per timed block
    return median_seconds(evaluate, 2, 3 if smoke else 7, calls)


def images_as_ghosts(senders, shifts, num_atoms: int):
    """Senders that are periodic images (a non-zero shift) as ghost rows after the atoms, one per distinct image,
    as several ranks see them. Returns the new senders and the owner (N + ghosts,) of every row."""
    import torch

    image = shifts.abs().sum(1) > 0
    # one ghost per distinct (owner, shift)
    distinct, ghost_of_edge = torch.unique(torch.cat([senders[image, None], shifts[image].long()], 1), dim=0,
                                           return_inverse=True)
    senders = senders.clone()
    senders[image] = num_atoms + ghost_of_edge
    return senders, torch.cat([torch.arange(num_atoms), distinct[:, 0]])


def lammps_seconds_per_step(folder: Path, deck: str, ranks: int, steps: int) -> float:
    text = (EXAMPLES / deck).read_text()
    text = re.sub(r"^run\s+\d+", f"run {steps}", text, flags=re.M)
    text = re.sub(r"^thermo\s+\d+", f"thermo {steps}", text, flags=re.M)
    (folder / "in.bench").write_text(text)
    command = ([str(BIN / "mpirun"), "-np", str(ranks)] if ranks > 1 else []) + [str(BIN / "lmp"), "-in", "in.bench"]
    out = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=1800,
                         env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(folder), "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
    return float(re.search(r"Loop time of ([0-9.eE+-]+) on", out.stdout).group(1)) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lammps_overhead")
    args = parser.parse_args(argv)

    import shutil

    import torch
    from tqdm import tqdm

    import transip
    from transip.export import export_checkpoint, load

    torch.set_num_threads(1)
    transip.native.keep_freed_memory()  # as the pair style does
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_checkpoint(MODEL, tmp / "model.pt")
        module, metadata = load(tmp / "model.pt")
        runs = [(system, ranks) for system in SYSTEMS for ranks in (1, 2)]
        bare = {}
        for (label, deck, data, periodic, full, smoke), ranks in tqdm(runs, desc="LAMMPS runs", unit="run"):
            shutil.copy(EXAMPLES / data, tmp / data)
            if (data, ranks) not in bare:
                bare[data, ranks] = bare_call_seconds(tmp / data, periodic, ranks, module, metadata["num_layers"],
                                                      args.smoke)
            steps = smoke if args.smoke else full
            step = lammps_seconds_per_step(tmp, deck, ranks, steps)
            atoms = int(re.search(r"(\d+) atoms", label).group(1))
            rows.append(dict(system=label, atoms=atoms, ranks=ranks, steps=steps, artifact_ms=1e3 * bare[data, ranks],
                             lammps_step_ms=1e3 * step, steps_per_second=1.0 / step,
                             atom_steps_per_second=atoms / step, ns_per_day=TIMESTEP_FS * 1e-6 / step * 86400,
                             overhead=step / bare[data, ranks] - 1.0))
    lines = [f"Shipped model (float64, fused), example decks of lammps/examples, {TIMESTEP_FS} fs, 1 OpenMP thread "
             "per rank; artifact call = what the pair style calls, on the same atoms and periodic pairs, 1 thread: "
             "edge_energy_gradients (1 rank) or the halo methods block by block, all ghosts in one domain (2 ranks), "
             "each with energy_offset.", "",
             "| system | ranks | steps | artifact call (ms) | LAMMPS step (ms) | steps/s | atom-steps/s | ns/day | "
             "overhead |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['ranks']} | {r['steps']} | {r['artifact_ms']:.2f} | "
                     f"{r['lammps_step_ms']:.2f} | {r['steps_per_second']:.1f} | {r['atom_steps_per_second']:.0f} | "
                     f"{r['ns_per_day']:.2f} | {100 * r['overhead']:+.0f} % |")
    write_results(args.out, {"rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LAMMPS steps per second with pair_style transip against the bare artifact call, in the same run.

    python benchmarks/lammps_overhead.py          # writes benchmarks/results/lammps_overhead.{json,md}
    python benchmarks/lammps_overhead.py --smoke

Aspirin (21 atoms) in a non-periodic box, shipped model (float64, fused), NVE at 0.5 fs on 1 and 2 MPI ranks
(1 OpenMP thread per rank). LAMMPS's own loop time per step is compared with `compute_with_neighbors` of the
artifact on the same atoms and pairs in this process (also 1 thread), which is the work of one step.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from timing import median_seconds, write_results  # noqa: E402

MODEL = ROOT / "models" / "transip-xtb-small" / "best.ckpt"
BIN = Path(sys.executable).parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lammps_overhead")
    args = parser.parse_args(argv)

    import torch

    from test_lammps import molecule_in_box, write_data
    from transip.export import export_checkpoint, load
    from transip.neighbors import structure_neighbors

    torch.set_num_threads(1)
    steps = 50 if args.smoke else 2000
    s = molecule_in_box()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_checkpoint(MODEL, tmp / "model.pt")
        write_data(s, tmp / "system.data")
        (tmp / "in.bench").write_text(f"""units metal
atom_style atomic
boundary f f f
read_data system.data
pair_style transip model.pt
pair_coeff * * H C O
velocity all create 300 4928459 loop geom
fix nve all nve
timestep 0.0005
thermo {steps}
run {steps}
""")
        module, _ = load(tmp / "model.pt")
        positions = torch.tensor(s.positions)
        edge_index, _ = structure_neighbors(positions, 6.0)
        inputs = (positions, torch.tensor(s.numbers), edge_index, torch.zeros(edge_index.shape[1], 3), len(s.numbers),
                  0, 1, True, False)

        def evaluate(n):
            for _ in range(n):
                module.compute_with_neighbors(*inputs)

        bare = median_seconds(evaluate, 1, 3 if args.smoke else 7, 20 if args.smoke else 200)
        for ranks in (1, 2):
            command = ([str(BIN / "mpirun"), "-np", str(ranks)] if ranks > 1 else []) + [str(BIN / "lmp"), "-in",
                                                                                         "in.bench"]
            out = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=900,
                                 env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp), "OMP_NUM_THREADS": "1"})
            if out.returncode != 0:
                raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
            loop = float(re.search(r"Loop time of ([0-9.eE+-]+) on", out.stdout).group(1))
            step = loop / steps
            rows.append(dict(system="aspirin (21 atoms, non-periodic)", ranks=ranks, artifact_ms=1e3 * bare,
                             lammps_step_ms=1e3 * step, steps_per_second=1.0 / step,
                             atom_steps_per_second=len(s.numbers) / step, ns_per_day=0.5e-6 / step * 86400,
                             overhead=step / bare - 1.0))
    lines = [f"Shipped model (float64, fused), LAMMPS NVE 0.5 fs, {steps} steps, 1 thread per rank.", "",
             "| system | ranks | artifact call (ms) | LAMMPS step (ms) | steps/s | atom-steps/s | ns/day | overhead |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['ranks']} | {r['artifact_ms']:.2f} | {r['lammps_step_ms']:.2f} | "
                     f"{r['steps_per_second']:.0f} | {r['atom_steps_per_second']:.0f} | {r['ns_per_day']:.1f} | "
                     f"{100 * r['overhead']:+.0f} % |")
    write_results(args.out, {"steps": steps, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`transip md --engine openmm`, plugged into the model's command line (transip/cli.py) through the
`transip.md_engines` entry point: the model stage does not import the engines. Kept import-light (openmm and
torch load only when it runs), because every `transip` command builds its parser from the plugins."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def add_arguments(md) -> None:
    md.add_argument("--platform", default="CPU", help="OpenMM platform (Reference, CPU, ...)")
    md.add_argument("--thermostat", action="store_true", help="OpenMM: Langevin at --temperature instead of NVE")
    md.add_argument("--report-every", type=int, default=50, help="OpenMM: steps between reports")
    md.add_argument("--minimize", type=float, nargs="?", const=0.05, metavar="FMAX",
                    help="OpenMM: relax the structure first with OpenMM's minimiser, until the RMS of the force "
                         "components is FMAX eV/A (default 0.05); a packed box needs this before dynamics")


def run(args, structure) -> int:
    from transip.domain import check_trained_domain
    from transip.md_summary import describe_check
    from transip.export import export_checkpoint, read_metadata

    from .md import run as run_md

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.checkpoint
        if str(artifact).endswith(".ckpt"):  # export on the fly
            artifact = str(Path(tmp) / "model.pt")
            export_checkpoint(args.checkpoint, artifact)
        trajectory = args.trajectory if args.trajectory != "md.extxyz" else "md.dcd"
        # checked here too, so that the message names this command's override
        check_trained_domain(read_metadata(artifact).get("trained_domain"), structure.numbers, structure.charge,
                             structure.spin, args.allow_untrained, "cli")
        summary = run_md(artifact, structure, args.steps, args.timestep_fs, args.temperature, args.platform,
                         args.thermostat, trajectory, args.report_every, args.seed,
                         allow_untrained=args.allow_untrained, minimize_fmax=args.minimize)
    print(f"OpenMM ({args.platform}): {summary['atoms']} atoms, {summary['steps_per_second']:.1f} steps/s, "
          f"{summary['ns_per_day']:.3f} ns/day; total-energy change {1000 * summary['energy_drift_per_atom_ev']:.4f} "
          f"meV/atom, std {1000 * summary['energy_std_per_atom_ev']:.4f} meV/atom"
          f"{' (Langevin thermostat: not conserved)' if args.thermostat else ''}; trajectory {trajectory}")
    print(describe_check(summary))
    print(json.dumps(summary))
    return 0

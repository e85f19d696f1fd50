"""`transip` command line: data generation, training, evaluation, equivariance checks, a short MD demo,
export of TorchScript artifacts and their inspection."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


# Later stages plug into this command line through entry points (pyproject.toml), so that data flows one way,
# model -> export -> engines: `transip export`/`inspect` come from transip.export, `md --engine openmm` from
# transip.openmm_plugin, and this module imports neither.
COMMANDS = "transip.commands"  # register(subparsers): adds commands, each with set_defaults(handler=...)
MD_ENGINES = "transip.md_engines"  # an object with add_arguments(md_parser) and run(args, structure) -> exit code


def _plugins(group: str) -> dict:
    from importlib.metadata import entry_points

    return {point.name: point.load() for point in sorted(entry_points(group=group), key=lambda p: p.name)}


UNTRAINED_HELP = ("run an element, total charge or spin multiplicity the model was not trained on (refused "
                  "otherwise); a warning is printed")


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="reference data").add_subparsers(dest="data_command", required=True)
    gen = data.add_parser("generate", help="GFN2-xTB reference data: MD of a SMILES list (recipe md) or the "
                          "drug-like / charged / cluster / wall / periodic dataset (recipe chemistry)")
    gen.add_argument("-o", "--output", required=True,
                     help="recipe md: output file (.extxyz, .extxyz.xz, ...); recipes chemistry, condensed: output folder "
                          "(shards, manifest.json, README.md data card; rerun to resume)")
    gen.add_argument("--recipe", choices=("md", "chemistry", "condensed"), default="md",
                     help="condensed: periodic training boxes only (liquids, mixtures, a molecule in water), to "
                          "train on beside a chemistry dataset (transip train --extra-data)")
    gen.add_argument("--train-boxes", type=int, default=40, help="recipe condensed: number of boxes")
    gen.add_argument("--scale", type=float, default=1.0,
                     help="recipe chemistry: multiply every count of the default recipe (about 2 h on 2 cores)")
    gen.add_argument("--shard-size", type=int, help="recipes chemistry, condensed: tasks per shard (default 25)")
    gen.add_argument("--max-hours", type=float, help="recipes chemistry, condensed: stop after the shard that crosses this")
    gen.add_argument("--no-progress", action="store_true")
    gen.add_argument("--smiles", help="file with lines 'name SMILES' (default: the built-in list)")
    gen.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 600.0, 900.0])
    gen.add_argument("--frames-per-task", type=int, default=120, help="frames per molecule and temperature")
    gen.add_argument("--stride", type=int, default=10, help="MD steps between frames")
    gen.add_argument("--equilibration-steps", type=int, default=200)
    gen.add_argument("--timestep-fs", type=float, default=0.5)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--workers", type=int, default=2)
    info = data.add_parser("info", help="counts and splits of a dataset")
    info.add_argument("path")
    info.add_argument("--split-seed", type=int, default=0)


def _add_train(sub) -> None:
    from .train import OBJECTIVES, TrainConfig

    train = sub.add_parser("train", help="train a TransIP model")
    train.add_argument("--config", help="JSON file with TrainConfig fields; command-line options override it")
    train.add_argument("--data")
    train.add_argument("--output", "-o")
    train.add_argument("--objective", choices=OBJECTIVES)
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.ckpt if it exists")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("data", "output", "objective", "model", "progress"):
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(field.type).replace("Optional[", "").rstrip("]"))
        many = str(field.type).startswith(("List", "typing.List"))  # e.g. --extra-data A B
        train.add_argument("--" + field.name.replace("_", "-"), type=kind or str, dest=field.name,
                           nargs="+" if many else None)
    train.add_argument("--model", help="JSON object of ModelConfig fields, e.g. '{\"d_model\": 64}'")
    train.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_train(sub)
    ev = sub.add_parser("evaluate", help="held-out accuracy and equivariance error of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    ev.add_argument("--splits", nargs="+", default=["test_frames", "test_molecules"])
    ev.add_argument("--rotations", type=int, default=8)
    ev.add_argument("--equivariance-structures", type=int, default=128,
                    help="structures (spread over the split) used for the equivariance error")
    ev.add_argument("--json", help="also write the metrics to this file")
    eq = sub.add_parser("check-equivariance", help="energy-invariance and force-equivariance errors")
    eq.add_argument("checkpoint")
    eq.add_argument("structure", help="structure file (xyz, extxyz, pdb, ... anything ase reads)")
    eq.add_argument("--rotations", type=int, default=32)
    eq.add_argument("--seed", type=int, default=0)
    eq.add_argument("--charge", type=int, help="total charge (default: from the file, else 0)")
    eq.add_argument("--spin", type=int, help="spin multiplicity (default: from the file, else 1)")
    eq.add_argument("--allow-untrained", action="store_true", help=UNTRAINED_HELP)
    engines = _plugins(MD_ENGINES)
    md = sub.add_parser("md", help="short MD of a structure: ASE (checkpoint)"
                        + "".join(f" or {name}" for name in engines))
    md.add_argument("checkpoint", help="checkpoint (.ckpt); other engines may also take an exported artifact (.pt)")
    md.add_argument("--engine", choices=("ase", *engines), default="ase")
    md.add_argument("structure")
    md.add_argument("--steps", type=int, default=200)
    md.add_argument("--timestep-fs", type=float, default=0.5)
    md.add_argument("--temperature", type=float, default=300.0, help="initial temperature (K)")
    md.add_argument("--charge", type=int)
    md.add_argument("--spin", type=int)
    md.add_argument("--trajectory", default="md.extxyz", help="output trajectory (extended XYZ)")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--allow-untrained", action="store_true", help=UNTRAINED_HELP)
    for engine in engines.values():
        engine.add_arguments(md)
    md.set_defaults(handler=cmd_md, engines=engines)
    for register in _plugins(COMMANDS).values():
        register(sub)
    return parser


def cmd_data(args) -> int:
    from . import datagen

    if args.data_command == "generate" and args.recipe in ("chemistry", "condensed"):
        return _generate_chemistry(args)
    if args.data_command == "generate":
        molecules = datagen.MOLECULES
        if args.smiles:
            molecules = datagen.read_smiles_file(args.smiles)
        summary = datagen.generate(Path(args.output), molecules, tuple(args.temperatures), args.frames_per_task,
                                   args.stride, args.equilibration_steps, args.timestep_fs, args.seed,
                                   args.workers)
        print(json.dumps(summary, indent=1))
        return 1 if summary["failures"] else 0
    from .data import read_structures, split_indices

    structures = read_structures(args.path)
    splits = split_indices(structures, args.split_seed)
    atoms = [len(s.numbers) for s in structures]
    report = {"structures": len(structures), "molecules": len({s.molecule_key for s in structures}),
              "atoms_min": min(atoms), "atoms_max": max(atoms), "atoms_mean": round(sum(atoms) / len(atoms), 2),
              "splits": {k: len(v) for k, v in splits.items() if k != "held_out_molecules"},
              "charges": _count(s.charge for s in structures), "spins": _count(s.spin for s in structures),
              "elements": sorted({int(z) for s in structures for z in s.numbers})}
    if any(s.kind for s in structures):
        report["kinds"] = _count(s.kind for s in structures)
        report["splits_by_kind"] = {k: _count(structures[i].kind for i in v) for k, v in splits.items()
                                    if k != "held_out_molecules"}
    else:
        report["held_out_molecules"] = splits["held_out_molecules"]
    from ase.data import chemical_symbols

    report["elements"] = [chemical_symbols[z] for z in report["elements"]]
    print(json.dumps(report, indent=1))
    return 0


def _count(values) -> dict:
    from collections import Counter

    return {str(k): v for k, v in sorted(Counter(values).items())}


def _generate_chemistry(args) -> int:
    from . import refdata

    overrides = {"seed": args.seed} | ({"shard_size": args.shard_size} if args.shard_size else {})
    if args.recipe == "condensed":
        if args.train_boxes < 1:
            raise SystemExit(f"transip data generate: --train-boxes must be at least 1, got {args.train_boxes}")
        recipe = refdata.Recipe.condensed(args.train_boxes, **overrides)
    elif args.scale != 1.0:
        recipe = refdata.Recipe.scaled(args.scale, **overrides)
    else:
        recipe = refdata.Recipe(**overrides)
    command = " ".join(["transip", *sys.argv[1:]])
    summary = refdata.generate(Path(args.output), recipe, args.workers, command=command,
                               progress=not args.no_progress,
                               max_seconds=None if args.max_hours is None else 3600 * args.max_hours)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    values = json.loads(Path(args.config).read_text()) if args.config else {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None and field.name not in ("model", "progress"):
            values[field.name] = value
    if args.model:
        values["model"] = {**values.get("model", {}), **json.loads(args.model)}
    if args.no_progress:
        values["progress"] = False
    missing = [k for k in ("data", "output") if k not in values]
    if missing:
        raise SystemExit(f"transip train: missing --{' and --'.join(missing)} (or give them in --config)")
    train(TrainConfig(**values), resume=args.resume)
    return 0


def cmd_evaluate(args) -> int:
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .data import read_structures
    from .metrics import accuracy, equivariance_error, spread_subset

    payload = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(payload)
    data = args.data or payload["provenance"]["dataset"]
    structures = read_structures(data)
    splits = payload.get("splits")
    results = {}
    for name in args.splits:
        if args.data and name != "all":
            raise SystemExit("transip evaluate: with --data use --splits all (the saved splits index the "
                             "training dataset)")
        chosen = structures if name == "all" else [structures[i] for i in splits[name]]
        if not chosen:
            raise SystemExit(f"transip evaluate: split {name!r} is empty")
        metrics = accuracy(model, chosen)
        metrics.update({f"equivariance_{k}": v for k, v in
                        equivariance_error(model, spread_subset(chosen, args.equivariance_structures),
                                           args.rotations).items()})
        metrics["structures"] = len(chosen)
        results[name] = metrics
        print(f"{name:15s} n={len(chosen):5d} E MAE {1000 * metrics['energy_mae_per_atom']:.2f} meV/atom "
              f"({1000 * metrics['energy_mae']:.1f} meV)  F MAE {1000 * metrics['force_mae']:.1f} meV/A  "
              f"cos {metrics['force_cosine']:.4f}  equivariance: E "
              f"{1000 * metrics['equivariance_energy_abs_per_atom']:.3f} meV/atom, F "
              f"{metrics['equivariance_force_relative']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _structure_with_overrides(path, charge, spin):
    from .data import read_structures

    structures = read_structures(path, require_labels=False, index="0")
    s = structures[0]
    if charge is not None:
        s.charge = charge
    if spin is not None:
        s.spin = spin
    return s


def cmd_check_equivariance(args) -> int:
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .domain import check_trained_domain, domain_for
    from .metrics import equivariance_error

    payload = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(payload)
    s = _structure_with_overrides(args.structure, args.charge, args.spin)
    check_trained_domain(domain_for(payload, model.config), s.numbers, s.charge, s.spin, args.allow_untrained,
                         "cli")
    result = equivariance_error(model, [s], args.rotations, args.seed)
    print(f"{args.structure}: {len(s.numbers)} atoms, {args.rotations} random rotations")
    print(f"  energy invariance error |E(Rx) - E(x)|: mean {1000 * result['energy_abs']:.4f} meV, "
          f"max {1000 * result['energy_abs_max']:.4f} meV ({1000 * result['energy_abs_per_atom']:.4f} meV/atom)")
    print(f"  force equivariance error |F(Rx) - R F(x)| / |F(x)|: mean {result['force_relative']:.5f}, "
          f"max {result['force_relative_max']:.5f}")
    print(json.dumps(result))
    return 0


def cmd_md(args) -> int:
    s = _structure_with_overrides(args.structure, args.charge, args.spin)
    if args.engine != "ase":
        return args.engines[args.engine].run(args, s)
    from .calculator import run_md

    run_md(args.checkpoint, s, args.steps, args.timestep_fs, args.temperature, args.trajectory, args.seed,
           allow_untrained=args.allow_untrained)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"data": cmd_data, "train": cmd_train, "evaluate": cmd_evaluate,
                "check-equivariance": cmd_check_equivariance}
    try:
        return (args.handler if "handler" in args else handlers[args.command])(args)
    except (FileNotFoundError, ValueError) as exc:  # user mistakes (the export stage's ArtifactError included)
        print(f"transip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`transip export` and `transip inspect`, plugged into the model's command line (transip/cli.py) through the
`transip.commands` entry point: the model stage does not import the export stage."""

from __future__ import annotations

import json


def register(sub) -> None:
    ex = sub.add_parser("export", help="checkpoint -> one TorchScript artifact (with metadata) for every engine")
    ex.add_argument("checkpoint")
    ex.add_argument("-o", "--output", required=True, help="artifact file, e.g. model.pt")
    ex.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ex.add_argument("--kernel", choices=("fused", "reference"), default="fused",
                    help="fused: native ops (fast, needs libtransip_ops); reference: plain TorchScript, no ops")
    ex.set_defaults(handler=cmd_export)
    ins = sub.add_parser("inspect", help="print the metadata of an exported artifact")
    ins.add_argument("artifact")
    ins.add_argument("--json", action="store_true", help="the whole metadata as JSON")
    ins.set_defaults(handler=cmd_inspect)


def cmd_export(args) -> int:
    from .artifact import describe, export_checkpoint

    metadata = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, kernel=args.kernel)
    print(f"wrote {args.output}\n{describe(metadata)}")
    return 0


def cmd_inspect(args) -> int:
    from .artifact import describe
    from .load import read_metadata

    metadata = read_metadata(args.artifact)
    print(json.dumps(metadata, indent=1) if args.json else describe(metadata))
    return 0

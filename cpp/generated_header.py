"""The part every header generator shares (generate_element_symbols.py, generate_contract.py): read a Python
module without importing its package (runpy: the build needs no torch), and write a header that says where it
came from, always (so that it is newer than its source and the build does not rerun the generator)."""

import runpy
import sys
from pathlib import Path


def module_values(source: str) -> dict:
    return runpy.run_path(source)


def write_header(source: str, target: str, generator: str, what: str, body: str) -> None:
    text = (f"// Generated at build time from {Path(source).name} by {Path(generator).name}: do not edit.\n"
            f"// {what}\n#pragma once\n\n{body}")
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def run(main, generator: str, example: str) -> None:
    """Command line of a generator: `python GENERATOR SOURCE.py OUT.h`."""
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python {Path(generator).name} {example}")
    main(sys.argv[1], sys.argv[2])

"""Writes the C++ element table from transip/elements.py, the project's one element table (run by CMake at build
time; see cpp/CMakeLists.txt). Usage: python generate_element_symbols.py transip/elements.py out/element_symbols.h

The module is executed on its own (runpy), not imported as part of the package, so the build needs no torch here."""

import runpy
import sys
from pathlib import Path


def main(source: str, target: str) -> None:
    symbols = runpy.run_path(source)["ELEMENT_SYMBOLS"]
    if symbols[0] != "X" or len(set(symbols)) != len(symbols) or not all(s.isalpha() for s in symbols):
        raise SystemExit(f"{source}: ELEMENT_SYMBOLS must start with the placeholder X and hold distinct symbols")
    rows = [", ".join(f'"{s}"' for s in symbols[i:i + 16]) for i in range(0, len(symbols), 16)]
    text = (f"// Generated at build time from {Path(source).name} by {Path(__file__).name}: do not edit. The element\n"
            "// table of every language in TransIP (index = atomic number, 0 the placeholder X).\n"
            "#pragma once\n\nnamespace transip {\n\ninline const char* const kElementSymbols[] = {\n    "
            + ",\n    ".join(rows) + "};\n"
            "inline constexpr int kNumElementSymbols = sizeof(kElementSymbols) / sizeof(kElementSymbols[0]);\n\n"
            "}  // namespace transip\n")
    # Always written, so that the header is newer than elements.py and the build does not rerun this every time.
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python generate_element_symbols.py transip/elements.py out/element_symbols.h")
    main(sys.argv[1], sys.argv[2])

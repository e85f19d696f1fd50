"""Writes the C++ element table from transip/elements.py, the project's one element table (run by CMake at build
time; see cpp/CMakeLists.txt). Usage: python generate_element_symbols.py transip/elements.py out/element_symbols.h

The module is executed on its own (runpy), not imported as part of the package, so the build needs no torch here."""

from generated_header import module_values, run, write_header


def main(source: str, target: str) -> None:
    symbols = module_values(source)["ELEMENT_SYMBOLS"]
    if symbols[0] != "X" or len(set(symbols)) != len(symbols) or not all(s.isalpha() for s in symbols):
        raise SystemExit(f"{source}: ELEMENT_SYMBOLS must start with the placeholder X and hold distinct symbols")
    rows = [", ".join(f'"{s}"' for s in symbols[i:i + 16]) for i in range(0, len(symbols), 16)]
    write_header(source, target, __file__, "The element table of every language in TransIP (index = atomic "
                 "number, 0 the placeholder X).", "namespace transip {\n\ninline const char* const "
                 "kElementSymbols[] = {\n    " + ",\n    ".join(rows) + "};\n"
                 "inline constexpr int kNumElementSymbols = sizeof(kElementSymbols) / sizeof(kElementSymbols[0]);"
                 "\n\n}  // namespace transip\n")


if __name__ == "__main__":
    run(main, __file__, "transip/elements.py out/element_symbols.h")

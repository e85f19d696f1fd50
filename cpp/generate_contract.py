"""Writes the C++ header of the artifact contract from export/contract.py, the one place the format version,
metadata names and unit factors are written (run by CMake at build time; see cpp/CMakeLists.txt). Usage:
python generate_contract.py export/contract.py out/contract.h

The module is executed on its own (runpy), not imported as part of the package, so the build needs no torch here.
Its upper-case str, int and float constants become `transip::contract::kCamelCase` constants."""

from generated_header import module_values, run, write_header


def cpp_name(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def cpp_constant(name: str, value) -> str:
    if isinstance(value, bool):  # a bool is an int to Python; no contract fact is one, so refuse rather than guess
        raise SystemExit(f"contract constant {name} is a bool; use an int or a string")
    if isinstance(value, int):
        return f"inline constexpr int {cpp_name(name)} = {value};"
    if isinstance(value, float):
        return f"inline constexpr double {cpp_name(name)} = {value!r};"  # repr round-trips: the same double
    if '"' in value or "\\" in value:
        raise SystemExit(f"contract constant {name} = {value!r}: quotes and backslashes are not written to C++")
    return f'inline constexpr const char* {cpp_name(name)} = "{value}";'


def main(source: str, target: str) -> None:
    constants = [(name, value) for name, value in module_values(source).items()
                 if name.isupper() and isinstance(value, (str, int, float))]
    if not any(name == "FORMAT_VERSION" for name, _ in constants):
        raise SystemExit(f"{source}: no FORMAT_VERSION; is this the artifact contract?")
    write_header(source, target, __file__, "The facts about an artifact that Python (transip.export.contract) and "
                 "C++ share.", "namespace transip::contract {\n\n"
                 + "\n".join(cpp_constant(name, value) for name, value in constants) + "\n\n"
                 "}  // namespace transip::contract\n")


if __name__ == "__main__":
    run(main, __file__, "export/contract.py out/contract.h")

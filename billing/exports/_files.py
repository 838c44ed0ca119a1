"""All-or-nothing output files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def _new_file_mode(path: Path) -> int:
    """The mode the file would get if opened plainly: its current one, else 0o666 minus the umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it; this runs in a command, not a server
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(path: Path, chunks: Iterable[str]) -> int:
    """Write `chunks` (UTF-8) to `path` all or nothing; return the number of characters written.

    The text goes to a temporary file in the same directory (same file system, so the rename is
    atomic), which is flushed to disk and renamed over `path` at the end. On any error, including
    an interrupt, the temporary file is removed and `path` is left as it was.
    """
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    written = 0
    try:
        with open(descriptor, "w", encoding="utf-8", newline="") as file:
            for chunk in chunks:
                written += file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _new_file_mode(path))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return written

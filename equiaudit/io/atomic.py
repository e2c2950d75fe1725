"""Atomic file writes: readers see the old file or the new one, never half of either.

Every file equiaudit writes (CSV, JSON, PNG, HTML, checkpoints, data) goes through
:func:`atomic_write`: the bytes go to a temporary file in the target's own folder (so the
final ``os.replace`` is a rename on one filesystem), are flushed to disk, and then replace
the target. A kill at any instant leaves the target as it was.

``tempfile.mkstemp`` creates files mode 0600 whatever the umask; the finished file is given
the mode an ordinary ``open(path, "w")`` would have (``0666 & ~umask``), or the mode of the
file it replaces, so results stay readable by the user's group as their other files are.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "default_file_mode"]


def default_file_mode() -> int:
    """``0o666`` less the process umask (read without changing it for other threads)."""
    try:  # Linux exposes the umask without the set-and-restore race of os.umask().
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temporary binary file, then move it onto ``path``.

    Creates the parent folder. The temporary file is removed if ``write`` (or the move) fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = default_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text, newlines as given (no translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"))

"""The one place equiaudit unpickles: ``torch.load(..., weights_only=True)``, nothing else.

Checkpoints and data files alike are untrusted input. ``weights_only=True`` restricts the
unpickler to torch's allowlist of data-carrying globals (tensors, storages, plain
containers); a pickle that names anything else (a class, ``os.system``, ``exec``) is
refused before any of it runs. This module turns torch's many failure modes into three:

* :class:`RefusedPickle` — the file needs a global outside the allowlist (named);
* ``OSError`` (incl. ``FileNotFoundError``) — the file cannot be opened;
* :class:`DamagedFile` — anything else: truncated, corrupt or not a torch file, with the
  informative line of torch's message (:func:`damaged_reason`).

Callers map them to their own :class:`~equiaudit.errors.EquiauditError` subclasses.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["RefusedPickle", "DamagedFile", "load_weights_only", "damaged_reason", "readable_global"]

# torch names the refused global as "GLOBAL numpy.core.multiarray._reconstruct was not an
# allowed global ..." or "Unsupported global: GLOBAL os.system ... whose module ...".
_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")


class RefusedPickle(Exception):
    """The pickle needs ``global_name``, which is not a data-carrying global: nothing ran."""

    def __init__(self, global_name: str):
        super().__init__(global_name)
        self.global_name = global_name


class DamagedFile(Exception):
    """Truncated, corrupt or not a ``torch.save`` file; ``reason`` is one short line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def readable_global(name: str) -> str:
    """``os.system`` pickles as ``posix.system`` (``nt.system`` on Windows): show what users wrote."""
    module, _, attr = name.rpartition(".")
    return f"os.{attr}" if module in ("posix", "nt") else name


def damaged_reason(exc: BaseException) -> str:
    """The informative line of a torch/safetensors error, without torch's paragraphs of advice."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # torch wraps weights-only failures as: advice ... <actual reason> / "Check the documentation ..."
    lines = [ln for ln in lines if not ln.startswith("Check the documentation")]
    if not lines:
        return "unexpected end of file" if isinstance(exc, EOFError) else type(exc).__name__
    reason = lines[-1] if "Weights only load failed" in lines[0] else lines[0]
    reason = re.sub(r"^Unsupported operand (\d+)$", r"not a torch.save file: unsupported pickle opcode \1", reason)
    reason = reason.split(". ")[0].rstrip(".")
    return reason if len(reason) <= 120 else reason[:117] + "..."


def load_weights_only(
    path: str | Path, map_location: Any = "cpu", *, mmap: bool = False, safe_globals: Sequence[Any] = ()
) -> Any:
    """``torch.load(path, weights_only=True)``; ``safe_globals`` extends torch's allowlist for
    this call only (data-carrying globals such as a library's plain data classes).

    Raises :class:`RefusedPickle`, ``OSError`` or :class:`DamagedFile` (see the module docstring).
    """
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(safe_globals)):
            warnings.simplefilter("ignore")  # e.g. torch's pickle-protocol warning: noise for users
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError:
        raise
    except pickle.UnpicklingError as exc:
        needed = _GLOBAL_RE.search(str(exc))
        if needed:
            raise RefusedPickle(readable_global(needed.group(1))) from None
        raise DamagedFile(damaged_reason(exc)) from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for damaged files
        raise DamagedFile(damaged_reason(exc)) from None

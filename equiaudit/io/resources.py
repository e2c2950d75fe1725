"""How much memory this process may still take, and its peak while a piece of work runs.

:mod:`equiaudit.chunking` sizes its forward passes with these numbers; it reads no file
itself, so the probes live here (they read ``/proc`` and the cgroup's limits on Linux).

* CUDA: free device memory (``torch.cuda.mem_get_info``) plus what torch's caching allocator
  holds but does not use; the peak is ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` — exact, and blind to other processes.
* CPU (Linux): available RAM is ``MemAvailable`` of ``/proc/meminfo``, lowered to the cgroup's
  ``memory.max − memory.current`` when a container limit is smaller. The peak is the resident
  set's high-water mark ``VmHWM`` of ``/proc/self/status``, reset before each measured piece by
  writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0). torch's CPU allocator keeps no
  statistics and ``tracemalloc`` does not see its allocations, so the resident set is the
  measure. Where the reset is refused, the lifetime maximum (``getrusage``) stands in: an
  upper bound of the piece's peak, so the estimate errs towards less memory, never more.
* Elsewhere (no ``/proc``): no figure (None); the chunk search then relies on halving after
  an out-of-memory error.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

__all__ = ["MemoryProbe", "memory_probe"]

_MEMINFO = Path("/proc/meminfo")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_CGROUP = Path("/sys/fs/cgroup")


def _kib_field(path: Path, name: str) -> int | None:
    """``name:   123 kB`` of a ``/proc`` file, in bytes (None when absent)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """``memory.max − memory.current`` of this process's cgroup (v2), None when unlimited or unknown."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((_CGROUP / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


class MemoryProbe:
    """Bytes: :meth:`available` to this process; :meth:`in_use` now; :meth:`start` then
    :meth:`peak`: the highest use since ``start``. Each returns None where unknown."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._resettable = None  # CPU: whether /proc/self/clear_refs accepts "5"

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated"
        if self._resettable is None:
            return "VmHWM (reset by /proc/self/clear_refs)"
        return "VmHWM (reset by /proc/self/clear_refs)" if self._resettable else "getrusage ru_maxrss (lifetime bound)"

    def available(self) -> int | None:
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return int(free + cached)
        free = _kib_field(_MEMINFO, "MemAvailable")
        room = _cgroup_room()
        if free is None or room is None:
            return free if room is None else room
        return min(free, room)

    def in_use(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return _kib_field(_STATUS, "VmRSS")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._resettable is False:
            return
        try:
            _CLEAR_REFS.write_text("5")
            self._resettable = True
        except OSError:
            self._resettable = False

    def peak(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._resettable:
            return _kib_field(_STATUS, "VmHWM")
        if not _STATUS.exists():
            return None
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def memory_probe(device: torch.device | str) -> MemoryProbe:
    """The probe for ``device`` (``cpu`` or ``cuda[:N]``)."""
    return MemoryProbe(torch.device(device))

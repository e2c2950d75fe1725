"""``--threads N``: the CPU threads torch uses, and how the banner says so.

torch picks one intra-op thread per physical core. On a machine shared with other jobs that
can be far slower than fewer threads (2 threads took 89 s where 1 took 10 s on a busy 2-core
machine), so the commands take ``--threads`` and the banner names the number in use.
"""

from __future__ import annotations

__all__ = ["set_threads", "threads_label"]

_chosen: dict[str, int | None] = {"threads": None}


def set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op CPU threads (None: leave torch's default)."""
    from equiaudit.errors import ConfigError

    _chosen["threads"] = threads
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads={threads} must be a positive number of CPU threads")
    import torch

    torch.set_num_threads(threads)


def threads_label() -> str:
    """``2 CPU threads (torch's default; --threads N to change)`` or ``1 CPU thread (--threads)``."""
    import torch

    n = torch.get_num_threads()
    noun = "thread" if n == 1 else "threads"
    why = "--threads" if _chosen["threads"] is not None else "torch's default; --threads N to change"
    return f"{n} CPU {noun} ({why})"

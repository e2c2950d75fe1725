"""``chunk_size: auto``: how many rotated samples go through the model per forward pass.

The engine runs one batch's ``B·K`` rotated inputs through the model in chunks
(:func:`run_in_chunks`). How fast that is depends on the chunk far more than on anything
else the audit does (a width-128 transformer on a CPU: 1.65× slower per sample at 32 than
at 512, 1.85× slower at 2048; a message-passing network: flat in time, 16 MB more memory per
graph), and no single default suits CPUs, GPUs, transformers and graph networks. So by
default the size is measured, on the audit's own work:

* **Search on real work.** The first chunks of the first batches *are* the trials: each one's
  outputs are used like any other's, so the search costs only the difference between the
  trial sizes and the best one, not extra forward passes (about 5 % of one 256-sample
  checkpoint for the transformer above, nothing after it). The first chunk (32 rows) is a
  warm-up (lazy initialisation, first allocations) and is not timed.
* **Candidates** are powers of two from 32, each timed twice (the minimum counts: it is the
  run least disturbed by other work, and a size's first run may pay for fresh memory or a
  recompilation). The next size (double) is tried only while doubling pays — the last size
  cut the time per sample by at least :data:`MIN_GAIN` (5 %) against the best so far —, fits
  in the largest forward call seen (a chunk never exceeds one batch's ``B·K`` rows) and fits
  the memory budget.
* **Choice**: the fastest per sample, and of the sizes within :data:`TIE` (3 %) of it the
  smallest (it takes less memory for the same speed). Chosen once per model architecture and
  kind of pass, then reused for every later batch, checkpoint, audit call or training step of
  the plan (an :class:`~equiaudit.Auditor`, a callback, ``equiaudit audit``).
* **Memory budget**: :data:`BUDGET_SHARE` (half) of the memory available when the search
  starts (free CUDA memory; on a CPU, available RAM: :mod:`equiaudit.io.resources`). Each chunk
  run during the search records how much it raised the process's memory in use (its peak
  minus the use before it); a size is tried only when twice the largest such figure per
  sample times the size fits the budget. On a CPU a doubling must also keep the chunk's extra
  memory under max(256 MiB, ¼ of the process's memory in use): batching gains saturate at
  cache-sized chunks there, while memory keeps growing with the chunk.
* **Out of memory** (``torch.OutOfMemoryError``, ``MemoryError``, a ``RuntimeError`` "out of
  memory" / "DefaultCPUAllocator: can't allocate"): the chunk is halved and retried, and no
  later chunk of that search is larger. An explicit ``chunk_size: N`` is used as given (no
  search, no halving: an out-of-memory error fails the checkpoint as before).
* **Clock**: on a CPU with one intra-op thread, the thread's CPU time (other processes on a
  shared machine then do not move the choice); otherwise wall time, with CUDA synchronised
  around each timed chunk.
* ``--dynamics`` and other differentiable passes (the graph kept for backward passes) have a
  search, a budget and a choice of their own: they keep every chunk's graph until the batch's
  backward passes, so their memory and their best size differ from a plain forward's.

The chunk changes no number: every statistic is computed on the concatenated outputs, so
whenever the model's outputs do not depend on how many samples share its forward (true of
the zoo's models on CPU, bit for bit), the audit's results are identical to the last digit.

Nothing here reads a file: memory figures come from a probe (:func:`equiaudit.io.resources.memory_probe`
by default), clocks and probes can be injected (tests).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AutoChunks", "ChunkSearch", "FixedChunks", "run_in_chunks", "is_out_of_memory", "describe",
           "SMALLEST", "MIN_GAIN", "TIE", "REPEATS", "BUDGET_SHARE", "AUTO"]

AUTO = "auto"
SMALLEST = 32  # the first candidate (and the warm-up chunk)
MIN_GAIN = 0.05  # a doubling must cut the time per sample by this much to try the next one
TIE = 0.03  # sizes this close to the fastest count as fast: the smallest of them is chosen
REPEATS = 2  # timed runs per candidate (the minimum counts)
BUDGET_SHARE = 0.5  # of the memory available when a search starts
SOFT_FLOOR = 256 * 2**20  # CPU: a chunk may always add this much memory (see AutoChunks.search)

_OOM_TEXT = ("out of memory", "can't allocate memory", "defaultcpuallocator: can't allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA or CPU) that a smaller chunk may avoid."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OOM_TEXT)


class FixedChunks:
    """``chunk_size: N``: chunks of ``N`` rows, no measuring, an out-of-memory error raised."""

    searching = False

    def __init__(self, size: int):
        self.size = int(size)

    def begin(self, total: int) -> None:
        pass

    def next_size(self, remaining: int) -> tuple[int, bool]:
        return min(self.size, remaining), False

    def record(self, size: int, seconds: float, extra_bytes: int | None, timed: bool) -> None:
        pass

    def out_of_memory(self, size: int, exc: BaseException) -> None:
        raise exc


@dataclass
class Trial:
    """One candidate size: seconds per sample of each timed run, and the most one of its
    chunks raised memory in use (bytes; None where unmeasured)."""

    size: int
    seconds: list[float] = field(default_factory=list)
    extra_bytes: int | None = None

    @property
    def best(self) -> float:
        return min(self.seconds) if self.seconds else math.inf


class ChunkSearch:
    """The search for one model architecture and kind of pass (see the module docstring).

    Driven by :func:`run_in_chunks`: :meth:`begin` at each forward call with its row count,
    :meth:`next_size` before each chunk (the size and whether to time it), :meth:`record` after
    it, :meth:`out_of_memory` when it failed to allocate. Pure: no clock, no probe of its own.
    """

    def __init__(self, *, kind: str = "forward", smallest: int = SMALLEST, min_gain: float = MIN_GAIN, tie: float = TIE,
                 repeats: int = REPEATS, budget: int | None = None, available: int | None = None,
                 clock_name: str = "", memory_method: str = "", soft_limit: int | None = None, on_decided: Callable[[ChunkSearch], None] | None = None):
        self.kind = kind
        self.smallest = max(1, int(smallest))
        self.min_gain, self.tie, self.repeats = min_gain, tie, max(1, int(repeats))
        self.budget, self.available = budget, available
        self.clock_name, self.memory_method = clock_name, memory_method
        self.on_decided = on_decided
        self.trials: dict[int, Trial] = {}
        self.candidate = self.smallest
        self.warmed = False
        self.chosen: int | None = None
        self.cap: int | None = None  # after an out-of-memory error: no chunk above this
        self.largest_call = 0
        self.bytes_per_sample = 0.0  # the largest (extra memory / rows) measured
        self.out_of_memory_at: list[int] = []
        self.stop_reason = ""
        self.rows_searched = 0
        self.soft_limit = soft_limit  # CPU: a chunk's extra memory beyond this buys no speed worth it
        self.descending = False  # after a clearly slower first doubling: halving from the smallest

    # ------------------------------------------------------------------ driving

    @property
    def searching(self) -> bool:
        return self.chosen is None

    def begin(self, total: int) -> None:
        self.largest_call = max(self.largest_call, int(total))

    def _capped(self, size: int) -> int:
        return size if self.cap is None else min(size, self.cap)

    def next_size(self, remaining: int) -> tuple[int, bool]:
        if self.chosen is not None:
            return min(self.chosen, remaining), False
        if not self.warmed:
            return self._capped(min(self.smallest, remaining)), False
        if self.candidate <= remaining:
            return self.candidate, True
        # The candidate does not fit in what is left of this call: the rest at the best size so far.
        return min(remaining, self._capped(self.best_size or self.smallest)), False

    def record(self, size: int, seconds: float, extra_bytes: int | None, timed: bool) -> None:
        if self.chosen is not None:
            return
        self.rows_searched += size
        if extra_bytes is not None and size > 0:
            self.bytes_per_sample = max(self.bytes_per_sample, max(0, extra_bytes) / size)
        if not self.warmed:
            self.warmed = True
            return
        if not timed:
            return
        trial = self.trials.setdefault(size, Trial(size))
        trial.seconds.append(seconds / size)
        if extra_bytes is not None:
            trial.extra_bytes = max(trial.extra_bytes or 0, extra_bytes)
        if len(trial.seconds) >= self.repeats:
            self._advance(size)

    def out_of_memory(self, size: int, exc: BaseException) -> None:
        """A chunk of ``size`` rows failed to allocate: no later chunk exceeds half of it.
        Raises ``exc`` when even one row did not fit."""
        if size <= 1:
            raise exc
        self.out_of_memory_at.append(size)
        self.cap = size // 2 if self.cap is None else min(self.cap, size // 2)
        if self.chosen is not None:
            self.chosen = min(self.chosen, self.cap)
            return
        for too_large in [s for s in self.trials if s > self.cap]:
            del self.trials[too_large]
        if self.candidate > self.cap:
            if any(len(t.seconds) >= self.repeats for t in self.trials.values()):
                self._finish("out of memory above")
            else:
                self.candidate = self.cap
                self.trials.pop(self.cap, None)

    # ------------------------------------------------------------------ deciding

    def _complete(self) -> dict[int, float]:
        return {s: t.best for s, t in sorted(self.trials.items()) if len(t.seconds) >= self.repeats}

    @property
    def best_size(self) -> int | None:
        done = self._complete()
        return min(done, key=done.get) if done else None

    def _advance(self, size: int) -> None:
        done = self._complete()
        others = [t for s, t in done.items() if s != size]
        if self.descending:
            if done[size] <= (1 - self.min_gain) * min(others) and size > 1:
                self.candidate = size // 2  # still paying: halve again
            else:
                self._finish("smaller no faster")
            return
        if others and done[size] > (1 - self.min_gain) * min(others):
            if size == 2 * self.smallest and done[size] > (1 + self.min_gain) * done[self.smallest] and self.smallest > 1:
                # The first doubling was clearly slower (cache-bound models): try halving instead.
                self.descending = True
                self.candidate = self.smallest // 2
                return
            self._finish("slower" if done[size] > min(others) else f"less than {self.min_gain:.0%} faster")
            return
        following = 2 * size
        if following > self.largest_call:
            self._finish("largest forward call")
        elif self.cap is not None and following > self.cap:
            self._finish("out of memory above")
        elif self.budget is not None and self.bytes_per_sample * following * 2 > self.budget:
            self._finish("memory budget")
        elif self.soft_limit is not None and self.bytes_per_sample * following > self.soft_limit:
            self._finish("memory past the point of speed")
        else:
            self.candidate = following

    def _finish(self, reason: str) -> None:
        done = self._complete()
        if not done:  # every trial fell to an out-of-memory error: the largest size that ran
            self.chosen = self._capped(self.smallest)
        else:
            fastest = min(done.values())
            self.chosen = min(s for s, t in done.items() if t <= (1 + self.tie) * fastest)
        self.stop_reason = reason
        if self.on_decided is not None:
            self.on_decided(self)

    # ------------------------------------------------------------------ telling

    def summary(self) -> str:
        """One line: the size, the candidates' times per sample, memory and the budget."""
        done = self._complete()
        if self.chosen is None:
            best = self.best_size
            return (f"chunk_size auto ({self.kind}): still measuring after {self.rows_searched} rows"
                    + (f", best so far {best}" if best else ""))
        times = ", ".join(f"{s}: {t * 1e3:.3g}" for s, t in done.items()) or "none timed"
        memory = ""
        if self.bytes_per_sample > 0:
            memory = f"; +{_gib(self.bytes_per_sample * self.chosen)} at {self.chosen}"
        if self.budget is not None:
            memory += f", budget {_gib(self.budget)} ({BUDGET_SHARE:.0%} of {_gib(self.available or 0)} free)"
        oom = f"; out of memory at {', '.join(map(str, self.out_of_memory_at))}" if self.out_of_memory_at else ""
        what = "backward passes" if self.kind == "backward" else "forward"
        return (f"chunk_size auto → {self.chosen} rotated samples per {what}: fastest per sample (ms: {times}; "
                f"stopped: {self.stop_reason}){memory}{oom}")

    def report(self) -> dict[str, Any]:
        """What ``run.json`` records: the size, why, every trial."""
        return {
            "mode": AUTO,
            "pass": self.kind,
            "chunk_size": self.chosen if self.chosen is not None else self.best_size,
            "decided": self.chosen is not None,
            "stopped": self.stop_reason,
            "trials": [{"size": t.size, "seconds_per_sample": [round(x, 9) for x in t.seconds], "extra_bytes": t.extra_bytes}
                       for _, t in sorted(self.trials.items())],
            "bytes_per_sample": round(self.bytes_per_sample),
            "budget_bytes": self.budget,
            "soft_limit_bytes": self.soft_limit,
            "available_bytes": self.available,
            "out_of_memory_at": list(self.out_of_memory_at),
            "clock": self.clock_name,
            "memory": self.memory_method,
            "rule": f"powers of two from {self.smallest}, {self.repeats} timed runs each (min); double (or, when the first "
                    f"doubling is slower, halve) while ≥ {self.min_gain:.0%} faster; fastest per sample, the smallest "
                    f"within {self.tie:.0%}",
        }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def architecture(model: Callable) -> str:
    """A short key of the model's architecture: its class and parameter names, shapes and dtypes
    (the weights' values do not count: checkpoints of one run share the key)."""
    parts = [f"{type(model).__module__}.{type(model).__qualname__}"]
    if isinstance(model, torch.nn.Module):
        parts += [f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in model.named_parameters()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


class AutoChunks:
    """``chunk_size: auto``, shared by every copy of an audit plan's spec: one
    :class:`ChunkSearch` per (architecture, pass kind, device), kept across calls.

    ``listeners``: called with a search when it decides (the CLI prints its summary).
    ``probe``: ``device -> MemoryProbe`` (default :func:`equiaudit.io.resources.memory_probe`).
    ``clock``: ``() -> seconds`` (default: see the module docstring). ``options``: the
    :class:`ChunkSearch` settings (``smallest``, ``min_gain``, ``tie``, ``repeats``).
    """

    def __init__(self, *, probe: Callable[[torch.device], Any] | None = None, clock: Callable[[], float] | None = None,
                 budget_share: float = BUDGET_SHARE, **options: Any):
        self.probe_factory = probe
        self.clock = clock
        self.budget_share = budget_share
        self.options = options
        self.searches: dict[tuple[str, str, str], ChunkSearch] = {}
        self.listeners: list[Callable[[ChunkSearch], None]] = []
        self._probes: dict[str, Any] = {}

    def __getstate__(self):  # listeners (terminal printers) and probes stay in their process
        state = dict(self.__dict__)
        state["listeners"], state["_probes"], state["probe_factory"], state["clock"] = [], {}, None, None
        return state

    def probe(self, device: torch.device):
        key = str(device)
        if key not in self._probes:
            if self.probe_factory is not None:
                self._probes[key] = self.probe_factory(device)
            else:
                from equiaudit.io.resources import memory_probe

                self._probes[key] = memory_probe(device)
        return self._probes[key]

    def clock_for(self, device: torch.device) -> tuple[Callable[[], float], str]:
        if self.clock is not None:
            return self.clock, "given"
        if device.type == "cpu" and torch.get_num_threads() == 1:
            return time.thread_time, "thread CPU time (1 intra-op thread)"
        return time.perf_counter, "wall time"

    def search(self, model: Callable, device: torch.device, differentiable: bool) -> ChunkSearch:
        """The search for this model's architecture and pass kind on ``device`` (made on first use)."""
        kind = "backward" if differentiable else "forward"
        key = (architecture(model), kind, str(device))
        found = self.searches.get(key)
        if found is None:
            probe = self.probe(device)
            available = probe.available() if probe is not None else None
            budget = None if available is None else int(available * self.budget_share)
            in_use = probe.in_use() if probe is not None else None
            # On a CPU, batching gains saturate at cache-sized chunks while memory grows with them
            # (RAM is shared with everything else): a chunk may add at most max(256 MiB, ¼ of the
            # process's memory in use). A GPU's memory is the audit's: only the budget bounds it.
            soft = None if device.type == "cuda" or in_use is None else max(SOFT_FLOOR, in_use // 4)
            found = ChunkSearch(kind=kind, budget=budget, available=available, clock_name=self.clock_for(device)[1],
                                memory_method=getattr(probe, "method", ""), soft_limit=soft, on_decided=self._decided, **self.options)
            self.searches[key] = found
        return found

    def _decided(self, search: ChunkSearch) -> None:
        for listener in list(self.listeners):
            listener(search)

    def report(self) -> dict[str, Any]:
        searches = [s.report() for s in self.searches.values()]
        chosen = next((s["chunk_size"] for s in searches if s["pass"] == "forward"), None)
        return {"mode": AUTO, "chunk_size": chosen, "searches": searches}

    def summaries(self) -> list[str]:
        return [s.summary() for s in self.searches.values()]


def run_in_chunks(forward: Callable[[int, int], Mapping[str, torch.Tensor]], total: int, *, chunks: AutoChunks | None,
                  size: int, model: Callable, device: torch.device, differentiable: bool = False) -> list:
    """``forward(start, stop)`` over rows ``0 … total`` in chunks; returns its results in order.

    ``chunks`` (``chunk_size: auto``): sizes searched, timed and halved after an out-of-memory
    error as the module docstring says; None: chunks of ``size`` rows as given.
    """
    if chunks is None:
        policy: FixedChunks | ChunkSearch = FixedChunks(size)
        probe, clock = None, time.perf_counter
    else:
        policy = chunks.search(model, device, differentiable)
        probe = chunks.probe(device) if policy.searching else None
        clock, _ = chunks.clock_for(device)
    cuda = device.type == "cuda"
    policy.begin(total)
    parts, start = [], 0
    while start < total:
        rows, timed = policy.next_size(total - start)
        measuring = policy.searching and probe is not None
        try:
            before = probe.in_use() if measuring else None
            if measuring:
                probe.start()
            if timed and cuda:
                torch.cuda.synchronize(device)
            began = clock()
            out = forward(start, start + rows)
            if timed and cuda:
                torch.cuda.synchronize(device)
            seconds = clock() - began
        except Exception as exc:  # noqa: BLE001 - only allocation failures are handled
            if not is_out_of_memory(exc):
                raise
            policy.out_of_memory(rows, exc)  # raises when the chunk cannot shrink (or was given)
            del exc
            if cuda:
                torch.cuda.empty_cache()
            continue
        peak = probe.peak() if measuring else None
        extra = peak - before if peak is not None and before is not None else None
        policy.record(rows, seconds, extra, timed)
        parts.append(out)
        start += rows
    return parts


def describe(spec) -> dict[str, Any]:
    """``run.json``'s ``chunking``: the searches of ``chunk_size: auto``, or the fixed size."""
    chunks = getattr(spec, "chunks", None)
    if chunks is None:
        return {"mode": "fixed", "chunk_size": spec.chunk_size}
    return chunks.report()

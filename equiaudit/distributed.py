"""Auditing with several processes under ``torchrun``: world, process group, sharding, gathers.

``torchrun --nproc_per_node=N -m equiaudit audit CFG --out O`` starts N processes with
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set; :meth:`World.from_env` reads them and
:func:`session` joins the process group: NCCL for CUDA tensors with the model on
``cuda:LOCAL_RANK``, gloo for CPU tensors — and every collective here is a CPU object
collective, so it goes through gloo, whose timeouts raise in the waiting rank (a dead or
hung peer becomes an error, never a silent hang). There are two ways to split an audit:

* **samples** — every rank audits every checkpoint on its share of the batches (batch
  ``i`` on rank ``i mod W``), with the batch boundaries of one process, so each batch's
  arithmetic is the same; the per-sample statistics are gathered to rank 0, which
  summarizes them: bootstrap interval, breakdowns and floors are those of one process.
* **checkpoints** — every rank audits whole checkpoints (``i mod W``), one round of W at a
  time, and rank 0 gathers their results.

:func:`choose_mode` picks one (``--distribute auto``): the one with fewer batches on the
busiest rank, counting whole rounds (see there). Only rank 0 touches ``OUT`` and the cache:
it looks checkpoints up and broadcasts what is left to do, then records every checkpoint as
soon as it is gathered, so a rank killed mid-audit loses only the checkpoints in flight,
and a rerun resumes from the cache.

Failures: a checkpoint that fails on one rank fails for all, with that rank's one-line
message (the shares carry their status; see :func:`equiaudit.runner.finish_checkpoint`).
A rank that dies makes the others' next collective fail (at once when its sockets close;
after ``timeout`` seconds when it hangs), and every error here is one line:
:class:`DistributedError`. ``torchrun`` stops the surviving ranks with SIGTERM when one
fails; that becomes :class:`Stopped` with a message saying what was kept.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from equiaudit.errors import CheckpointError, ConfigError, DataError, EquiauditError, first_line

__all__ = [
    "World", "Session", "session", "DistributedError", "Stopped", "choose_mode", "MODES", "DEFAULT_TIMEOUT",
    "DistributedRun", "owns_batch", "exit_code", "Quiet",
]

MODES = ("auto", "samples", "checkpoints")
# Seconds a rank waits in a collective for the others. The ranks of a balanced split reach
# each gather within about one batch (samples) or one checkpoint (checkpoints) of each other;
# ten minutes covers a large checkpoint's audit on a slow rank, and a rank that dies without
# closing its sockets (a lost node) is reported after it. --dist-timeout changes it.
DEFAULT_TIMEOUT = 600.0

T = TypeVar("T")


class DistributedError(EquiauditError):
    """Another rank stopped, hung past the timeout, or the process group could not start."""

    status = "distributed"


class Stopped(SystemExit):
    """This rank was told to stop (SIGTERM: ``torchrun`` ending every rank after one failed,
    or the job cancelled). ``message`` says what was kept; exit code 1."""

    def __init__(self, message: str):
        super().__init__(1)
        self.message = message


class Quiet(SystemExit):
    """An error already reported by rank 0: the other ranks exit with its code, silently."""


def exit_code(exc: BaseException) -> int:
    """The CLI's exit code for an error: 2 bad config, data or command line, else 1."""
    return 2 if isinstance(exc, (ConfigError, DataError, CheckpointError)) else 1


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: os._Environ | dict | None = None) -> World:
        """The ``torchrun`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); one process
        when ``WORLD_SIZE`` is absent."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            size = int(env["WORLD_SIZE"])
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ConfigError(f"torch.distributed environment: WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                              f"RANK={env.get('RANK')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r} must be integers") from None
        if size < 1 or not 0 <= rank < size or local < 0:
            raise ConfigError(f"torch.distributed environment: RANK={rank} is not in [0, WORLD_SIZE={size})")
        return cls(rank, size, local)


def rank_device(world: World, requested: str) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``cuda`` (or ``auto`` with CUDA), else ``cpu``."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is available; use --device cpu or auto")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ConfigError(f"LOCAL_RANK={world.local_rank} but this node has {count} CUDA device(s): "
                          f"start at most {count} processes per node (torchrun --nproc_per_node={count})")
    return f"cuda:{world.local_rank}"


class Session:
    """A joined process group and the few collectives an audit needs (Python objects, CPU).

    Every method is a collective: all ranks call it, in the same order. ``what`` names the
    step in the error a failed collective raises.
    """

    def __init__(self, world: World, device: str, timeout: float):
        self.world, self.device, self.timeout = world, device, timeout
        self.backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        self.doing = "the start"  # what this rank is at, for the message if it is stopped
        self.exiting = False  # unwinding with an error: a SIGTERM must not cut its message short

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    def _collective(self, what: str, call: Callable[[], T]) -> T:
        import torch.distributed as dist

        try:
            return call()
        except (RuntimeError, dist.DistError, ConnectionError) as exc:
            raise DistributedError(
                f"rank {self.rank}: another rank stopped or did not answer within {self.timeout:g} s during {what} "
                f"({first_line(exc)}); checkpoints finished before it are written: rerun the same command to resume"
            ) from exc

    def broadcast(self, value: Any, what: str) -> Any:
        """Rank 0's ``value`` on every rank."""
        import torch.distributed as dist

        box = [value if self.world.main else None]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, value: Any, what: str) -> list[Any] | None:
        """Every rank's ``value``, by rank, on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.world.main else None
        self._collective(what, lambda: dist.gather_object(value, out, dst=0))
        return out

    def all_gather(self, value: Any, what: str) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._collective(what, lambda: dist.all_gather_object(out, value))
        return out

    def agree(self, call: Callable[[], T], what: str) -> T:
        """Run ``call`` on every rank; if it raised anywhere, every rank raises: rank 0 the
        first failing rank's error (named), the others :class:`Quiet` with its exit code."""
        try:
            value, error = call(), None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised
            value, error = None, exc
        errors = self.all_gather(None if error is None else _portable(error), what)
        self._raise_first(errors)
        return value

    def on_main(self, call: Callable[[], T], what: str) -> T:
        """Run ``call`` on rank 0 only and give its value (or its error) to every rank."""
        value, error = None, None
        if self.world.main:
            try:
                value = call()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised
                error = exc
        value, error_sent = self.broadcast((value, None if error is None else _portable(error)), what)
        if error is not None:
            raise error
        self._raise_first([error_sent])
        return value

    def _raise_first(self, errors: Sequence[BaseException | None]) -> None:
        for rank, error in enumerate(errors):
            if error is None:
                continue
            if not self.world.main:
                raise Quiet(exit_code(error))
            if rank != 0:
                raise _named_by_rank(error, rank) from error
            raise error


def _named_by_rank(error: BaseException, rank: int) -> BaseException:
    """``error`` of another rank, its message prefixed with the rank: the same type and
    ``status`` where it can be rebuilt (so the exit code and the CSV status are the same),
    else a :class:`DistributedError` with its first line."""
    if isinstance(error, EquiauditError):
        try:
            return type(error)(f"rank {rank}: {error}", status=error.status)
        except TypeError:  # a subclass with a constructor of its own
            pass
    return DistributedError(f"rank {rank}: {type(error).__name__}: {first_line(error)}")


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a :class:`DistributedError` with its first line."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception holding an unpicklable object
        return DistributedError(f"{type(exc).__name__}: {first_line(exc)}")


@contextlib.contextmanager
def session(world: World, *, device: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Iterator[Session]:
    """Join the process group of ``world`` (gloo on CPU; NCCL + gloo on CUDA, the rank's
    device set first), stop on SIGTERM with :class:`Stopped`, and leave the group afterwards.

    The rendezvous itself (``MASTER_ADDR``/``MASTER_PORT`` or torchrun's store) waits at most
    ``timeout`` seconds for the other ranks.
    """
    import torch.distributed as dist

    if not timeout > 0:
        raise ConfigError(f"--dist-timeout={timeout} must be a positive number of seconds")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process (without torchrun)")
    name = rank_device(world, device)
    if name.startswith("cuda"):
        torch.cuda.set_device(torch.device(name))  # NCCL and every .cuda() of this rank use its own GPU
    ours = Session(world, name, timeout)
    try:
        dist.init_process_group(ours.backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError, dist.DistError) as exc:
        raise DistributedError(f"rank {world.rank}: could not join the process group of {world.size} ranks "
                               f"({first_line(exc)})") from exc
    with _stop_on_sigterm(ours):
        try:
            yield ours
        finally:
            with contextlib.suppress(Exception):  # a peer already gone: nothing left to tear down cleanly
                dist.destroy_process_group()


@contextlib.contextmanager
def _stop_on_sigterm(ses: Session):
    """SIGTERM (torchrun stopping every rank after one failed) → :class:`Stopped`, so the
    rank unwinds (the cache and the lock are closed) and says why it ended."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if ses.exiting:
            return  # already on the way out with an error of its own: let it be reported
        ses.exiting = True
        raise Stopped(f"rank {ses.rank}: stopped by SIGTERM during {ses.doing} (torchrun ends every rank when one fails, "
                      "or the job was cancelled); checkpoints finished before it are written: rerun the same command to resume")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        # torchrun sends SIGTERM as soon as any rank exits non-zero; this rank's one-line error is
        # printed after it leaves the process group, so the handler stays, ignoring SIGTERM, until exit.
        ses.exiting = True
        raise
    signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------- how to split


def choose_mode(requested: str, n_checkpoints: int, n_batches: int, parts: int) -> tuple[str, str]:
    """``(mode, reason)``: how ``parts`` ranks (or shards) split ``n_checkpoints`` checkpoints
    of ``n_batches`` batches each.

    ``auto`` compares the batches the busiest part evaluates, rounds included: whole
    checkpoints take ``⌈C/W⌉·n_b`` (the last round may leave parts idle), shared samples
    ``C·⌈n_b/W⌉``. Fewer wins; a tie goes to whole checkpoints, which read each file once
    and gather one result instead of per-sample statistics. So few large checkpoints
    (C < W, or n_b ≫ W) share samples, and many small ones (C ≥ W) are split whole.
    """
    if requested not in MODES:
        raise ConfigError(f"--distribute={requested!r} is not allowed; allowed: {', '.join(MODES)}")
    by_checkpoint = math.ceil(n_checkpoints / parts) * n_batches
    by_sample = n_checkpoints * math.ceil(n_batches / parts)
    costs = (f"{n_checkpoints} checkpoint(s) of {n_batches} batch(es) over {parts}: the busiest part evaluates "
             f"{by_checkpoint} batch(es) with whole checkpoints, {by_sample} sharing samples")
    if requested != "auto":
        return requested, f"--distribute {requested} ({costs})"
    mode = "checkpoints" if by_checkpoint <= by_sample else "samples"
    return mode, f"auto: {costs}"


def owns_batch(batch: int, part: int, parts: int) -> bool:
    """Batch ``batch`` belongs to part ``part`` (0-based) of ``parts`` (round-robin)."""
    return batch % parts == part


# ---------------------------------------------------------------------- the distributed runner


class DistributedRun:
    """The checkpoints of one config audited by every rank of a :class:`Session`.

    Rank 0 holds the :class:`~equiaudit.runner.Runner` (cache, ``OUT``, events); the other
    ranks evaluate and send. :meth:`run` is a collective.
    """

    def __init__(self, ses: Session, audit, out, *, force: bool = False, events=None, mode: str = "auto",
                 on_mode: Callable[[str, str], None] | None = None):
        from equiaudit.runner import Runner, RunEvents

        self.session, self.audit, self.requested = ses, audit, mode
        self.events = events or RunEvents()
        self.runner = Runner(audit, out, force=force, events=self.events) if ses.world.main else None
        self.on_mode = on_mode
        self.mode: str | None = None
        self.reason: str | None = None

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()

    def __enter__(self) -> DistributedRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, refs: Sequence) -> tuple[list, list[dict]]:
        """Audit ``refs`` (rank 0's list counts); returns, on rank 0, the results evaluated now
        and the summary rows of all ``refs`` (as :meth:`Runner.run`); elsewhere ``([], [])``."""
        from equiaudit.io.tables import merge_rows

        ses, runner = self.session, self.runner
        # Rank 0 alone reads the cache; the others learn which checkpoints are left to do.
        parted = runner.partition(refs) if runner is not None else None
        todo = ses.broadcast([ref for ref, _, _ in parted[0]] if parted else None, "the cache lookup")
        if runner is not None:
            runner.record_cached(parted[1], parted[2])
        n_batches = self.audit.plan.n_batches(len(self.audit.prepared))
        self.mode, self.reason = choose_mode(self.requested, len(todo), n_batches, ses.size)
        if runner is not None:
            runner.metadata_extra["distributed"] = {
                "world_size": ses.size, "backend": ses.backend, "mode": self.mode, "reason": self.reason,
                "timeout_s": ses.timeout,
            }
        if self.on_mode is not None and ses.world.main:
            self.on_mode(self.mode, self.reason)
        stamps = {str(ref.path): (found, key) for ref, found, key in parted[0]} if parted else {}
        results: list = []
        record = lambda ref, result: self._record(ref, result, stamps, results)  # noqa: E731 - rank 0 only
        if self.mode == "samples":
            for ref in todo:
                self._samples(ref, record)
        else:
            self._checkpoints(todo, record)
        if runner is None:
            return [], []
        rows = [row for hit in parted[2] for row in hit.rows] + [row for r in results for row in r.rows()]
        return results, merge_rows([], rows)

    def _record(self, ref, result, stamps, results) -> None:
        runner = self.runner
        found, key = stamps.get(str(ref.path), (None, None))
        result = runner.complete(ref, found, key, result)
        runner.record([result], [ref])
        results.append(result)
        if self.events.on_result:
            self.events.on_result(result)

    def _samples(self, ref, record) -> None:
        """One checkpoint, its batches round-robin over the ranks; rank 0 summarizes."""
        from equiaudit.runner import evaluate_share, finish_checkpoint

        ses, audit, main = self.session, self.audit, self.session.world.main
        ses.doing = f"the audit of {ref.name}"
        if main and self.events.on_checkpoint:
            self.events.on_checkpoint(ref)
        rounds = _TargetRounds(ses, audit, ref.name) if audit.plan.target_ci is not None else None
        share = evaluate_share(audit, ref, batches=lambda i: owns_batch(i, ses.rank, ses.size), piece=ses.rank,
                               stop=rounds.stop if rounds else None,
                               on_batch=self.events.on_batch if main else None,
                               on_error=self.events.on_error)
        if rounds is not None:
            share = rounds.finish(share)
        shares = ses.gather(share, f"the audit of {ref.name}")
        if main:
            record(ref, finish_checkpoint(audit, shares, ref=ref, on_error=self.events.on_error))

    def _checkpoints(self, todo: Sequence, record) -> None:
        """Whole checkpoints, ``W`` per round (checkpoint ``r·W + rank`` on this rank)."""
        from equiaudit.runner import audit_checkpoint

        ses, main = self.session, self.session.world.main
        for start in range(0, len(todo), ses.size):
            mine = start + ses.rank
            result = None
            names = ", ".join(r.name for r in todo[start:start + ses.size])
            ses.doing = f"the audit of {names}"
            if mine < len(todo):
                ref = todo[mine]
                if main and self.events.on_checkpoint:
                    self.events.on_checkpoint(ref)
                result = audit_checkpoint(self.audit, ref, on_batch=self.events.on_batch if main else None,
                                          on_error=self.events.on_error)
            gathered = ses.gather(result, ses.doing)
            if main:
                for ref, got in zip(todo[start:start + ses.size], gathered):
                    record(ref, got)


class _TargetRounds:
    """``--target-ci`` when ranks share samples: the stopping rule of one process, decided on
    rank 0 after every round of ``W`` batches (one per rank).

    One process checks the interval after every batch and stops at the first batch ``b``
    where it is narrow enough; here rank 0 gathers each round's new rows and checks the
    batches of the round in order, so it finds the same ``b``; rows after ``b`` (the rest of
    that round) are dropped. A rank that failed keeps answering rounds (with its failure)
    until all stop, so every rank makes the same collectives.
    """

    def __init__(self, ses: Session, audit, name: str):
        self.session, self.plan, self.prepared, self.name = ses, audit.plan, audit.prepared, name
        self.n_batches = self.plan.n_batches(len(self.prepared))
        self.gathered = None  # rank 0: rows of every round so far
        self.done = False
        self.cut: int | None = None  # the last batch kept
        self.next_end = self._end_of(0)  # the batch that ends the round under way

    def _end_of(self, number: int) -> int:
        """The last batch of the round holding batch ``number``."""
        size = self.session.size
        return min((number // size + 1) * size - 1, self.n_batches - 1)

    def stop(self, number: int, stats) -> bool:
        if number != self.next_end:
            return False
        self._exchange(number, stats, failed=None)
        return self.done

    def _exchange(self, number: int, stats, failed: tuple[str, str] | None) -> None:
        from equiaudit.stats import SampleStats

        ses, bs = self.session, self.plan.batch_size
        first = (number // ses.size) * ses.size  # the round's first batch
        self.next_end = self._end_of(number + 1)
        new = None
        if stats is not None and failed is None:
            this_round = self.prepared.ids[first * bs:(number + 1) * bs]
            new = stats.select_ids(lambda ids: torch.isin(ids, this_round))
        pieces = ses.gather((new, failed), f"--target-ci's round at batch {number} of {self.name}")
        decision = None
        if ses.world.main:
            if any(f is not None for _, f in pieces):
                decision = ("failed", None)
            else:
                parts = ([self.gathered] if self.gathered is not None else []) + [p for p, _ in pieces if p is not None]
                self.gathered = SampleStats.merge(parts)
                for batch in range(first, number + 1):
                    kept = self.prepared.ids[:(batch + 1) * bs]
                    if self.plan.target_reached(self.gathered.select_ids(lambda ids: torch.isin(ids, kept))):
                        decision = ("reached", batch)
                        break
                if decision is None and number == self.n_batches - 1:
                    decision = ("exhausted", number)
        decision = ses.broadcast(decision, f"--target-ci's decision at batch {number} of {self.name}")
        if decision is not None:
            self.done, self.cut = True, decision[1]

    def finish(self, share):
        """After this rank's evaluation: answer the rounds left (a failed rank), then keep only
        the batches up to the cut."""
        while not self.done:
            # Failed before the decision: the others wait at the end of the round under way.
            self._exchange(self.next_end, None, failed=(share.status or "model_error", share.message or ""))
        if share.ok and self.cut is not None:
            kept = self.prepared.ids[:(self.cut + 1) * self.plan.batch_size]
            share.stats = share.stats.select_ids(lambda ids: torch.isin(ids, kept))
            share.batches = tuple(b for b in share.batches if b <= self.cut)
        return share

"""Auditing checkpoints: the runner behind ``equiaudit audit``, ``compare``, ``demo`` and ``--watch``.

:func:`open_audit` reads what a config names (the data, the model factory), resolves the
:class:`~equiaudit.plan.AuditPlan` and prepares the data once; :class:`Runner` then audits
checkpoints with it, one at a time:

* the result cache (``OUT/cache.sqlite``) is consulted first: a checkpoint already audited
  with the same settings is not evaluated again (``force`` recomputes);
* each checkpoint is read (``weights_only``), loaded into the model and evaluated by the
  plan; **any** exception while doing so becomes that checkpoint's status row — a corrupt
  file, a model that raises, an out-of-memory — and the run goes on (only Ctrl-C and
  ``SystemExit`` end it);
* after each checkpoint its rows are merged into ``OUT/summary.csv``, ``breakdown.csv`` and
  ``run.json`` under the folder's lock, so an interruption loses at most the one in flight
  and concurrent audits of one folder lose nothing.

:meth:`Runner.watch` keeps doing this as training writes checkpoints. The terminal is not
touched here: faces pass :class:`RunEvents` callbacks (progress bars, error lines).
"""

from __future__ import annotations

import hashlib
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from equiaudit import __version__, schema
from equiaudit.errors import CheckpointError, EquiauditError, first_line
from equiaudit.io.cache import CachedResult, ResultCache, SettleTracker, Stamp, settings_identity, stamp
from equiaudit.io.checkpoints import CheckpointRef, discover_checkpoints, load_into_model, read_checkpoint
from equiaudit.io.config import AuditConfig
from equiaudit.io.data import load_dataset
from equiaudit.io.layout import OutputFolder
from equiaudit.io.models import build_configured
from equiaudit.io.tables import merge_rows
from equiaudit.plan import AuditPlan, Prepared, resolve
from equiaudit.result import AuditResult
from equiaudit.stats import SampleStats

__all__ = ["OpenAudit", "open_audit", "Runner", "RunEvents", "audit_checkpoint", "run_metadata", "CheckpointShare",
           "evaluate_share", "finish_checkpoint"]


@dataclass
class OpenAudit:
    """What stays fixed across the checkpoints of a config: plan, model and prepared data."""

    config: AuditConfig
    plan: AuditPlan
    model: torch.nn.Module
    prepared: Prepared


def open_audit(config: AuditConfig, *, device: str | torch.device = "auto", compile: bool = False,
               model: torch.nn.Module | None = None) -> OpenAudit:
    """Load the config's data, build its model, resolve the plan and prepare the data
    (pinned in host memory for a CUDA device: :mod:`equiaudit.fast`). ``compile``:
    ``torch.compile`` the model's forward. ``model``: use this one instead of calling
    ``model.factory`` (``merge`` builds none from a manifest)."""
    from equiaudit.fast import compile_model, pinned

    dataset, index = load_dataset(
        config.data.path, config.data.keys, samples=config.data.samples, subset_seed=config.data.subset_seed, return_index=True,
        follow_external=config.data.follow_external, max_atoms=config.data.max_atoms,
        structures=config.data.structures,
    )
    plan = resolve(config, dataset, device=device)
    prepared = pinned(plan.prepare(dataset, index=index), plan.device)
    if model is None:
        model = build_configured(config.model, config.source.parent if config.source else None)
    model = model.to(device=plan.device, dtype=plan.model_dtype)
    if compile:
        model = compile_model(model)
    return OpenAudit(config, plan, model, prepared)


@dataclass
class RunEvents:
    """Optional callbacks of a run (all called in the auditing thread).

    ``on_checkpoint(ref)`` before a checkpoint is evaluated; ``on_batch(done, total)`` as its
    samples are; ``on_result(result)`` after it; ``on_cached(rows)`` with the summary rows of
    checkpoints reused from the cache;
    ``on_error(ref, exc)`` with the exception behind a failed checkpoint (for ``--debug``);
    ``on_warning(text)`` for things the user should know (a damaged CSV rebuilt...).
    """

    on_checkpoint: Callable[[CheckpointRef], None] | None = None
    on_batch: Callable[[int, int], None] | None = None
    on_result: Callable[[AuditResult], None] | None = None
    on_cached: Callable[[list[dict]], None] | None = None
    on_error: Callable[[CheckpointRef, BaseException], None] | None = None
    on_warning: Callable[[str], None] | None = None


def audit_checkpoint(audit: OpenAudit, ref: CheckpointRef, *, on_batch=None,
                     on_error: Callable[[CheckpointRef, BaseException], None] | None = None) -> AuditResult:
    """Load one checkpoint into the model and audit it. Never raises for anything the
    checkpoint, the data or the model does: the failure becomes the result's status."""
    share = evaluate_share(audit, ref, on_batch=on_batch, on_error=on_error, gradients=True)
    return finish_checkpoint(audit, [share], ref=ref, on_error=on_error)


@dataclass
class CheckpointShare:
    """One process's part of a checkpoint's audit (all of it in one process; a rank's or an
    array-job shard's batches otherwise): the statistics of the batches it evaluated, or why
    it failed. ``identity`` is the checkpoint's ``run``, ``checkpoint`` and ``step`` (the step
    read from the file when it has one); ``batches`` the batch numbers it was given."""

    identity: dict[str, Any]
    batches: tuple[int, ...]
    stats: SampleStats | None
    status: str | None = None
    message: str | None = None
    seconds: float = 0.0
    splits: dict | None = None  # the --dynamics gradient split, when accumulated on this share's forward passes

    @property
    def ok(self) -> bool:
        return self.status is None


def evaluate_share(audit: OpenAudit, ref: CheckpointRef, *, batches: Callable[[int], bool] | None = None, piece: int = 0,
                   stop: Callable[[int, SampleStats], bool] | None = None, on_batch=None,
                   on_error: Callable[[CheckpointRef, BaseException], None] | None = None,
                   gradients: bool = False) -> CheckpointShare:
    """Load ``ref`` into the model and evaluate the batches ``batches(i)`` selects (all by
    default) into statistics tagged ``piece``; ``stop`` as :meth:`AuditPlan.evaluate`.
    ``gradients``: accumulate the ``--dynamics`` gradient split on the same forward passes
    (one process evaluating every batch). Never raises for the checkpoint, the data or the
    model: the failure is the share's status."""
    start = time.perf_counter()
    identity: dict[str, Any] = {"run": ref.run, "checkpoint": ref.name, "step": ref.step}
    config, plan = audit.config, audit.plan
    chosen = tuple(i for i in range(plan.n_batches(len(audit.prepared))) if batches is None or batches(i))
    try:
        loaded = load_weights(audit, ref)
        if loaded.step is not None:
            identity["step"] = loaded.step
        identity["epoch"] = loaded.epoch if loaded.epoch is not None else ref.epoch
        identity["weights"], identity["weights_source"] = loaded.weights, loaded.weights_source
        accumulator = plan.gradient_accumulator(audit.model) if gradients else None
        stats = plan.evaluate(audit.model, audit.prepared, on_batch=on_batch, batches=batches, piece=piece, stop=stop,
                              gradients=accumulator)
        return CheckpointShare(identity, chosen, stats, seconds=time.perf_counter() - start,
                               splits=plan.accumulated_splits(accumulator, audit.prepared))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - one checkpoint's failure must never end the run
        if on_error is not None:
            on_error(ref, exc)
        status, message = _failure(exc, plan)
        return CheckpointShare(identity, chosen, None, status, message, seconds=time.perf_counter() - start)


def load_weights(audit: OpenAudit, ref: CheckpointRef):
    """Read ``ref``'s chosen weights (``checkpoints.weights``) into ``audit.model``, in eval
    mode and the plan's dtype; returns the :class:`~equiaudit.io.checkpoints.LoadedCheckpoint`.
    Raises what reading or matching the checkpoint raises."""
    config, plan = audit.config, audit.plan
    # The ref, not its path: discovery paired EMA siblings with their raw twins.
    own_reader = getattr(audit.model, "read_checkpoint", None)  # a family's own reader (a TorchScript archive's weights)
    loaded = (own_reader(ref.path, plan.device, config.weights) if callable(own_reader)
              else read_checkpoint(ref, map_location=plan.device, weights=config.weights))
    load_into_model(audit.model, loaded, prefix=config.prefix)  # leaves the model in eval()
    if plan.model_dtype is not None:
        audit.model.to(dtype=plan.model_dtype)
    return loaded


def finish_checkpoint(audit: OpenAudit, shares: Sequence[CheckpointShare], *, ref: CheckpointRef | None = None,
                      on_error: Callable[[CheckpointRef, BaseException], None] | None = None,
                      model_loaded: bool = True) -> AuditResult:
    """The result of a checkpoint from its shares (one per process that evaluated part of it):
    the first failure if any share failed (every share then fails alike), else the summary of
    their merged statistics — the figures one process evaluating every batch makes. With
    ``--dynamics`` and the checkpoint's weights still in the model (``model_loaded``: not when
    merging array-job shards), its gradient split, curvature and landscape are added here."""
    config, plan = audit.config, audit.plan
    identity = dict(shares[0].identity)
    start = time.perf_counter()
    seconds = max(share.seconds for share in shares)
    failed = next((share for share in shares if not share.ok), None)
    if failed is None:
        try:
            stats = SampleStats.merge([share.stats for share in shares])
            result = plan.summarize(stats)
            if model_loaded:
                splits = shares[0].splits if len(shares) == 1 else None
                result = plan.with_dynamics(result, audit.model, audit.prepared, step=identity.get("step"), splits=splits)
            return result.with_identity(**identity, seconds=seconds + time.perf_counter() - start)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - e.g. no samples: that checkpoint fails
            if on_error is not None and ref is not None:
                on_error(ref, exc)
            status, message = _failure(exc, plan)
    else:
        status, message = failed.status, failed.message
    return AuditResult.failed(status, message, n_rotations=plan.group.n_elements, group=plan.group.name,
                              group_label=plan.group.label, config_hash=config.settings_hash(),
                              seconds=seconds + time.perf_counter() - start, **identity)


def _failure(exc: BaseException, plan: AuditPlan) -> tuple[str, str]:
    """The status code and one-line message of a failed checkpoint."""
    if isinstance(exc, EquiauditError):
        return exc.status, str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or isinstance(exc, MemoryError):
        return "out_of_memory", "out of memory; lower batch_size or chunk_size in the config"
    reason = first_line(exc)
    if isinstance(exc, RuntimeError) and "does not require grad" in reason and not plan.spec.grad:
        reason += " (if the model takes forces by autograd, set model.grad: true)"
    if isinstance(exc, IndexError) and "index out of range" in reason:
        reason += " (an atomic number or class index beyond the model's embedding?)"
    return "model_error", f"the model failed: {type(exc).__name__}: {reason}"


def run_metadata(audit: OpenAudit, started: float) -> dict[str, Any]:
    """``run.json`` less its checkpoint lists: the settings and the environment."""
    config, plan = audit.config, audit.plan
    source_hash = None
    if config.source is not None:
        try:
            source_hash = hashlib.sha256(config.source.read_bytes()).hexdigest()
        except OSError:
            pass
    device = plan.device
    return {
        "equiaudit_version": __version__,
        "config_path": str(config.source) if config.source else None,
        "config": config.raw,
        "config_hash": config.settings_hash(),
        "config_file_sha256": source_hash,
        "task": config.task,
        "model_family": None if config.model.family is None else {
            "family": config.model.family, "built_from": str(config.model.source) if config.model.source else None,
            "detected": config.source is None},
        "seed": config.seed,
        "group": plan.group.name,
        "group_label": plan.group.label,
        "sampling": getattr(plan.group, "sampling", None),
        "n_rotations": plan.group.n_elements,
        "exact_group": plan.group.exact,
        "n_samples": audit.prepared.n_samples,
        "batch_size": plan.batch_size,
        "chunking": plan.chunking,  # chunk_size, and for auto the trials behind it (equiaudit.chunking)
        "heads": [{"name": h.name, "rep": h.rep, "target": h.target, "loss": h.loss, "weight": h.weight} for h in plan.spec.heads],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
    }


class Runner:
    """Audits checkpoints of one config into one output folder (see the module docstring)."""

    def __init__(self, audit: OpenAudit, out: str | Path | OutputFolder, *, force: bool = False,
                 events: RunEvents | None = None, use_cache: bool = True):
        self.audit = audit
        self.out = out if isinstance(out, OutputFolder) else OutputFolder(out)
        self.force = force
        self.events = events or RunEvents()
        self.out.create()
        self.cache = ResultCache(self.out.cache_path, settings_identity(audit.config)) if use_cache else None
        self.breakdown_identity = audit.plan.breakdown_identity(audit.prepared.data)
        self.started = time.time()
        self.results: dict[str, AuditResult] = {}  # latest result per checkpoint path, evaluated now
        self.cached: list[str] = []
        self.metadata_extra: dict[str, Any] = {}  # added to run.json (how a run was distributed, --target-ci)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ one checkpoint

    def _lookup(self, ref: CheckpointRef) -> tuple[Stamp | None, str | None, CachedResult | None]:
        """(stamp, cache key, usable cached result or None). A result whose breakdown was made
        with other options is not usable."""
        found = stamp(ref.path)
        key = self.cache.key(ref, found) if self.cache is not None and found is not None else None
        hit = self.cache.get(key) if key is not None and not self.force else None
        if hit is not None and hit.breakdown_options != self.breakdown_identity:
            hit = None
        return found, key, hit

    def evaluate(self, ref: CheckpointRef, found: Stamp | None, key: str | None) -> AuditResult:
        """Audit one checkpoint (never raises for it) and cache it when it succeeded."""
        if self.events.on_checkpoint:
            self.events.on_checkpoint(ref)
        result = audit_checkpoint(self.audit, ref, on_batch=self.events.on_batch, on_error=self.events.on_error)
        return self.complete(ref, found, key, result)

    def complete(self, ref: CheckpointRef, found: Stamp | None, key: str | None, result: AuditResult) -> AuditResult:
        """Add the checkpoint's epoch and time to a result evaluated here or elsewhere (ranks,
        shards) and cache it when it succeeded. An epoch already set is kept."""
        epoch = result.epoch if result.epoch is not None else ref.epoch
        result = result.with_identity(epoch=epoch, checkpoint_time=found.mtime if found is not None else None)
        if result.ok and key is not None:
            tables = result.tables()
            extra = {"dynamics": tables[schema.DYNAMICS], "twirl": tables[schema.TWIRL],
                     "landscape": [result.identity(), result.landscape] if result.landscape is not None else None}
            self.cache.put(key, ref, tables[schema.SUMMARY], tables[schema.BREAKDOWN], self.breakdown_identity, extra)
        return result

    def record(self, results: Sequence[AuditResult], refs: Sequence[CheckpointRef] = (), cached: Sequence[CachedResult] = ()) -> None:
        """Merge results (evaluated now) and cached results into the folder's files, under its lock."""
        for ref, result in zip(refs, results):
            self.results[str(ref.path)] = result
        out = self.out
        tables: dict[str, list[dict]] = {name: [] for name in schema.TABLES}
        for source in (*results, *cached):  # evaluated now, then cached
            for name, rows in source.tables().items():
                tables[name].extend(rows)
        landscapes = [(r.identity(), r.landscape) for r in results if r.landscape is not None]
        landscapes += [_as_landscape(hit.extra["landscape"]) for hit in cached if hit.extra.get("landscape")]
        out.record(tables, metadata=self._metadata(), landscapes=landscapes, rebuild=self._from_cache, warn=self.events.on_warning)

    def _from_cache(self, name: str) -> list[dict]:
        """Every stored row of one of the folder's CSVs (to rebuild a damaged one)."""
        if self.cache is None:
            return []
        out = self.out
        if name == out.SUMMARY:
            return self.cache.all_rows()
        if name == out.BREAKDOWN:
            return self.cache.all_breakdown()
        return self.cache.all_extra({out.DYNAMICS: "dynamics", out.TWIRL: "twirl"}[name])

    def _metadata(self) -> dict[str, Any]:
        meta = run_metadata(self.audit, self.started)
        meta["weights"] = self.audit.config.weights
        meta["prefix"] = self.audit.config.prefix
        # Reused from OUT/cache.sqlite: audited by an earlier run with the same settings.
        meta["cached_checkpoints"] = list(self.cached)
        meta.update(self.metadata_extra)
        meta["checkpoints"] = [
            {"run": r.run, "name": r.checkpoint, "path": path, "step": r.step, "epoch": r.epoch, "status": r.status,
             "message": r.message, "weights": r.weights, "weights_source": r.weights_source,
             "n_samples": r.total.n_samples if r.ok and r.total is not None else None}
            for path, r in self.results.items()
        ]
        return meta

    # ------------------------------------------------------------------ a list of checkpoints

    def run(self, refs: Sequence[CheckpointRef]) -> tuple[list[AuditResult], list[dict]]:
        """Audit ``refs``; checkpoints found in the cache are not evaluated (their stored rows
        are written again, unchanged). Returns the results evaluated now and the summary rows
        of all ``refs``."""
        todo, cached_refs, cached = self.partition(refs)
        self.record_cached(cached_refs, cached)
        results, rows = [], [row for hit in cached for row in hit.rows]
        for ref, found, key in todo:
            result = self.evaluate(ref, found, key)
            self.record([result], [ref])
            results.append(result)
            rows.extend(result.rows())
            if self.events.on_result:
                self.events.on_result(result)
        return results, merge_rows([], rows)

    def partition(self, refs: Sequence[CheckpointRef]):
        """``(todo, cached_refs, cached)``: ``(ref, stamp, cache key)`` of the checkpoints to
        evaluate, and the refs and stored results of those found in the cache."""
        todo, cached_refs, cached = [], [], []
        for ref in refs:
            try:
                found, key, hit = self._lookup(ref)
            except Exception as exc:  # noqa: BLE001 - a file that vanished or cannot be stat'ed
                found, key, hit = None, None, None
                self._warn(f"{ref.name}: cache lookup failed ({first_line(exc)}); auditing it")
            if hit is None:
                todo.append((ref, found, key))
            else:
                cached_refs.append(ref)
                cached.append(hit)
        return todo, cached_refs, cached

    def _warn(self, text: str) -> None:
        if self.events.on_warning:
            self.events.on_warning(text)

    def record_cached(self, refs: Sequence[CheckpointRef], cached: Sequence[CachedResult]) -> None:
        """Write results reused from the cache into the folder (rank 0 of a distributed run too)."""
        if not cached:
            return
        self.cached.extend(str(ref.path) for ref in refs)
        self.record([], cached=cached)
        if self.events.on_cached:
            self.events.on_cached([row for hit in cached for row in hit.rows])

    # ------------------------------------------------------------------ --watch

    def watch(self, paths: Sequence[str], *, interval: float, stop: threading.Event | None = None) -> dict[str, AuditResult]:
        """Audit the checkpoints of ``paths`` as they appear, polling every ``interval`` seconds,
        until ``stop`` is set (a ``threading.Event``, or anything with ``is_set()`` and
        ``wait(timeout)``: the CLI's ``SignalStop``) or KeyboardInterrupt. Returns the latest result of every
        checkpoint evaluated, by path (a checkpoint first caught half-written and later audited
        ``ok`` counts as ``ok``; cached ones are ``ok`` by construction).

        A checkpoint is audited once it has settled (:class:`~equiaudit.io.cache.SettleTracker`);
        a failure is written only when it repeats on the unchanged file, so a checkpoint caught
        half-written is retried rather than reported as corrupt.
        """
        tracker = SettleTracker(interval)
        handled: set[str] = set()  # cache keys audited, reused or reported in this session
        latest: dict[str, AuditResult] = {}
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                ready, cached_refs, cached = [], [], []
                for ref in _discover_quietly(paths):
                    try:
                        found, key, hit = self._lookup(ref)
                    except Exception:  # noqa: BLE001 - vanished between discovery and stat
                        continue
                    if key is None or key in handled:
                        continue
                    if hit is not None:
                        handled.add(key)
                        cached_refs.append(ref)
                        cached.append(hit)
                    elif tracker.ready(ref.path, found):
                        ready.append((ref, found, key))
                self.record_cached(cached_refs, cached)
                for ref, found, key in ready:
                    if stop.is_set():
                        break
                    result = self.evaluate(ref, found, key)
                    if not result.ok and not tracker.confirm_failure(ref.path, found):
                        continue  # maybe still being written: retried at the next poll
                    handled.add(key)
                    self.record([result], [ref])
                    latest[str(ref.path)] = result
                    if self.events.on_result:
                        self.events.on_result(result)
                stop.wait(interval)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends: everything finished is already written
        return latest


def _as_landscape(stored: list) -> tuple[dict, dict[str, Any]]:
    """A cached ``[identity, grid]`` with the grid's arrays as tensors again."""
    identity, grid = stored
    arrays = {k: torch.tensor(grid[k], dtype=torch.float64) for k in ("alpha", "beta", "loss_sym", "equiv_error")}
    return identity, {**grid, **arrays}


def _discover_quietly(paths: Sequence[str]) -> list[CheckpointRef]:
    """Checkpoints of ``paths``; none yet (training has not written any) is not an error here."""
    try:
        return discover_checkpoints(paths)
    except CheckpointError as exc:
        if exc.status == "not_found":
            return []
        raise

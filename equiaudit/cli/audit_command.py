"""``equiaudit audit``: the loop over checkpoints, with progress, CSV, run.json and plot.

Results are cached in ``OUT/cache.sqlite`` (:mod:`equiaudit.io.cache`): a checkpoint
already audited with the same settings is not evaluated again, so re-running on a grown
run audits only the new checkpoints, and ``--watch`` keeps doing so as training writes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from equiaudit import __version__
from equiaudit.audit import AuditPlan, CheckpointResult, audit_checkpoint, prepare_audit
from equiaudit.errors import CheckpointError, ConfigError
from equiaudit.io.cache import CACHE_FILE, CachedResult, ResultCache, SettleTracker, Stamp, checkpoint_epoch, settings_identity, stamp
from equiaudit.io.checkpoints import CheckpointRef, discover_checkpoints
from equiaudit.io.config import load_config
from equiaudit.report.breakdown import BREAKDOWN_FILE, breakdown_rows, print_breakdowns, write_breakdown
from equiaudit.report.summary import atomic_write_text, merge_rows, read_rows, result_rows, write_rows
from equiaudit.report.table import summary_table

__all__ = ["group_label", "run_audit_command", "audit_into", "audit_with_progress", "watch_into", "open_cache", "save_trajectory_plot", "PLOT_FILE"]

PLOT_FILE = "trajectory.png"


def group_label(rotation_set) -> str:
    """``so3 (quasi)``, ``octahedral (exact)`` or plain ``so3`` for i.i.d. Haar rotations."""
    sampling = getattr(rotation_set, "sampling", "haar")
    detail = "exact" if rotation_set.exact else ("" if sampling == "haar" else sampling)
    return f"{rotation_set.group} ({detail})" if detail else rotation_set.group


def _run_metadata(
    plan: AuditPlan, results: Sequence[CheckpointResult], started: float, cached: Sequence[CheckpointRef] = ()
) -> dict[str, Any]:
    config = plan.config
    return {
        "equiaudit_version": __version__,
        "config_path": str(config.source) if config.source else None,
        "config": config.raw,
        "config_hash": config.settings_hash(),
        "config_file_sha256": hashlib.sha256(config.source.read_bytes()).hexdigest() if config.source else None,
        "task": config.task,
        "seed": config.seed,
        "group": plan.rotation_set.group,
        "sampling": getattr(plan.rotation_set, "sampling", None),
        "n_rotations": plan.rotation_set.n_rotations,
        "exact_group": plan.rotation_set.exact,
        "n_samples": plan.n_samples,
        "heads": [{"name": h.name, "rep": h.rep, "target": h.target, "loss": h.loss, "weight": h.weight} for h in plan.spec.heads],
        "device": str(plan.device),
        "device_name": torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
        "checkpoints": [
            {"run": r.ref.run, "name": r.ref.name, "path": str(r.ref.path), "step": r.step, "status": r.status, "message": r.message}
            for r in results
        ],
        # Reused from OUT/cache.sqlite: audited by an earlier run with the same settings.
        "cached_checkpoints": [str(ref.path) for ref in cached],
    }


class _Auditor:
    """Audits checkpoints into ``out``: cache lookup, evaluation, then ``summary.csv`` and
    ``run.json`` rewritten after each checkpoint, so an interruption loses at most the one in flight."""

    def __init__(self, plan: AuditPlan, out: Path, cache: ResultCache | None, force: bool):
        self.plan, self.out, self.cache, self.force = plan, out, cache, force
        self.results: list[CheckpointResult] = []
        self.cached: list[CheckpointRef] = []
        self.started = time.time()
        self.breakdown_identity = plan.breakdown_identity()
        out.mkdir(parents=True, exist_ok=True)

    def lookup(self, ref: CheckpointRef) -> tuple[Stamp | None, str | None, CachedResult | None]:
        """(stamp, cache key, usable cached result or None); no key when the file is missing or
        there is no cache. A result whose breakdown was made with other options is not usable."""
        found = stamp(ref.path)
        key = self.cache.key(ref, found) if self.cache is not None and found is not None else None
        hit = self.cache.get(key) if key is not None and not self.force else None
        if hit is not None and hit.breakdown_options != self.breakdown_identity:
            hit = None
        return found, key, hit

    def evaluate(self, ref: CheckpointRef, found: Stamp | None, key: str | None, on_batch=None):
        """Audit one checkpoint; cache its rows when it succeeded (a failure is retried next time)."""
        plan = self.plan
        result = audit_checkpoint(plan, ref, on_batch=on_batch)
        rows = result_rows(
            result,
            n_rotations=plan.rotation_set.n_rotations,
            group=plan.rotation_set.group,
            config_hash=plan.config.settings_hash(),
            head_order=[h.name for h in plan.spec.heads],
        )
        when = {
            "epoch": checkpoint_epoch(ref) if result.ok else None,
            "checkpoint_time": round(found.mtime, 3) if found is not None else None,
        }
        rows = [{**row, **when} for row in rows]
        if result.ok and key is not None:
            breakdown = breakdown_rows(result, config_hash=plan.config.settings_hash())
            self.cache.put(key, ref, rows, breakdown, self.breakdown_identity)
        return result, rows

    def record(self, rows: Sequence[dict], result: CheckpointResult | None = None, cached: Sequence[CachedResult] = (),
               cached_refs: Sequence[CheckpointRef] = ()) -> None:
        """Merge new (``rows`` of ``result``) or ``cached`` results into summary.csv, breakdown.csv
        and run.json."""
        rows = [*rows, *(row for hit in cached for row in hit.rows)]
        summary = self.out / "summary.csv"
        write_rows(summary, merge_rows(read_rows(summary), rows))
        if result is not None:
            self.results.append(result)
        self.cached.extend(cached_refs)
        breakdown = [row for hit in cached for row in hit.breakdown]
        if result is not None:
            breakdown += breakdown_rows(result, config_hash=self.plan.config.settings_hash())
        if breakdown:
            write_breakdown(self.out / BREAKDOWN_FILE, breakdown)
        metadata = _run_metadata(self.plan, self.results, self.started, self.cached)
        atomic_write_text(self.out / "run.json", json.dumps(metadata, indent=2, default=str) + "\n")


def open_cache(plan: AuditPlan, out: Path) -> ResultCache:
    """The result cache of the output directory ``out`` for this plan's settings."""
    return ResultCache(out / CACHE_FILE, settings_identity(plan.config))


def audit_into(
    plan: AuditPlan,
    refs: Sequence[CheckpointRef],
    out: Path,
    *,
    cache: ResultCache | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_result=None,
) -> tuple[list[CheckpointResult], list[dict]]:
    """Audit ``refs`` with ``plan`` and merge the rows into ``out/summary.csv`` after each one.

    Checkpoints found in ``cache`` (unless ``force``) are not evaluated: their stored rows
    are written again, unchanged. Returns the results of the checkpoints evaluated now and
    the rows of all ``refs``.
    """
    auditor = _Auditor(plan, out, cache, force)
    todo, cached_refs, cached = [], [], []
    for ref in refs:
        found, key, hit = auditor.lookup(ref)
        if hit is None:
            todo.append((ref, found, key))
        else:
            cached_refs.append(ref)
            cached.append(hit)
    if cached_refs:
        auditor.record([], cached=cached, cached_refs=cached_refs)
    cached_rows = [row for hit in cached for row in hit.rows]
    new_rows: list[dict] = []
    ckpt_task = progress.add_task("checkpoints", total=len(todo)) if progress else None
    batch_task = progress.add_task("samples", total=plan.n_samples) if progress else None
    for ref, found, key in todo:
        if progress:
            progress.update(ckpt_task, description=f"[bold]{ref.name}")
            progress.reset(batch_task, total=plan.n_samples)
        on_batch = (lambda done, total: progress.update(batch_task, completed=done)) if progress else None
        result, rows = auditor.evaluate(ref, found, key, on_batch)
        new_rows.extend(rows)
        auditor.record(rows, result)
        if on_result is not None:
            on_result(result, rows)
        if progress:
            progress.advance(ckpt_task)
    return auditor.results, merge_rows([], cached_rows + new_rows)


def _discover_quietly(paths: Sequence[str]) -> list[CheckpointRef]:
    """Checkpoints of ``paths``; none yet (training has not written any) is not an error here."""
    try:
        return discover_checkpoints(paths)
    except CheckpointError as exc:
        if exc.status == "not_found":
            return []
        raise


def watch_into(
    plan: AuditPlan,
    paths: Sequence[str],
    out: Path,
    *,
    cache: ResultCache,
    interval: float,
    force: bool = False,
    stop: threading.Event | None = None,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[CheckpointResult]:
    """Audit the checkpoints of ``paths`` as they appear, polling every ``interval`` seconds,
    until ``stop`` is set (or KeyboardInterrupt). Returns the results evaluated.

    A checkpoint is audited once it has settled (:class:`~equiaudit.io.cache.SettleTracker`);
    a failure is written only when it repeats on the unchanged file, so a checkpoint caught
    half-written is retried rather than reported as corrupt.
    """
    auditor = _Auditor(plan, out, cache, force)
    tracker = SettleTracker(interval)
    handled: set[str] = set()  # cache keys audited, reused or reported in this session
    stop = stop or threading.Event()
    try:
        while not stop.is_set():
            ready, cached_refs, cached = [], [], []
            for ref in _discover_quietly(paths):
                found, key, hit = auditor.lookup(ref)
                if key is None or key in handled:
                    continue
                if hit is not None:
                    handled.add(key)
                    cached_refs.append(ref)
                    cached.append(hit)
                elif tracker.ready(ref.path, found):
                    ready.append((ref, found, key))
            if cached_refs:
                auditor.record([], cached=cached, cached_refs=cached_refs)
                if on_rows:
                    on_rows([row for hit in cached for row in hit.rows])
            for ref, found, key in ready:
                if stop.is_set():
                    break
                result, rows = auditor.evaluate(ref, found, key)
                if not result.ok and not tracker.confirm_failure(ref.path, found):
                    continue  # maybe still being written: retried at the next poll
                handled.add(key)
                auditor.record(rows, result)
                if on_rows:
                    on_rows(rows)
            stop.wait(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends: everything finished is already written
    return auditor.results


@contextlib.contextmanager
def _stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM end a watch as KeyboardInterrupt, even when the process
    was started with SIGINT ignored (a background job, a CI runner, nohup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def save_trajectory_plot(out: Path, *, title: str, threshold: float) -> Path:
    """``OUT/trajectory.png`` from every ``ok`` row of ``OUT/summary.csv``."""
    from equiaudit.report.compare import trajectories
    from equiaudit.report.plot import save_figure, trajectory_figure

    trajs = trajectories(read_rows(out / "summary.csv"))
    return save_figure(trajectory_figure(trajs, threshold=threshold, title=title), out / PLOT_FILE)


def run_audit_command(
    *,
    config_path: Path,
    checkpoint_args: Sequence[str],
    out: Path,
    overrides: Mapping[str, Any],
    device: str,
    output_format: str,
    stdout: Console,
    stderr: Console,
    force: bool = False,
    watch: bool = False,
    interval: float = 30.0,
    plot: bool = True,
    threshold: float = 0.02,
) -> int:
    """Body of ``equiaudit audit``; returns the exit code."""
    config = load_config(config_path, overrides)
    paths = [str(p) for p in checkpoint_args] or ([str(config.checkpoints)] if config.checkpoints else [])
    if not paths:
        raise ConfigError("no checkpoints: give CHECKPOINT_PATH arguments or set checkpoints.path in the config")
    if interval <= 0:
        raise ConfigError(f"--interval={interval} must be a positive number of seconds")
    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold={threshold} must be a fraction between 0 and 1 (0.02 = 2 %)")
    refs = [] if watch else discover_checkpoints(paths)  # in watch mode the run may still be empty
    plan = prepare_audit(config, device=device)
    title = f"{config.task} · {group_label(plan.rotation_set)} · K={plan.rotation_set.n_rotations} · N={plan.n_samples}"
    setup = (
        f"task [bold]{config.task}[/] on {plan.n_samples} samples × {plan.rotation_set.n_rotations} rotations "
        f"({group_label(plan.rotation_set)}) on {plan.device}"
    )

    def render(rows: list[dict]) -> None:
        if output_format == "json":
            # --watch prints one compact array per batch of new rows (one JSON document per line).
            print(json.dumps(rows, default=str, indent=None if watch else 2), flush=True)
        else:
            stdout.print(summary_table(rows, title=title, threshold=threshold))
        if plot:
            save_trajectory_plot(out, title=title, threshold=threshold)

    with open_cache(plan, out) as cache:
        if watch:
            stderr.print(f"watching {', '.join(paths)} every {interval:g} s: {setup}; Ctrl-C to stop", highlight=False)
            with _stop_on_signals():
                results = watch_into(plan, paths, out, cache=cache, interval=interval, force=force, on_rows=render)
            stderr.print(f"stopped watching: {len(results)} checkpoint(s) audited; results in {out / 'summary.csv'}", highlight=False)
        else:
            stderr.print(f"auditing {len(refs)} checkpoint(s) of {setup}", highlight=False)
            results, rows = audit_with_progress(plan, refs, out, cache=cache, force=force, console=stderr)
            render(rows)
            if output_format != "json" and plan.breakdown is not None and plan.breakdown.by:
                print_breakdowns(stdout, out / BREAKDOWN_FILE, plan.breakdown.by, config_hash=config.settings_hash())
    if output_format != "json":
        written = [out / "summary.csv", out / "run.json"] + ([out / PLOT_FILE] if plot else [])
        stdout.print(f"wrote {', '.join(map(str, written))}", highlight=False)
    failed = sum(not r.ok for r in results)
    if failed:
        stderr.print(f"{failed} checkpoint(s) failed; the others were audited and written", highlight=False)
    return 1 if failed else 0


def audit_with_progress(
    plan: AuditPlan, refs: Sequence[CheckpointRef], out: Path, *, cache: ResultCache, force: bool, console: Console
) -> tuple[list[CheckpointResult], list[dict]]:
    """:func:`audit_into` with progress bars and failures on ``console``; says how many were reused."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )

    def report_failure(result: CheckpointResult, rows) -> None:
        if not result.ok:
            progress.console.print(f"[bold red]error:[/] {result.message}", highlight=False, soft_wrap=True)

    with progress:
        results, rows = audit_into(plan, refs, out, cache=cache, force=force, progress=progress, on_result=report_failure)
    if len(results) < len(refs):
        console.print(
            f"{len(refs) - len(results)} checkpoint(s) already audited with these settings (from {out / CACHE_FILE}); "
            f"{len(results)} evaluated (--force recomputes all)",
            highlight=False,
        )
    return results, rows

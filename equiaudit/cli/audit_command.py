"""``equiaudit audit``: parse, call the runner, render. The audit loop itself is :mod:`equiaudit.runner`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from equiaudit.errors import ConfigError
from equiaudit.io.config import load_config
from equiaudit.io.layout import OutputFolder
from equiaudit.report.breakdown import print_breakdowns
from equiaudit.report.products import write_products
from equiaudit.report.summary import read_rows
from equiaudit.report.table import summary_table
from equiaudit.report.tensorboard import require_tensorboard, write_tensorboard
from equiaudit.result import AuditResult
from equiaudit.runner import OpenAudit, Runner, RunEvents

__all__ = ["run_audit_command", "audit_with_progress", "progress_bars", "audit_title", "report_rows"]


def progress_bars(console: Console) -> Progress:
    """Bars on a terminal; plain periodic lines in a pipe or a log (:mod:`equiaudit.cli.progress`)."""
    from equiaudit.cli.progress import progress

    return progress(console)


def audit_title(audit: OpenAudit) -> str:
    group = audit.plan.group
    return f"{audit.config.task} · {group.label} · K={group.n_elements} · N={audit.prepared.n_samples}"


def _events(progress: Progress | None, console: Console, debug: bool, n_samples: int) -> RunEvents:
    """Progress bars and one error line per failed checkpoint (with the traceback under ``--debug``)."""
    bars = {}
    if progress is not None:
        bars["checkpoints"] = progress.add_task("checkpoints", total=None)
        bars["samples"] = progress.add_task("samples", total=n_samples)
    printer = progress.console if progress is not None else console

    def on_checkpoint(ref) -> None:
        if progress is not None:
            progress.update(bars["checkpoints"], description=f"[bold]{escape(ref.name)}")
            progress.reset(bars["samples"], total=n_samples)

    def on_batch(done: int, total: int) -> None:
        if progress is not None:
            progress.update(bars["samples"], completed=done, total=total)  # rows (fixed t: samples × times)

    def on_result(result: AuditResult) -> None:
        if not result.ok:
            printer.print(f"[bold red]error:[/] {escape(result.message or result.status)}", highlight=False, soft_wrap=True)
        if progress is not None:
            progress.advance(bars["checkpoints"])

    def on_error(ref, exc: BaseException) -> None:
        if debug:
            printer.print(escape("".join(traceback.format_exception(exc))), highlight=False, soft_wrap=True)

    def on_warning(text: str) -> None:
        printer.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)

    return RunEvents(on_checkpoint=on_checkpoint, on_batch=on_batch, on_result=on_result, on_error=on_error, on_warning=on_warning)


def audit_with_progress(audit: OpenAudit, refs, out: OutputFolder, *, force: bool, console: Console,
                        debug: bool = False) -> tuple[list[AuditResult], list[dict]]:
    """Run the checkpoints with progress bars and failures on ``console``; says how many were reused."""
    progress = progress_bars(console)
    with progress, Runner(audit, out, force=force, events=_events(progress, console, debug, audit.prepared.n_samples)) as runner:
        results, rows = runner.run(refs)
    if len(results) < len(refs):
        console.print(
            f"{len(refs) - len(results)} checkpoint(s) already audited with these settings (from {escape(str(out / out.CACHE))}); "
            f"{len(results)} evaluated (--force recomputes all)",
            highlight=False,
        )
    return results, rows


class _Wake(KeyboardInterrupt):
    """Raised by :class:`SignalStop` to end its own wait between polls."""


class SignalStop:
    """The stop of a CLI ``--watch``: Ctrl-C (SIGINT) or SIGTERM, also when the process was
    started with SIGINT ignored (a background job, a CI runner, nohup).

    Between polls the watch waits in :meth:`wait`, and a signal ends the wait at once. While
    it audits or writes, the first signal is only noted (the watch stops once that checkpoint
    is done): a KeyboardInterrupt in the middle of a lazy import or of a C extension's set-up
    broke the wind-down (``ImportError: initialization failed``, a fatal error at exit). A
    second signal during that work interrupts it (files are written atomically: nothing is
    torn). Once the watch has ended, signals are ignored, so a double Ctrl-C neither cuts the
    writing of the outputs short nor changes the exit code; after a signal they stay ignored
    (the process is on its way out), else the previous handlers come back.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = 0
        self._waiting = False
        self._over = False
        self._previous: dict = {}

    def is_set(self) -> bool:
        return self.requested > 0

    def wait(self, timeout: float) -> bool:
        """Sleep ``timeout`` seconds, or until a signal; True once a stop was asked for."""
        if self.requested:
            return True
        self._waiting = True
        try:
            time.sleep(timeout)
        except _Wake:
            pass
        finally:
            self._waiting = False
        return self.is_set()

    def _handle(self, signum, frame) -> None:
        if self._over:
            return
        self.requested += 1
        if self._waiting:
            raise _Wake
        if self.requested == 1:
            os.write(2, b"stopping once the checkpoint being audited is written (Ctrl-C again to stop now)\n")
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def ended(self) -> None:
        """The watch has returned: from now on signals are ignored."""
        self._over = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)


_WEIGHTS = {"auto": "EMA where a checkpoint has it, else raw", "raw": "raw weights", "ema": "EMA weights"}


def _banner(audit: OpenAudit) -> str:
    plan, config = audit.plan, audit.config
    prefix = f", key prefix {escape(repr(config.prefix))}" if config.prefix is not None else ""
    family = ""
    if config.model.family is not None:
        source = config.model.source.name if config.model.source is not None else "its options"
        heads = ", ".join(h.name for h in plan.spec.heads)
        family = (f"; model: family [bold]{escape(config.model.family)}[/] built from {escape(source)} "
                  f"(heads {escape(heads)}; {'no config: detected from the files' if config.source is None else 'from the config'})")
    return (f"task [bold]{escape(config.task)}[/] on {audit.prepared.n_samples} samples × {plan.group.n_elements} rotations "
            f"({escape(plan.group.label)}) on {plan.device}{_threads(plan.device)}; weights: {config.weights} ({_WEIGHTS[config.weights]}){prefix}{family}; "
            f"{_chunks(audit)}")


def _chunks(audit: OpenAudit) -> str:
    """The banner's word on the chunk size: given, or measured (said again once decided)."""
    chunks = audit.plan.spec.chunks
    if chunks is None:
        return f"chunk_size {audit.plan.spec.chunk_size}"
    decided = [s.chosen for s in chunks.searches.values() if s.chosen is not None]
    return f"chunk_size auto ({', '.join(map(str, decided))})" if decided else "chunk_size auto (measured on the first checkpoint)"


def announce_chunking(audit: OpenAudit, console: Console, debug: bool) -> None:
    """Print the line of ``chunk_size: auto`` once it has decided (and under ``--debug`` every trial)."""
    chunks = audit.plan.spec.chunks
    if chunks is None:
        return

    def decided(search) -> None:
        console.print(escape(search.summary()), highlight=False, soft_wrap=True)
        if debug:
            console.print(escape(json.dumps(search.report())), highlight=False, soft_wrap=True)

    chunks.listeners.append(decided)


def _threads(device) -> str:
    from equiaudit.cli.threads import threads_label

    return f" with {threads_label()}" if str(device) == "cpu" else ""


def say_discovered(refs, skipped, console: Console) -> None:
    """What discovery chose for the user: files folded into a stepped checkpoint, EMA
    siblings paired with their raw twins, epochs standing in for steps, files not opened."""
    for ref in refs:
        if ref.aliases:
            console.print(f"  {escape(', '.join(ref.aliases))} = {escape(ref.name)} (same weights; audited once)", highlight=False)
        if ref.ema_path is not None:
            console.print(f"  {escape(ref.name)}: EMA weights in {escape(ref.ema_path.name)} (one checkpoint, two weight sets)",
                          highlight=False)
    epochs = sorted({ref.run for ref in refs if ref.step_source == "epoch"})
    if epochs:
        console.print(f"  {escape(', '.join(epochs))}: no step stored, the epoch stands in for it", highlight=False)
    for name, reason in skipped:
        console.print(f"[yellow]skipped:[/] {escape(str(name))}: {escape(str(reason))}", highlight=False)


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
    debug: bool = False,
    tensorboard: Path | None = None,
    options: Mapping[str, Any] | None = None,
    data: str | None = None,
    sets: Sequence[str] = (),
    allow_torchscript: bool = False,
    wandb: str | None = None,
) -> int:
    """Body of ``equiaudit audit``; returns the exit code. ``options``: ``distribute``,
    ``dist_timeout``, ``shard``, ``compile`` (see :mod:`equiaudit.cli.scale_command`).
    ``config_path`` that is not a ``.yaml``/``.yml`` is a checkpoint path, directory or glob
    of a known model family (:mod:`equiaudit.cli.auto_config`); ``data`` sets ``data.path``,
    ``sets`` are ``KEY=VALUE`` overrides applied last."""
    from equiaudit.cli.auto_config import detect_family, family_config, is_config_path, parse_sets, with_source
    from equiaudit.io.checkpoints import discover_checkpoints
    from equiaudit.io.config import apply_overrides, parse_config

    def settings():
        chosen = parse_sets(sets)
        if is_config_path(config_path):
            config = load_config(config_path, {**overrides, "data.path": data, **chosen})
            paths = [str(p) for p in checkpoint_args] or ([str(config.checkpoints)] if config.checkpoints else [])
        else:  # no config: the files say which family they are
            paths = [str(config_path), *map(str, checkpoint_args)]
            detected = detect_family(discover_checkpoints(paths), allow_torchscript=allow_torchscript)
            raw = family_config(detected, data=None if data is None else str(data), sets=chosen, paths=paths)
            config = parse_config(apply_overrides(apply_overrides(raw, overrides), chosen))
        if config.model.family is not None and paths:
            config = with_source(config, detect_family(discover_checkpoints(paths), allow_torchscript=allow_torchscript))
            if config.model.source is None and not config.model.kwargs.get("checkpoint") and not watch:
                raise ConfigError(f"model.family {config.model.family}: none of {', '.join(paths)} is a "
                                  f"{config.model.family} checkpoint to build the model from")
        if not paths:
            raise ConfigError("no checkpoints: give CHECKPOINT_PATH arguments or set checkpoints.path in the config")
        if interval <= 0:
            raise ConfigError(f"--interval={interval} must be a positive number of seconds")
        if not 0 < threshold < 1:
            raise ConfigError(f"--threshold={threshold} must be a fraction between 0 and 1 (0.02 = 2 %)")
        if tensorboard is not None:
            require_tensorboard()  # before the audit, not after it
        if wandb is not None:
            from equiaudit.report.wandb import require_wandb

            require_wandb()
        return config, paths

    from equiaudit.cli.scale_command import scaled

    # Under torchrun every rank checks the settings, and rank 0 alone reports what is wrong.
    with scaled(options or {}, device=device, watch=watch, stderr=stderr) as scale:
        config, paths = scale.agree(settings, "reading the config")
        if scale.shard is not None:
            return scale.run_shard(config, paths, out, device=device, debug=debug)
        return _audit(config, paths, out, scale=scale, device=device, output_format=output_format, stdout=stdout,
                      stderr=stderr, force=force, watch=watch, interval=interval, plot=plot, threshold=threshold, debug=debug,
                      tensorboard=tensorboard, allow_torchscript=allow_torchscript, wandb=wandb)


def _audit(config, paths, out, *, scale, device, output_format, stdout, stderr, force, watch, interval, plot, threshold,
           debug, tensorboard=None, allow_torchscript=False, wandb=None) -> int:
    skipped: list = []
    refs = [] if watch else scale.discover(paths, skipped=skipped)  # in watch mode the run may still be empty
    if config.model.family is not None and refs:
        # A family's run holds files that are not its checkpoints (metatrain's composition
        # model, scaler, exported model.pt): recognised from their contents and listed, not failed.
        from equiaudit.cli.auto_config import detect_family, split_refs

        refs, not_audited = split_refs(refs, detect_family(refs, allow_torchscript=allow_torchscript),
                                       allow_torchscript=allow_torchscript)
        skipped.extend(not_audited)
    audit = scale.open(config, device)
    folder = OutputFolder(out)
    title = audit_title(audit)
    if scale.main:
        announce_chunking(audit, stderr, debug)

    def render(rows: list[dict]) -> None:
        _render(rows, folder, title=title, output_format=output_format, plot=plot, threshold=threshold, stdout=stdout,
                compact=watch, tensorboard=tensorboard, config_hash=config.settings_hash())

    if watch:
        stderr.print(f"watching {escape(', '.join(paths))} every {interval:g} s: {_banner(audit)}; Ctrl-C to stop", highlight=False)
        events = _events(None, stderr, debug, audit.prepared.n_samples)
        shown = events.on_result
        events.on_result = lambda result: (shown(result), render(result.rows()))
        events.on_cached = render
        with SignalStop() as stop:  # around the wind-down too: signals are ignored there
            with Runner(audit, folder, force=force, events=events) as runner:
                latest = runner.watch(paths, interval=interval, stop=stop)
                stop.ended()
            failed = sum(not r.ok for r in latest.values())
            stderr.print(f"stopped watching: {len(latest)} checkpoint(s) audited; results in {escape(str(folder.summary))}", highlight=False)
            code = _written(folder, failed, output_format=output_format, stdout=stdout, stderr=stderr, plot=plot,
                            tensorboard=tensorboard)
            return _log_wandb(wandb, folder, config, stderr) or code
    else:
        if scale.main:
            stderr.print(f"auditing {len(refs)} checkpoint(s) of {_banner(audit)}", highlight=False)
            say_discovered(refs, skipped, stderr)
        results, rows = scale.audit(audit, refs, folder, force=force, console=stderr, debug=debug)
        if not scale.main:
            return 0  # rank 0 reports (and exits 1 when a checkpoint failed)
        code = report_rows(audit, folder, results, rows, output_format=output_format, stdout=stdout, stderr=stderr,
                           plot=plot, threshold=threshold, tensorboard=tensorboard)
        return _log_wandb(wandb, folder, config, stderr) or code


def _log_wandb(project: str | None, folder: OutputFolder, config, stderr: Console) -> int:
    """``--wandb PROJECT``: the rows of these settings in OUT as one W&B run (0, or 1 when W&B failed)."""
    if project is None:
        return 0
    from equiaudit.report.wandb import write_wandb

    try:
        where = write_wandb(read_rows(folder.summary), project, out=folder.path, config=config.raw,
                            config_hash=config.settings_hash())
    except Exception as exc:  # the audit is written; a logging failure must not hide it
        stderr.print(f"[bold red]error:[/] --wandb {escape(project)}: {escape(type(exc).__name__)}: {escape(str(exc))}",
                     highlight=False, soft_wrap=True)
        return 1
    stderr.print(f"logged to W&B project {escape(project)} ({escape(where)})", highlight=False)
    return 0


def report_rows(audit: OpenAudit, folder: OutputFolder, results: Sequence[AuditResult], rows: list[dict], *,
                output_format: str, stdout: Console, stderr: Console, plot: bool, threshold: float,
                tensorboard: Path | None = None) -> int:
    """The end of an audit (or a merge): the table or JSON, the folder's products (plots,
    report.html), the breakdowns asked for, what was written; returns the exit code (1 when a
    checkpoint failed)."""
    _render(rows, folder, title=audit_title(audit), output_format=output_format, plot=plot, threshold=threshold,
            stdout=stdout, tensorboard=tensorboard, config_hash=audit.config.settings_hash())
    breakdown = audit.plan.breakdown
    if output_format != "json" and breakdown is not None and breakdown.by:
        print_breakdowns(stdout, folder.breakdown, breakdown.by, config_hash=audit.config.settings_hash())
    return _written(folder, sum(not r.ok for r in results), output_format=output_format, stdout=stdout, stderr=stderr,
                    plot=plot, tensorboard=tensorboard)


def _render(rows: list[dict], folder: OutputFolder, *, title: str, output_format: str, plot: bool, threshold: float,
            stdout: Console, compact: bool = False, tensorboard: Path | None = None, config_hash: str | None = None) -> None:
    if output_format == "json":
        # --watch prints one compact array per batch of new rows (one JSON document per line).
        print(json.dumps(rows, default=str, indent=None if compact else 2), flush=True)
    else:
        stdout.print(summary_table(rows, title=title, threshold=threshold))
    write_products(folder, title=title, threshold=threshold, plot=plot)
    if tensorboard is not None:
        # The whole trajectory of these settings in OUT (cached checkpoints included), rewritten each time.
        write_tensorboard(read_rows(folder.summary), tensorboard, config_hash=config_hash)


def _written(folder: OutputFolder, failed: int, *, output_format: str, stdout: Console, stderr: Console, plot: bool,
             tensorboard: Path | None = None) -> int:
    if output_format != "json":
        written = [folder.summary, folder.run_json] + ([folder.plot] if plot else []) + [folder / folder.REPORT]
        written += [folder / name for name in (folder.DYNAMICS, folder.TWIRL) if (folder / name).is_file()]
        written += [tensorboard] if tensorboard else []
        stdout.print(f"wrote {escape(', '.join(map(str, written)))}", highlight=False)
    if failed:
        stderr.print(f"{failed} checkpoint(s) failed; the others were audited and written", highlight=False)
    return 1 if failed else 0

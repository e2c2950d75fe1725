"""``equiaudit audit`` beyond one process (``torchrun`` ranks, ``--shard I/N``) and ``equiaudit merge``.

:func:`scaled` gives the audit command a :class:`LocalScale` (one process, the default), a
:class:`RankScale` (under ``torchrun``: rank 0 finds the checkpoints and reports, every
rank evaluates) or a shard; the work itself is :mod:`equiaudit.distributed` and
:mod:`equiaudit.shards`. This module only parses, prints and maps errors to exit codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from equiaudit.cli.audit_command import _banner, _events, audit_with_progress, progress_bars, report_rows
from equiaudit.distributed import DEFAULT_TIMEOUT, MODES, DistributedRun, Quiet, Stopped, World, session
from equiaudit.errors import ConfigError
from equiaudit.io.checkpoints import discover_checkpoints
from equiaudit.io.layout import OutputFolder
from equiaudit.runner import OpenAudit, open_audit
from equiaudit.shards import ShardSpec, merge_shards, parse_shard, run_shard

__all__ = ["scaled", "LocalScale", "RankScale", "run_merge_command"]


class LocalScale:
    """One process: what ``equiaudit audit`` always did."""

    main = True
    shard: ShardSpec | None = None

    def __init__(self, *, mode: str = "auto", compile_model: bool = False, stderr: Console | None = None):
        self.mode, self.compile_model, self.stderr = mode, compile_model, stderr

    def agree(self, call, what: str):
        """``call()``; under torchrun, on every rank, with one report of an error (see :meth:`Session.agree`)."""
        return call()

    def discover(self, paths: Sequence[str], skipped: list | None = None):
        return discover_checkpoints(paths, skipped=skipped)

    def open(self, config, device: str) -> OpenAudit:
        return open_audit(config, device=device, compile=self.compile_model)

    def audit(self, audit: OpenAudit, refs, folder: OutputFolder, *, force: bool, console: Console, debug: bool):
        results, rows = audit_with_progress(audit, refs, folder, force=force, console=console, debug=debug)
        _say_target(audit, results, console)
        return results, rows

    def run_shard(self, config, paths: Sequence[str], out: Path, *, device: str, debug: bool) -> int:
        """``--shard I/N``: this part's statistics into ``OUT/shards``; ``merge`` combines them."""
        shard, stderr = self.shard, self.stderr
        refs = self.discover(paths)
        audit = self.open(config, device)
        stderr.print(f"shard {shard}: {len(refs)} checkpoint(s) of {_banner(audit)}", highlight=False)
        progress = progress_bars(stderr)
        failed = []
        with progress:
            events = _events(progress, stderr, debug, len(audit.prepared))
            shown = events.on_result
            events.on_result = lambda share: (failed.append(share) if not share.ok else None, shown(share))
            manifest = run_shard(audit, refs, out, shard, mode=self.mode, events=events,
                                 on_mode=lambda mode, reason: progress.console.print(
                                     f"shard {shard}: splitting by {mode} ({escape(reason)})", highlight=False))
        folder = OutputFolder(out)
        stderr.print(f"shard {shard}: wrote {len(manifest['files'])} part file(s) and "
                     f"{escape(str(folder.shards / f'shard-{shard.index}-of-{shard.count}.json'))}; when all {shard.count} "
                     f"shards are done: equiaudit merge {escape(str(out))}", highlight=False)
        if failed:
            stderr.print(f"shard {shard}: {len(failed)} checkpoint(s) failed (merge reports them)", highlight=False)
        return 1 if failed else 0


class RankScale(LocalScale):
    """One rank of a ``torchrun`` job (see :mod:`equiaudit.distributed`)."""

    def __init__(self, ses, **kwargs):
        super().__init__(**kwargs)
        self.session = ses

    @property
    def main(self) -> bool:
        return self.session.world.main

    def agree(self, call, what: str):
        return self.session.agree(call, what)

    def discover(self, paths: Sequence[str], skipped: list | None = None):
        # One list for every rank: training may add checkpoints while the ranks start.
        return self.session.on_main(lambda: discover_checkpoints(paths, skipped=skipped), "finding the checkpoints")

    def open(self, config, device: str) -> OpenAudit:
        ses = self.session
        return ses.agree(lambda: open_audit(config, device=ses.device, compile=self.compile_model), "opening the data and model")

    def audit(self, audit: OpenAudit, refs, folder: OutputFolder, *, force: bool, console: Console, debug: bool):
        ses = self.session
        progress = progress_bars(console) if ses.world.main else contextlib.nullcontext()
        with progress:
            events = _events(progress, console, debug, len(audit.prepared)) if ses.world.main else None

            def on_mode(mode: str, reason: str) -> None:
                progress.console.print(f"distributed over {ses.size} ranks ({ses.backend}, {escape(ses.device)} on rank 0): "
                                       f"splitting by {mode} ({escape(reason)})", highlight=False)

            with DistributedRun(ses, audit, folder, force=force, events=events, mode=self.mode, on_mode=on_mode) as run:
                results, rows = run.run(refs)
        if ses.world.main:
            if len(results) < len(refs):
                console.print(f"{len(refs) - len(results)} checkpoint(s) already audited with these settings "
                              f"(from {escape(str(folder / folder.CACHE))})", highlight=False)
            _say_target(audit, results, console)
        return results, rows


def _say_target(audit: OpenAudit, results, console: Console) -> None:
    """``--target-ci``: how many samples each checkpoint needed."""
    width = audit.plan.target_ci
    if width is None:
        return
    n = len(audit.prepared)
    for result in results:
        if not result.ok:
            continue
        total = result.total
        half = (total.rel_equiv_error_ci_high - total.rel_equiv_error_ci_low) / 2
        verdict = "reached" if half <= width else "not reached: the data ran out"
        console.print(f"--target-ci {width:g}: {escape(result.checkpoint)} used {total.n_samples} of {n} samples "
                      f"(95 % CI ±{half:.3g}; {verdict})", highlight=False)


@contextlib.contextmanager
def scaled(options: Mapping[str, Any], *, device: str, watch: bool, stderr: Console) -> Iterator[LocalScale]:
    """The scale the options and the environment ask for; under ``torchrun``, inside its
    process group. ``options``: ``distribute`` (auto | samples | checkpoints),
    ``dist_timeout`` (seconds), ``shard`` ("I/N"), ``compile`` (bool)."""
    world = World.from_env()
    timeout = options.get("dist_timeout")
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)

    def check() -> tuple[ShardSpec | None, dict[str, Any]]:
        mode = options.get("distribute") or "auto"
        if mode not in MODES:
            raise ConfigError(f"--distribute={mode!r} is not allowed; allowed: {', '.join(MODES)}")
        shard = parse_shard(options["shard"]) if options.get("shard") else None
        if watch and (shard is not None or world.size > 1):
            raise ConfigError("--watch runs in one process: drop --shard / torchrun, or audit the finished run without --watch")
        if shard is not None and world.size > 1:
            raise ConfigError(f"--shard {shard} under torchrun (WORLD_SIZE={world.size}): use one or the other")
        return shard, {"mode": mode, "compile_model": bool(options.get("compile")), "stderr": stderr}

    if world.size <= 1:
        shard, common = check()
        scale = LocalScale(**common)
        scale.shard = shard
        yield scale
        return
    try:
        with session(world, device=device, timeout=timeout) as ses:
            _, common = ses.agree(check, "checking the options")
            yield RankScale(ses, **common)
    except Stopped as stop:
        stderr.print(f"[bold red]error:[/] {escape(stop.message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except Quiet as quiet:  # rank 0 says it
        raise typer.Exit(int(quiet.code or 1)) from None


def run_merge_command(*, out: Path, output_format: str, plot: bool, threshold: float, stdout: Console, stderr: Console,
                      debug: bool = False, config_path: Path | None = None) -> int:
    """Body of ``equiaudit merge``; returns the exit code. ``config_path``: the user's own
    config, the only source of the model merge builds (for ``--dynamics``)."""
    from equiaudit.io.config import load_config

    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold={threshold} must be a fraction between 0 and 1 (0.02 = 2 %)")
    config = load_config(config_path) if config_path is not None else None
    events = _events(None, stderr, debug, 0)
    audit, results, rows = merge_shards(out, config=config, events=events)
    folder = OutputFolder(out)
    stderr.print(f"merged {len(results)} checkpoint(s) from {escape(str(folder.shards))}", highlight=False)
    return report_rows(audit, folder, results, rows, output_format=output_format, stdout=stdout, stderr=stderr,
                       plot=plot, threshold=threshold)

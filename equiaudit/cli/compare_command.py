"""``equiaudit compare``: REE trajectories of several runs side by side, and steps-to-threshold.

Each source is an audit output directory (its ``summary.csv`` is read, nothing recomputed)
or a checkpoint run directory, audited first with ``--config`` into
``OUT/audits/<run>-<hash>/`` through the same result cache as ``equiaudit audit``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from rich.markup import escape

from equiaudit.cli.audit_command import audit_with_progress
from equiaudit.errors import ConfigError, EquiauditError
from equiaudit.io.checkpoints import discover_checkpoints
from equiaudit.io.config import load_config
from equiaudit.io.layout import OutputFolder
from equiaudit.report.compare import (
    COMPARE_COLUMNS, EFFICIENCY_COLUMNS, X_AXES, compare_rows, compare_table, efficiency_rows, trajectories, unique_names,
)
from equiaudit.report.summary import read_rows, write_rows
from equiaudit.runner import open_audit

__all__ = ["run_compare_command"]


def _audit_dir(out: OutputFolder, run_dir: Path) -> OutputFolder:
    """Where a run directory's audit goes: stable across invocations, distinct for distinct runs."""
    digest = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    return OutputFolder(out / out.AUDITS / f"{run_dir.name}-{digest}")


def _origin(source: Path, run: str, *, audited: bool) -> Path:
    """Where a run comes from, to tell runs of the same name apart: the run's own directory
    (``source`` or, for ``<run>/checkpoints``, the folder above), or the audit output holding it."""
    source = source.resolve()
    return next((p for p in (source, *source.parents) if p.name == run), source) if audited else source


def _describe(out_dir: OutputFolder) -> tuple[str | None, str | None]:
    """(task, group) from an audit output's ``run.json``, if there is one."""
    meta = out_dir.read_run_json()
    return meta.get("task"), meta.get("group")


def run_compare_command(
    *,
    sources: Sequence[str],
    config_path: Path | None,
    threshold: float,
    x: str,
    out: Path,
    device: str = "auto",
    force: bool = False,
    plot: bool = True,
    output_format: str = "table",
    stdout: Console,
    stderr: Console,
) -> int:
    """Body of ``equiaudit compare``; returns the exit code."""
    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold={threshold} must be a fraction between 0 and 1 (0.02 = 2 %)")
    if x not in X_AXES:
        raise ConfigError(f"--x={x!r} is not allowed; allowed: {', '.join(X_AXES)}")
    if not sources:
        raise ConfigError("compare needs at least one audit output or run directory")
    config = load_config(config_path) if config_path is not None else None
    folder = OutputFolder(out)
    audit = None
    runs: list[tuple[str, Path, list[dict]]] = []  # (run name, where it came from, summary rows)
    described: set[tuple[str | None, str | None]] = set()
    failed = 0
    for source in map(Path, sources):
        if OutputFolder(source).summary.is_file():
            audit_out, audited = OutputFolder(source), False
        elif source.is_dir():
            if config is None:
                raise ConfigError(f"{source}: no summary.csv here; give --config to audit it as a checkpoint run")
            refs = discover_checkpoints([source])
            audit = audit or open_audit(config, device=device)
            audit_out, audited = _audit_dir(folder, source), True
            stderr.print(f"auditing {escape(str(source))} ({len(refs)} checkpoint(s)) into {escape(str(audit_out))}", highlight=False)
            results, _ = audit_with_progress(audit, refs, audit_out, force=force, console=stderr)
            failed += sum(not r.ok for r in results)
        else:
            raise ConfigError(f"{source}: not an audit output (summary.csv) or a checkpoint run directory")
        described.add(_describe(audit_out))
        rows = read_rows(audit_out.summary)
        for name in dict.fromkeys(r["run"] for r in rows):
            runs.append((name, _origin(source, name, audited=audited), [r for r in rows if r["run"] == name]))

    names = unique_names([(name, origin) for name, origin, _ in runs])
    trajs = [t for label, (_, _, rows) in zip(names, runs) for t in trajectories(rows, x=x, run=label)]
    if not trajs:
        raise EquiauditError("nothing to compare: no successfully audited checkpoint with a known step in the sources")
    for label in dict.fromkeys(names):
        if not any(t.run == label for t in trajs):
            stderr.print(f"[yellow]warning:[/] {escape(label)}: no successfully audited checkpoint with a known step", highlight=False)
    rows = compare_rows(trajs, threshold=threshold, x=x)
    extra = [c for c in rows[0] if c not in COMPARE_COLUMNS]
    write_rows(folder / folder.COMPARE, rows, columns=COMPARE_COLUMNS + tuple(extra))
    # The efficiency view: held-out loss against wall-clock hours (checkpoint times), every run.
    timed = [t for label, (_, _, run_rows) in zip(names, runs) for t in trajectories(run_rows, x="time", run=label)]
    efficiency = efficiency_rows(timed) if len({t.run for t in timed}) > 1 else []
    if efficiency:
        write_rows(folder / folder.EFFICIENCY, efficiency, EFFICIENCY_COLUMNS)

    tasks = ", ".join(sorted({t for t, _ in described if t} | ({config.task} if config else set()))) or "unknown task"
    groups = ", ".join(sorted({g for _, g in described if g})) or "unknown group"
    title = f"REE over training · {tasks} · {groups}"
    written = [folder / folder.COMPARE]
    if plot:
        from equiaudit.report.plot import efficiency_figure, save_figure, trajectory_figure

        written.append(save_figure(trajectory_figure(trajs, threshold=threshold, x=x, title=title), folder / folder.COMPARE_PLOT))
        if efficiency:
            written.append(save_figure(efficiency_figure(timed, efficiency, title=title), folder / folder.EFFICIENCY_PLOT))
    from equiaudit.report.html import write_report

    written.append(write_report(folder, title=title, threshold=threshold))
    if output_format == "json":
        print(json.dumps(rows, default=str, indent=2))
    else:
        stdout.print(compare_table(rows, trajs, title=f"{title} · threshold {100 * threshold:g} %"))
        for row in efficiency:
            stdout.print(f"  {escape(row['run'])}: held-out L_aug {row['loss_target']:.4g} after {row['hours_to_target']:.3g} h"
                         f" (speed-up needed to match the fastest: {row['speedup_needed']:.3g}×)", highlight=False)
        stdout.print(f"wrote {escape(', '.join(map(str, written)))}", highlight=False)
    if failed:
        stderr.print(f"{failed} checkpoint(s) failed to audit; the others are compared", highlight=False)
    return 1 if failed else 0

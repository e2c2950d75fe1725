"""``equiaudit audit``: the loop over checkpoints, with progress, CSV and run.json."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from equiaudit import __version__
from equiaudit.audit import AuditPlan, CheckpointResult, audit_checkpoint, prepare_audit
from equiaudit.errors import ConfigError
from equiaudit.io.checkpoints import CheckpointRef, discover_checkpoints
from equiaudit.io.config import load_config
from equiaudit.report.summary import atomic_write_text, merge_rows, read_rows, result_rows, write_rows
from equiaudit.report.table import summary_table

__all__ = ["run_audit_command", "audit_into"]


def _run_metadata(plan: AuditPlan, results: Sequence[CheckpointResult], started: float) -> dict[str, Any]:
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
    }


def audit_into(
    plan: AuditPlan,
    refs: Sequence[CheckpointRef],
    out: Path,
    *,
    progress: Progress | None = None,
    on_result=None,
) -> tuple[list[CheckpointResult], list[dict]]:
    """Audit ``refs`` with ``plan`` and merge the rows into ``out/summary.csv`` after each one.

    Writing after every checkpoint means an interrupted audit loses at most the one in flight.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.csv"
    config_hash = plan.config.settings_hash()
    head_order = [h.name for h in plan.spec.heads]
    results: list[CheckpointResult] = []
    new_rows: list[dict] = []
    started = time.time()
    ckpt_task = progress.add_task("checkpoints", total=len(refs)) if progress else None
    batch_task = progress.add_task("samples", total=plan.n_samples) if progress else None
    for ref in refs:
        if progress:
            progress.update(ckpt_task, description=f"[bold]{ref.name}")
            progress.reset(batch_task, total=plan.n_samples)
        on_batch = (lambda done, total: progress.update(batch_task, completed=done)) if progress else None
        result = audit_checkpoint(plan, ref, on_batch=on_batch)
        results.append(result)
        rows = result_rows(
            result,
            n_rotations=plan.rotation_set.n_rotations,
            group=plan.rotation_set.group,
            config_hash=config_hash,
            head_order=head_order,
        )
        new_rows.extend(rows)
        write_rows(summary_path, merge_rows(read_rows(summary_path), rows))
        atomic_write_text(out / "run.json", json.dumps(_run_metadata(plan, results, started), indent=2, default=str) + "\n")
        if on_result is not None:
            on_result(result, rows)
        if progress:
            progress.advance(ckpt_task)
    return results, new_rows


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
) -> int:
    """Body of ``equiaudit audit``; returns the exit code."""
    config = load_config(config_path, overrides)
    paths = list(checkpoint_args) or ([config.checkpoints] if config.checkpoints else [])
    if not paths:
        raise ConfigError("no checkpoints: give CHECKPOINT_PATH arguments or set checkpoints.path in the config")
    refs = discover_checkpoints(paths)
    plan = prepare_audit(config, device=device)
    stderr.print(
        f"auditing {len(refs)} checkpoint(s) of task [bold]{config.task}[/] on {plan.n_samples} samples × "
        f"{plan.rotation_set.n_rotations} rotations ({plan.rotation_set.group}"
        f"{', exact' if plan.rotation_set.exact else ''}) on {plan.device}",
        highlight=False,
    )
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True,
    )

    def report_failure(result: CheckpointResult, rows) -> None:
        if not result.ok:
            progress.console.print(f"[bold red]error:[/] {result.message}", highlight=False, soft_wrap=True)

    with progress:
        results, rows = audit_into(plan, refs, out, progress=progress, on_result=report_failure)
    if output_format == "json":
        print(json.dumps(rows, default=str, indent=2))
    else:
        title = f"{config.task} · {plan.rotation_set.group} · K={plan.rotation_set.n_rotations} · N={plan.n_samples}"
        stdout.print(summary_table(rows, title=title))
        stdout.print(f"wrote {out / 'summary.csv'} and {out / 'run.json'}", highlight=False)
    failed = sum(not r.ok for r in results)
    if failed:
        stderr.print(f"{failed} of {len(results)} checkpoint(s) failed; the others were audited and written", highlight=False)
    return 1 if failed else 0

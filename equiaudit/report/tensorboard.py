"""``equiaudit audit ... --tensorboard DIR``: the REE trajectory as TensorBoard scalars.

One point per audited checkpoint with a known step, at that step, under the names the
training callbacks log (:func:`equiaudit.result.scalars`): ``equiaudit/rel_equiv_error``,
``equiaudit/loss_aug``, ``equiaudit/loss_sym`` and ``equiaudit/<head>/...``. Pointed at a
run's own TensorBoard directory (``lightning_logs/version_0``, an HF ``runs/...``), the
scalars overlay its training curves on the same step axis; each point's wall time is the
checkpoint's modification time where known.

The points come from ``summary.csv`` rows (read back as strings: every ``ok`` row of the
settings audited, cached ones included). One run goes into ``DIR`` itself; several runs
each into ``DIR/<run>``. The event files carry the suffix :data:`SUFFIX`; writing again
replaces the earlier ones of equiaudit in that directory (and no other file), so a re-run
or ``--watch`` leaves one copy of every point. TensorBoard stores scalars as float32.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from equiaudit.errors import ConfigError
from equiaudit.io.tables import step_key
from equiaudit.result import scalars

__all__ = ["SUFFIX", "require_tensorboard", "trajectory_points", "write_tensorboard"]

SUFFIX = ".equiaudit"


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line ConfigError when ``tensorboard`` is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'equiaudit[tensorboard]'") from None
    return SummaryWriter


def trajectory_points(rows: Iterable[Mapping[str, Any]], *, config_hash: str | None = None,
                      prefix: str = "equiaudit") -> dict[str, list[tuple[int, float | None, dict[str, float]]]]:
    """``{run: [(step, walltime or None, scalars), ...]}`` in step order, from ``summary.csv``
    rows: ``ok`` rows with a step, of ``config_hash`` when given, one point per checkpoint."""
    checkpoints: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("status") != "ok" or step_key(row)[0] != 0:
            continue
        if config_hash is not None and (row.get("config_hash") or "") != config_hash:
            continue
        checkpoints.setdefault((row.get("run") or "", row.get("checkpoint") or ""), []).append(row)
    runs: dict[str, list[tuple[int, float | None, dict[str, float]]]] = {}
    for (run, _), group in checkpoints.items():
        values = scalars(group, prefix)
        if not values:
            continue
        stamp = group[0].get("checkpoint_time")
        walltime = float(stamp) if stamp not in (None, "") else None
        runs.setdefault(run, []).append((int(group[0]["step"]), walltime, values))
    return {run: sorted(points, key=lambda p: p[0]) for run, points in sorted(runs.items())}


def _run_folder(run: str) -> str:
    """A run name as one safe folder name (no separators, no ``..``)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", run).strip(".") or "run"


def write_tensorboard(rows: Iterable[Mapping[str, Any]], directory: str | Path, *, config_hash: str | None = None,
                      prefix: str = "equiaudit") -> int:
    """Write the trajectory of ``rows`` (see the module docstring) under ``directory``;
    returns the number of points (checkpoints) written."""
    SummaryWriter = require_tensorboard()
    directory = Path(directory)
    runs = trajectory_points(rows, config_hash=config_hash, prefix=prefix)
    written = 0
    for run, points in runs.items():
        folder = directory if len(runs) == 1 else directory / _run_folder(run)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"events.out.tfevents.*{SUFFIX}"):
            old.unlink()
        writer = SummaryWriter(log_dir=str(folder), filename_suffix=SUFFIX)
        try:
            for step, walltime, values in points:
                for name, value in values.items():
                    writer.add_scalar(name, value, global_step=step, walltime=walltime)
                written += 1
        finally:
            writer.close()
    return written

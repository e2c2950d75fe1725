"""``equiaudit audit ... --wandb PROJECT``: the audit as one Weights & Biases run.

Modelled on :mod:`equiaudit.report.tensorboard`: the points are the ``ok`` rows of
``summary.csv`` with a step (cached checkpoints included), one point per checkpoint at its
step, under the names the training callbacks log (:func:`equiaudit.result.scalars`):
``equiaudit/rel_equiv_error``, ``equiaudit/loss_aug``, ``equiaudit/loss_sym``,
``equiaudit/<head>/...``. W&B draws each as a line plot against the step. The whole summary
(every row, failures included) goes in as a table, ``equiaudit/summary``; the run's config is
the audit's config, its summary the last checkpoint's figures.

One audit is one W&B run (named after the output folder, ``job_type="equiaudit"``). Several
training runs audited together each get their own keys, ``<run>/equiaudit/...``, since a W&B
run has one step axis. The run's files go under ``OUT/wandb/``; ``WANDB_MODE=offline`` keeps
them there (``wandb sync`` uploads them later). Needs ``pip install 'equiaudit[wandb]'``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from equiaudit.errors import ConfigError
from equiaudit.report.tensorboard import trajectory_points

__all__ = ["require_wandb", "write_wandb", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ("run", "checkpoint", "step", "head", "weights", "loss_aug", "loss_sym", "equiv_error",
                   "rel_equiv_error", "rel_equiv_error_ci_low", "rel_equiv_error_ci_high", "n_samples",
                   "n_rotations", "group", "status", "message")


def require_wandb():
    """The ``wandb`` module, or a one-line ConfigError when it is not installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs the wandb package: pip install 'equiaudit[wandb]'") from None
    return wandb


def _cell(value: Any) -> Any:
    """A CSV string as a number where it is one (W&B tables want one type per column)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def write_wandb(rows: Iterable[Mapping[str, Any]], project: str, *, out: str | Path, config: Mapping[str, Any] | None = None,
                config_hash: str | None = None, name: str | None = None) -> str:
    """Log the audit's ``rows`` to a new W&B run of ``project``; returns the run's folder."""
    wandb = require_wandb()
    rows = [dict(row) for row in rows if config_hash is None or (row.get("config_hash") or "") == config_hash]
    runs = trajectory_points(rows)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=name or directory.resolve().name, job_type="equiaudit", dir=str(directory),
                     config=dict(config or {}), reinit="finish_previous")
    try:
        steps: dict[int, dict[str, float]] = {}
        for run_name, points in runs.items():
            prefix = "" if len(runs) == 1 else f"{run_name}/"
            for step, _, values in points:
                steps.setdefault(step, {}).update({prefix + key: value for key, value in values.items()})
        for key in {k for values in steps.values() for k in values}:
            run.define_metric(key, summary="last")
        for step in sorted(steps):
            run.log(steps[step], step=step)
        columns = [c for c in SUMMARY_COLUMNS if any(c in row for row in rows)]
        table = wandb.Table(columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in rows])
        run.log({"equiaudit/summary": table}, step=max(steps) if steps else None)
        return str(Path(run.dir).parent)  # the run folder (run.dir is its files/)
    finally:
        run.finish()

"""``summary.csv``: tidy long format, one row per checkpoint × head (DESIGN.md §4).

Rows are plain dicts keyed by column name; numbers are written with ``repr`` precision
so a re-read gives the same floats. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from equiaudit.io.atomic import atomic_write_text

__all__ = [
    "SUMMARY_COLUMNS",
    "EXTRA_COLUMNS",
    "result_rows",
    "read_rows",
    "write_rows",
    "merge_rows",
    "atomic_write_text",
]

SUMMARY_COLUMNS = (
    "run", "checkpoint", "step", "head", "loss_aug", "loss_sym", "equiv_error", "rel_equiv_error",
    "rel_equiv_error_ci_low", "rel_equiv_error_ci_high", "n_samples", "n_rotations", "group", "status",
)
# Always written after the contract's columns, in this order (empty where not measured).
# `epoch` and `checkpoint_time` (the checkpoint's mtime, Unix seconds) let plots use other x axes.
EXTRA_COLUMNS = ("median_rel_equiv_error", "message", "config_hash", "seconds", "epoch", "checkpoint_time")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else repr(value)  # NaN → empty
    return str(value)


def result_rows(result, *, n_rotations: int, group: str, config_hash: str, head_order: Sequence[str]) -> list[dict]:
    """Rows for one :class:`~equiaudit.audit.CheckpointResult`: ``total`` first, then each head.

    A failed checkpoint gets a single ``total`` row with empty numbers and its status.
    """
    base = {
        "run": result.ref.run,
        "checkpoint": result.ref.name,
        "step": result.step,
        "n_rotations": n_rotations,
        "group": group,
        "status": result.status,
        "message": result.message,
        "config_hash": config_hash,
        "seconds": round(result.seconds, 3),
    }
    if not result.ok:
        return [{**base, "head": "total"}]
    rows = []
    for head in ("total", *head_order):
        s = result.summaries[head]
        row = {
            **base,
            "head": head,
            "loss_aug": s.loss_aug,
            "loss_sym": s.loss_sym,
            "equiv_error": s.equiv_error,
            "rel_equiv_error": s.rel_equiv_error,
            "rel_equiv_error_ci_low": s.ci_low,
            "rel_equiv_error_ci_high": s.ci_high,
            "n_samples": s.n_samples,
            "median_rel_equiv_error": s.median_rel_equiv_error,
        }
        row.update(result.extras.get(head, {}))
        rows.append(row)
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """Rows of an existing CSV as dicts of strings (empty list when absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _step_key(row: dict):
    step = row.get("step")
    try:
        return (0, int(step))
    except (TypeError, ValueError):
        return (1, 0)


def merge_rows(existing: Iterable[dict], new: Iterable[dict]) -> list[dict]:
    """Keep existing rows unless a new row has the same run, checkpoint and settings.

    The result is ordered by run, step, checkpoint, with ``total`` first in each.
    """
    new = list(new)
    replaced = {(r["run"], r["checkpoint"], r.get("config_hash", "")) for r in new}
    kept = [r for r in existing if (r["run"], r["checkpoint"], r.get("config_hash", "")) not in replaced]
    rows = kept + new
    rows.sort(key=lambda r: (r["run"], _step_key(r), r["checkpoint"], r["head"] != "total"))
    return rows


def write_rows(path: str | Path, rows: Sequence[dict], columns: Sequence[str] = SUMMARY_COLUMNS + EXTRA_COLUMNS) -> None:
    """Write rows with ``columns`` first, then any other keys in first-seen order."""
    header = list(columns)
    for row in rows:
        header.extend(k for k in row if k not in header)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in header})
    atomic_write_text(path, buffer.getvalue())

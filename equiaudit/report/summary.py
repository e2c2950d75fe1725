"""``summary.csv``: tidy long format, one row per checkpoint × head; and the merge rule of every output CSV.

Rows are plain dicts keyed by column name (:meth:`equiaudit.result.AuditResult.rows`); numbers
are written with ``repr`` precision so a re-read gives the same floats. Text cells that a
spreadsheet would evaluate get a leading ``'`` (:func:`equiaudit.io.layout.csv_cell`, removed
again on reading). Files are written atomically (:mod:`equiaudit.io.atomic`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from equiaudit.io.atomic import atomic_write_text
from equiaudit.io.layout import csv_cell, read_csv
from equiaudit.result import EXTRA_COLUMNS, SUMMARY_COLUMNS

__all__ = ["SUMMARY_COLUMNS", "EXTRA_COLUMNS", "read_rows", "write_rows", "merge_rows", "step_key"]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else repr(value)  # NaN → empty
    return csv_cell(str(value))  # a name such as "=HYPERLINK(…)" is not evaluated by a spreadsheet


def read_rows(path: str | Path) -> list[dict]:
    """Rows of an existing CSV as dicts of strings (empty list when absent)."""
    return read_csv(Path(path))


def step_key(row: dict):
    """Sort key of a row's step: known steps in order, unknown ones last."""
    step = row.get("step")
    try:
        return (0, int(step))
    except (TypeError, ValueError):
        return (1, 0)


def merge_rows(existing: Iterable[dict], new: Iterable[dict], *, total_first: bool = True) -> list[dict]:
    """Keep existing rows unless a new row has the same run, checkpoint and settings hash.

    The result is ordered by run, step, checkpoint; within a checkpoint ``total`` first
    (``total_first``, summary rows) or in the order the rows came (breakdown rows).
    """
    new = list(new)
    replaced = {(r["run"], r["checkpoint"], r.get("config_hash") or "") for r in new}
    kept = [r for r in existing if (r["run"], r["checkpoint"], r.get("config_hash") or "") not in replaced]
    rows = kept + new

    def key(row):
        order = (row["run"], step_key(row), row["checkpoint"])
        return (*order, row.get("head") != "total") if total_first else order

    return sorted(rows, key=key)  # stable: the order within a checkpoint is kept


def write_rows(path: str | Path, rows: Sequence[dict], columns: Sequence[str] = SUMMARY_COLUMNS + EXTRA_COLUMNS) -> None:
    """Write rows with ``columns`` first, then any other keys in first-seen order."""
    header = list(columns)
    for row in rows:
        header.extend(k for k in row if k not in header)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([csv_cell(str(name)) for name in header])
    for row in rows:
        writer.writerow([_fmt(row.get(k)) for k in header])
    atomic_write_text(path, buffer.getvalue())

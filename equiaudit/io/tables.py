"""Output CSVs: read, write and merge rows (the columns are in :mod:`equiaudit.schema`).

Rows are plain dicts keyed by column name; numbers are written with ``repr`` precision so
a re-read gives the same floats, NaN and None as empty cells. Files are written atomically
(:mod:`equiaudit.io.atomic`). Merging keeps existing rows unless a new row has the same run,
checkpoint and settings hash (the merge rule of every per-checkpoint CSV).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from equiaudit.io.atomic import atomic_write_text
from equiaudit.schema import SUMMARY_COLUMNS, SUMMARY_EXTRA_COLUMNS

__all__ = ["DamagedCSV", "read_csv", "read_rows", "write_rows", "merge_rows", "step_key", "csv_cell", "csv_text",
           "FORMULA_STARTS"]

# Spreadsheet formula injection (OWASP "CSV injection"): a cell starting with one of these is
# evaluated by Excel, LibreOffice and Google Sheets (`=HYPERLINK(…)`, `@SUM(…)`, `+cmd|…`).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_QUOTE = "'"


def csv_cell(text: str) -> str:
    """``text`` as equiaudit writes it in a CSV cell: a text cell that a spreadsheet would
    evaluate (it starts with ``= + - @``, a tab or a carriage return) gets a leading ``'``
    (the OWASP convention; spreadsheets show the text, unevaluated). A number, ``-0.5``,
    ``-inf``, is written as is. A text starting with ``'`` gets one more, so that
    :func:`csv_text` gives back every text exactly."""
    if not text or not (text.startswith(FORMULA_STARTS) or text.startswith(_QUOTE)):
        return text
    if text[0] != _QUOTE:
        try:
            float(text)
            return text  # a number: nothing to evaluate beyond its value
        except ValueError:
            pass
    return _QUOTE + text


def csv_text(cell: str) -> str:
    """The text :func:`csv_cell` wrote in ``cell`` (the leading ``'`` removed)."""
    return cell[1:] if cell.startswith(_QUOTE) else cell


class DamagedCSV(Exception):
    """An output CSV that cannot be read back; ``reason`` says where."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_csv(path: Path, required: Sequence[str] = ()) -> list[dict]:
    """Rows of a CSV written by equiaudit as dicts of strings (empty when absent).

    Raises :class:`DamagedCSV` when the header lacks a ``required`` column or a row has
    more or fewer fields than the header (a torn write by another program, hand edits).
    """
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = [csv_text(name) for name in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DamagedCSV(path, f"its header lacks {', '.join(missing)}")
            rows = []
            for number, cells in enumerate(reader, start=2):
                if not cells:
                    continue  # a blank line (csv.DictReader skips them too)
                if len(cells) != len(header):
                    raise DamagedCSV(path, f"line {number} has {'more' if len(cells) > len(header) else 'fewer'} fields than the header")
                rows.append(dict(zip(header, map(csv_text, cells))))
            return rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DamagedCSV(path, f"not a readable CSV ({type(exc).__name__})") from None


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


def write_rows(path: str | Path, rows: Sequence[dict], columns: Sequence[str] = SUMMARY_COLUMNS + SUMMARY_EXTRA_COLUMNS) -> None:
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

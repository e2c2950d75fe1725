"""``breakdown.csv`` (DESIGN.md §4) and its terminal tables (``audit --by ...``).

Rows come from :func:`equiaudit.breakdown.breakdown_rows` with the checkpoint's identity
(:meth:`equiaudit.result.AuditResult.breakdown_rows`), one per checkpoint × split × head ×
bin; they are merged into the file like summary rows
(:func:`~equiaudit.report.summary.merge_rows`); a split renders as a rich table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.table import Table
from rich.text import Text

from equiaudit.io.tables import read_rows, step_key
from equiaudit.schema import BREAKDOWN_COLUMNS  # (re-exported: the column list lives in the schema)
from equiaudit.report.table import format_number, format_percent

__all__ = ["BREAKDOWN_COLUMNS", "breakdown_table", "print_breakdowns"]


def breakdown_table(rows: Sequence[dict], by: str, *, title: str | None = None) -> Table:
    """One split of one checkpoint's rows: head, bin, L_aug, REE, share of the error, n."""
    table = Table(title=Text(title or f"breakdown by {by}"), header_style="bold", caption="share: part of the total equivariance error")
    for name, justify in (("head", "left"), (by, "left"), ("L_aug", "right"), ("REE", "right"), ("share", "right"), ("n", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    previous = None
    for row in (r for r in rows if r.get("by") == by):
        if previous is not None and row["head"] != previous:
            table.add_section()
        table.add_row(
            Text(str(row["head"])) if row["head"] != previous else Text(""),
            Text(str(row["bin"])),
            format_number(row.get("loss_aug")),
            format_percent(row.get("rel_equiv_error")),
            format_percent(row.get("share")),
            str(row.get("n")),
        )
        previous = row["head"]
    return table


def print_breakdowns(console, path: str | Path, splits: Sequence[str], *, config_hash: str | None = None) -> None:
    """Print ``splits`` of the latest checkpoint (highest step) in the breakdown CSV at ``path``."""
    rows = [r for r in read_rows(path) if config_hash is None or r.get("config_hash") == config_hash]
    if not rows:
        return
    last = max(rows, key=lambda r: (step_key(r), r["run"], r["checkpoint"]))
    latest = [r for r in rows if (r["run"], r["checkpoint"]) == (last["run"], last["checkpoint"])]
    step = f"step {last['step']}" if last.get("step") else last["checkpoint"]
    for by in splits:
        if any(r["by"] == by for r in latest):
            console.print(breakdown_table(latest, by, title=f"breakdown by {by} · {last['run']} · {step}"))
        else:
            console.print(Text(f"no '{by}' breakdown for this audit (it needs per-atom heads, rotation matrices, voxel heads or that field)"), highlight=False)

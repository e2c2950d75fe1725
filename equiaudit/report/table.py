"""Rich tables of audit rows (the same dict rows that go to ``summary.csv``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from equiaudit.floor import AT_FLOOR  # the `flag` of a result within 10× of its float floor
from equiaudit.null import NOT_LEARNED  # the `flag` of a result whose skill is below --min-skill
from equiaudit.result import as_float

__all__ = ["summary_table", "format_percent", "format_interval", "format_number", "format_skill", "ree_mark", "NOT_LEARNED_NOTE"]


def format_number(value) -> str:
    x = as_float(value)
    return "—" if math.isnan(x) else f"{x:.4g}"


def format_percent(value) -> str:
    """``1.23 %`` from a fraction; ``—`` when missing."""
    x = as_float(value)
    return "—" if math.isnan(x) else f"{100 * x:.3g} %"


def format_interval(low, high) -> str:
    """``[1.01, 1.47] %`` from fractions; empty when missing."""
    lo, hi = as_float(low), as_float(high)
    return "" if math.isnan(lo) or math.isnan(hi) else f"[{100 * lo:.3g}, {100 * hi:.3g}]"


# Optional columns shown when some row has them (all fractions, shown in percent).
_EXTRA_HEADERS = {"interp_floor": "interp floor", "float_floor": "float floor", "rel_local_equiv_error": "local (rel)"}
# The caption line of a table holding a not_learned row (its REE greyed, marked †).
NOT_LEARNED_NOTE = ("† not learned: skill = 1 − L_sym/loss_null below --min-skill (the loss is that of a predictor "
                    "ignoring the geometry): its REE says nothing about learned symmetry")


def format_skill(value) -> str:
    x = as_float(value)
    return "—" if math.isnan(x) else f"{x:.3g}"


def ree_mark(flag) -> str:
    """The mark after an REE: `` *`` at the float floor, `` †`` not learned."""
    return " †" if flag == NOT_LEARNED else (" *" if flag == AT_FLOOR else "")


def _ree_style(value, threshold: float) -> str:
    x = as_float(value)
    if math.isnan(x):
        return "dim"
    return "green" if x <= threshold else ("yellow" if x <= 5 * threshold else "red")


def summary_table(rows: Sequence[dict], *, title: str | None = None, threshold: float = 0.02) -> Table:
    """One row per checkpoint × head; REE in percent with its 95 % CI, coloured against ``threshold``."""
    extra = [c for c in _EXTRA_HEADERS if any(r.get(c) not in (None, "") for r in rows)]
    caption = "REE = equivariance error / augmented loss; CI: 95 % bootstrap over samples"
    if any(r.get("flag") == AT_FLOOR for r in rows):
        caption += "\n* within 10× of the float floor: indistinguishable from exact equivariance at the model's precision"
    if any(r.get("flag") == NOT_LEARNED for r in rows):
        caption += "\n" + NOT_LEARNED_NOTE
    show_skill = any(r.get("skill") not in (None, "") and not math.isnan(as_float(r.get("skill"))) for r in rows)
    table = Table(title=None if title is None else Text(title), show_lines=False, header_style="bold", caption=caption)
    table.add_column("step", justify="right", no_wrap=True, min_width=4)
    table.add_column("checkpoint", no_wrap=True, overflow="ellipsis", max_width=28)
    table.add_column("head", no_wrap=True, min_width=6)
    table.add_column("L_aug", justify="right", no_wrap=True, min_width=6)
    table.add_column("L_sym", justify="right", no_wrap=True, min_width=6)
    table.add_column("REE", justify="right", no_wrap=True)
    table.add_column("95 % CI", justify="right", no_wrap=True)
    for column in extra:
        table.add_column(_EXTRA_HEADERS[column], justify="right", no_wrap=True)
    if show_skill:
        table.add_column("skill", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    previous = None
    for row in rows:
        key = (row.get("run"), row.get("checkpoint"))
        first = key != previous
        if first and previous is not None:
            table.add_section()
        previous = key
        ok = row.get("status") == "ok"
        status = Text("ok", style="green") if ok else Text(str(row.get("status")), style="red")
        cells = [
            "" if row.get("step") in (None, "") or not first else str(row.get("step")),
            Text(str(row.get("checkpoint"))) if first else "",  # Text: user names are never markup
            Text(str(row.get("head"))),
            format_number(row.get("loss_aug")),
            format_number(row.get("loss_sym")),
            Text(format_percent(row.get("rel_equiv_error")) + ree_mark(row.get("flag")),
                 style="dim" if row.get("flag") == NOT_LEARNED else _ree_style(row.get("rel_equiv_error"), threshold)),
            format_interval(row.get("rel_equiv_error_ci_low"), row.get("rel_equiv_error_ci_high")),
            *[format_percent(row.get(c)) for c in extra],
            *([Text(format_skill(row.get("skill")), style="dim" if row.get("flag") == NOT_LEARNED else "")] if show_skill else []),
            status if row.get("head") == "total" else Text(""),
        ]
        table.add_row(*cells)
    return table

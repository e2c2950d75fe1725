"""The report's shared figure helpers: text as matplotlib and HTML show it, the step axis,
log formatters, row selection, and the per-variable panel (REE against step at each fixed
value of a task's per-sample variable, :func:`draw_per_t`).

Used by :mod:`~equiaudit.report.plot`, :mod:`~equiaudit.report.plot_dynamics` and
:mod:`~equiaudit.report.html`, which import from here and never from each other's privates.
matplotlib is imported inside the functions (keeps ``equiaudit --help`` fast) and only
through ``matplotlib.figure.Figure`` (no pyplot, no GUI backend, no global state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from equiaudit.io.tables import step_key
from equiaudit.report.compare import X_LABELS
from equiaudit.result import as_float

__all__ = [
    "printable", "plot_text", "series_label", "SYMLOG_NOTE", "plain_log_formatter", "step_value", "latest_rows",
    "group_rows", "step_axis", "plain_log_y", "plain_log_x", "step_norm", "per_t_figure", "draw_per_t",
]


def printable(text) -> str:
    """``str(text)`` that encodes as UTF-8: bytes a file name could not decode (surrogate
    escapes, ``'\\udcff'``) become the visible text ``\\xff``, other lone surrogates
    ``\\udxxx``. Valid text, non-ASCII included, is unchanged."""
    text = "" if text is None else str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for char in text:
        try:
            char.encode("utf-8")
            out.append(char)
        except UnicodeEncodeError:
            try:
                out.append(char.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
            except UnicodeEncodeError:
                out.append(char.encode("utf-8", "backslashreplace").decode("ascii"))
    return "".join(out)


def plain_log_formatter():
    """A log-axis formatter writing plain numbers, labelling minor ticks only on short axes."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    return PlainLog


SYMLOG_NOTE = " (symlog: 0, then log)"


def plot_text(text) -> str:
    """User text as matplotlib draws it literally: ``$`` escaped (it would start mathtext),
    undecodable bytes shown as ``\\xff`` (see :func:`printable`)."""
    return printable(text).replace("$", r"\$")


def series_label(run, head, *, runs: int = 1, heads: int = 1, suffix: str = "") -> str:
    """The label of a line: ``run · head · suffix``, the run left out when one run is shown
    and the head when one head is; the run's name when nothing else is left."""
    parts = ([plot_text(run)] if runs > 1 else []) + ([plot_text(head)] if heads > 1 else []) + ([suffix] if suffix else [])
    return " · ".join(parts) or plot_text(run)


def step_value(row) -> float:
    return as_float(row.get("step"))


def latest_rows(rows: Sequence[Mapping], key: Sequence[str], *, plotted: bool = False) -> list[Mapping]:
    """The last row per ``key`` (later rows were written later), in the order of the first row
    per key, then sorted by run and step as the CSVs are: unknown steps last (tables), or,
    ``plotted``, left out (a figure has no place for them) and ordered by the step's value."""
    found: dict[tuple, Mapping] = {}
    for row in rows:
        if not plotted or math.isfinite(step_value(row)):
            found[tuple(str(row.get(k, "")) for k in key)] = row
    if plotted:
        return sorted(found.values(), key=lambda r: (str(r.get("run", "")), step_value(r)))
    return sorted(found.values(), key=lambda r: (str(r.get("run", "")), step_key(r)))


def group_rows(rows: Sequence[Mapping], by: Sequence[str]) -> dict[tuple, list[Mapping]]:
    out: dict[tuple, list[Mapping]] = {}
    for row in rows:
        out.setdefault(tuple(str(row.get(k, "")) for k in by), []).append(row)
    return out


def step_axis(ax, steps: Sequence[float]) -> None:
    """Log x, or symlog (linear to the first positive step) when step 0 is there; labelled."""
    positive = [s for s in steps if s > 0 and math.isfinite(s)]
    zero = any(s == 0 for s in steps)
    if zero:
        ax.set_xscale("symlog", linthresh=min(positive, default=1.0), linscale=0.4)
        ax.set_xlim(left=0)
    else:
        ax.set_xscale("log")
    ax.set_xlabel(X_LABELS["step"] + (SYMLOG_NOTE if zero else ""))


def plain_log_y(ax) -> None:
    """Plain numbers on a log y axis ("2", not "2×10⁰"), minor labels only on short axes."""
    plain = plain_log_formatter()
    ax.yaxis.set_major_formatter(plain(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def plain_log_x(ax) -> None:
    plain = plain_log_formatter()
    ax.xaxis.set_major_formatter(plain(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def step_norm(steps: Sequence[float]):
    """A colour normalisation of training steps: log when they span decades (symlog with 0)."""
    from matplotlib.colors import LogNorm, Normalize, SymLogNorm

    finite = [s for s in steps if math.isfinite(s) and s >= 0]
    if not finite:
        return Normalize(0, 1)
    low, high = min(finite), max(finite)
    positive = [s for s in finite if s > 0]
    if high <= low:
        return Normalize(low - 0.5, high + 0.5)
    if low == 0:
        return SymLogNorm(linthresh=min(positive), linscale=0.4, vmin=0, vmax=high)
    return LogNorm(low, high) if high / low >= 10 else Normalize(low, high)


# ----------------------------------------------------------------------------- per t


def per_t_figure(breakdown_rows: Sequence[Mapping], *, threshold: float = 0.02, by: str = "t"):
    """REE (%) against step, one line per fixed t, from the ``by = t`` rows of ``breakdown.csv``
    (the figure of :func:`draw_per_t`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.8), layout="constrained")
    n_lines = draw_per_t(fig.subplots(), breakdown_rows, threshold=threshold, by=by, legend=False)
    fig.legend(loc="outside right upper", fontsize="small", ncol=1 + n_lines // 16)
    return fig


def draw_per_t(ax, breakdown_rows: Sequence[Mapping], *, threshold: float = 0.02, by: str = "t", legend: bool = True) -> int:
    """Draw REE (%) against step, one line per fixed t, from the ``by = t`` rows of
    ``breakdown.csv`` into ``ax``; returns the number of lines. (The trajectory plot's third
    panel and the report's figure.)

    For flow matching audited at fixed times the bins are exact t values ("0", "0.2", …);
    lines are coloured by t (viridis, legend ``t = <bin>``, prefixed by run and head when
    there are several, each run × head with its own line style), on a log y axis and a log (symlog with step 0) step axis, the
    threshold marked. Bins are ordered by their numeric value when they have one.
    """
    from matplotlib import colormaps

    rows = [r for r in breakdown_rows if r.get("by") == by]
    shown = latest_rows(rows, ("run", "checkpoint", "head", "bin"), plotted=True)
    groups = group_rows(shown, ("run", "head", "bin"))
    runs, heads = len({k[0] for k in groups}), len({k[1] for k in groups})
    bins = sorted({k[2] for k in groups}, key=lambda b: (not math.isfinite(as_float(b)), as_float(b), b))
    order = {b: i for i, b in enumerate(bins)}
    cmap = colormaps["viridis"]
    series = list(dict.fromkeys((run, head) for run, head, _ in sorted(groups, key=lambda k: (k[0], k[1] != "total", k[1]))))
    styles = ("-", "--", ":", "-.")
    for (run, head, bin_), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "total", kv[0][1], order[kv[0][2]])):
        color = cmap(order[bin_] / max(1, len(bins) - 1) * 0.9)
        style = styles[series.index((run, head)) % len(styles)]
        points = [(s, e) for s, e in ((step_value(r), as_float(r.get("rel_equiv_error"))) for r in group) if s >= 0 and math.isfinite(e) and e > 0]
        label = series_label(run, head, runs=runs, heads=heads, suffix=f"{plot_text(by)} = {plot_text(bin_)}")
        ax.plot([s for s, _ in points], [100 * e for _, e in points], marker="o", linestyle=style, color=color, label=label, markersize=4)
    step_axis(ax, [step_value(r) for r in shown])
    ax.set_yscale("log")
    plain_log_y(ax)
    ax.axhline(100 * threshold, color="0.3", linestyle="--", linewidth=1, label=f"threshold {100 * threshold:g} %")
    ax.set_ylabel("REE = equivariance error / L_aug (%)")
    ax.set_title(f"REE over training at each fixed {plot_text(by)}")
    ax.grid(True, which="major", alpha=0.3)
    if legend:
        ax.legend(fontsize="x-small", ncol=1 + len(groups) // 8, loc="lower left")  # REE falls: that corner is free
    return len(groups)

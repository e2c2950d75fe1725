"""PNG figures of REE trajectories (matplotlib, headless).

Left panel: REE (%) against step (or epoch / hours) on log–log axes, one line per run with
its 95 % CI band and the threshold marked. Right panel: ``loss_aug`` (solid), ``loss_sym``
(dashed) and ``equiv_error`` (dotted) per run, so one sees the equivariance share fall
faster than the loss. Step 0 (an untrained model, the first checkpoint's time) has no place
on a log axis: the x axis is then symlog — linear from 0 to the first positive x, log
beyond — so step 0 is plotted, at the left edge. Tick labels are plain numbers ("2", not
"2×10⁰"); minor ticks are labelled only where the axis spans less than a decade, so
labels never pile up.

matplotlib is imported inside the functions (keeps ``equiaudit --help`` fast) and only
through ``matplotlib.figure.Figure`` — no pyplot, so no GUI backend and no global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from equiaudit.io.atomic import atomic_write
from equiaudit.report.compare import X_LABELS, Trajectory
from equiaudit.report.figures import draw_per_t, plain_log_formatter
from equiaudit.tasks import sample_variables

__all__ = ["trajectory_figure", "efficiency_figure", "save_figure"]


def _finite(xs: Sequence[float], *columns: Sequence[float]) -> tuple[list, ...]:
    """Keep the points with a finite, non-negative x."""
    keep = [i for i, v in enumerate(xs) if v >= 0 and math.isfinite(v)]
    return tuple([col[i] for i in keep] for col in (xs, *columns))


def trajectory_figure(
    trajs: Sequence[Trajectory],
    *,
    threshold: float = 0.02,
    x: str = "step",
    head: str = "total",
    title: str | None = None,
    per_t: Sequence[dict] | None = None,
):
    """A two-panel :class:`~matplotlib.figure.Figure` of the ``head`` trajectories, three with
    ``per_t``: the ``breakdown.csv`` rows of a flow audited at fixed times (``by = t``; any
    task's drawn per-sample variable, :func:`equiaudit.tasks.sample_variables`), whose
    ``head`` rows become a third panel, REE against step at each t
    (:func:`equiaudit.report.figures.draw_per_t`).

    Lines carry the run name as label (REE panel: y = REE in %), so tests and callers can
    read the plotted data back from ``fig.axes``.
    """
    from matplotlib.figure import Figure

    shown = [t for t in trajs if t.head == head]
    drawn = [v.name for v in sample_variables().values() if v.drawn]
    by = next((r.get("by") for r in per_t or () if r.get("by") in drawn), None)  # the first drawn variable present
    t_rows = [r for r in per_t or () if by is not None and r.get("by") == by and r.get("head") == head]
    fig = Figure(figsize=(18 if t_rows else 12, 4.8), layout="constrained")
    ree_ax, loss_ax, *t_ax = fig.subplots(1, 3 if t_rows else 2)
    positive_x = [v for t in shown for v in t.x if v > 0 and math.isfinite(v)]
    has_zero = any(v == 0 for t in shown for v in t.x)
    for i, t in enumerate(shown):
        color = f"C{i % 10}"
        s = t.series
        xs, ree, low, high, aug, sym, ee = _finite(
            t.x, s["rel_equiv_error"], s["rel_equiv_error_ci_low"], s["rel_equiv_error_ci_high"],
            s["loss_aug"], s["loss_sym"], s["equiv_error"],
        )
        ree_ax.plot(xs, [100 * r for r in ree], "o-", color=color, label=t.run, markersize=4)
        # Not learned (skill below --min-skill): grey crosses over the points, their REE says nothing.
        ignored = [(x, 100 * r) for x, r, ok in zip(t.x, s["rel_equiv_error"], t.learned)
                   if not ok and x >= 0 and math.isfinite(x) and r > 0]
        if ignored:
            ree_ax.plot(*zip(*ignored), "x", color="0.55", markersize=9, linestyle="none",
                        label=f"{t.run}: not learned (skill < min)")
        # A CI bound of 0 has no place on a log axis: the band then stops at the estimate.
        band_low = [100 * lo if lo > 0 else 100 * r for lo, r in zip(low, ree)]
        ree_ax.fill_between(xs, band_low, [100 * hi for hi in high], color=color, alpha=0.2, linewidth=0)
        loss_ax.plot(xs, aug, "-", color=color, label=f"{t.run}: L_aug")
        loss_ax.plot(xs, sym, "--", color=color, label=f"{t.run}: L_sym")
        loss_ax.plot(xs, ee, ":", color=color, label=f"{t.run}: EE = L_aug − L_sym")
    ree_ax.axhline(100 * threshold, color="0.3", linestyle="--", linewidth=1, label=f"threshold {100 * threshold:g} %")
    plain = plain_log_formatter()
    for ax in (ree_ax, loss_ax):
        if has_zero:  # linear up to the first checkpoint after step 0, log beyond
            ax.set_xscale("symlog", linthresh=min(positive_x, default=1.0), linscale=0.4)
            ax.set_xlim(left=0)
        else:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(X_LABELS[x] + (" (symlog: 0, then log)" if has_zero else ""))
        ax.grid(True, which="major", alpha=0.3)
    # "2", not "2×10⁰" (it is a percentage); minor labels only where the axis is short.
    ree_ax.yaxis.set_major_formatter(plain(labelOnlyBase=False))
    ree_ax.yaxis.set_minor_formatter(plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ree_ax.set_ylabel("REE = equivariance error / L_aug (%)")
    ree_ax.set_title(f"relative equivariance error ({head}), 95 % CI")
    ree_ax.legend(fontsize="small")
    loss_ax.set_ylabel("loss (per sample)")
    loss_ax.set_title("augmented loss, symmetrized loss, equivariance error")
    if shown:
        loss_ax.legend(fontsize="x-small", ncol=1 + len(shown) // 4)
    if t_rows:
        draw_per_t(t_ax[0], t_rows, threshold=threshold, by=by)
    if title:
        fig.suptitle(title)
    return fig


def efficiency_figure(trajs: Sequence[Trajectory], rows: Sequence[dict], *, title: str | None = None):
    """Held-out ``L_aug`` against wall-clock hours per run (``total``; ``trajs`` on the time
    axis), the common target loss marked and each run's time to it (:func:`~equiaudit.report.compare.efficiency_rows`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    hours = {r["run"]: r for r in rows}
    shown = [t for t in trajs if t.head == "total"]
    for i, t in enumerate(shown):
        xs, losses = _finite(t.x, t.series["loss_aug"])
        row = hours.get(t.run, {})
        label = t.run + (f": {row['hours_to_target']:.3g} h to target ({row['speedup_needed']:.3g}×)" if row else "")
        ax.plot(xs, losses, "o-", color=f"C{i % 10}", markersize=4, label=label)
    if rows:
        ax.axhline(rows[0]["loss_target"], color="0.3", linestyle="--", linewidth=1, label="loss every run reaches")
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=max(1e-3, min((x for t in shown for x in t.x if x > 0), default=1.0)), linscale=0.4)
    ax.set_xlim(left=0)
    ax.set_xlabel("wall-clock time since the run's first checkpoint (h; symlog)")
    ax.set_ylabel("held-out L_aug (per sample)")
    ax.set_title("efficiency: held-out loss per hour of training")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG atomically (a viewer refreshing during ``--watch`` never sees half a file)."""
    return atomic_write(path, lambda handle: fig.savefig(handle, dpi=dpi, format="png"))

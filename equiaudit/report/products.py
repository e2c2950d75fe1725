"""What an output folder shows once its rows are written: plots, correlations, the HTML report.

:func:`write_products` is called by every command that fills a folder (``audit`` after the
run and after each ``--watch`` round, ``demo``, ``merge``, the training callbacks): it reads
only what is in ``OUT`` (so cached and merged checkpoints count like fresh ones) and writes

* ``trajectory.png`` — REE and losses against step (against epoch when no step is stored),
  and REE per fixed flow time t when ``breakdown.csv`` has ``by = t`` rows;
* with ``dynamics.csv``: ``correlations.csv`` (log REE against log gradient ratio and the
  tracked weight variances, Pearson and Spearman) and ``dynamics.png``;
* with ``twirl.csv``: ``twirl.png``; with landscapes: ``landscape/<run>--<checkpoint>.png``;
* ``report.html`` — one self-contained page of all of it.
"""

from __future__ import annotations

from pathlib import Path

from equiaudit.io.layout import OutputFolder
from equiaudit.io.tables import read_rows, write_rows
from equiaudit.schema import CORRELATION_COLUMNS
from equiaudit.tasks import sample_variables

__all__ = ["write_products", "save_trajectory_plot"]


def save_trajectory_plot(out: OutputFolder | Path, *, title: str | None, threshold: float) -> Path:
    """``OUT/trajectory.png`` from every ``ok`` row of ``OUT/summary.csv``; against epochs
    when the checkpoints store only epochs (their step *is* the epoch). A flow audited at
    fixed times (``by = t`` rows in ``OUT/breakdown.csv``) gets a third panel: REE per t."""
    from equiaudit.report.compare import epochs_only, trajectories
    from equiaudit.report.plot import save_figure, trajectory_figure

    out = out if isinstance(out, OutputFolder) else OutputFolder(out)
    rows = read_rows(out.summary)
    x = "epoch" if epochs_only(rows) else "step"
    drawn = {v.name for v in sample_variables().values() if v.drawn}  # flow time t, a task's own variable
    per_t = [r for r in read_rows(out.breakdown) if r.get("by") in drawn] if x == "step" else None
    return save_figure(trajectory_figure(trajectories(rows, x=x), threshold=threshold, title=title, x=x, per_t=per_t),
                       out.plot)


def write_products(out: OutputFolder | Path, *, title: str | None = None, threshold: float = 0.02,
                   plot: bool = True, report: bool = True) -> list[Path]:
    """Write the folder's derived files (see the module docstring); returns their paths."""
    from equiaudit.analysis import trajectory_correlations

    out = out if isinstance(out, OutputFolder) else OutputFolder(out)
    written: list[Path] = []
    if plot:
        written.append(save_trajectory_plot(out, title=title, threshold=threshold))
    dynamics = read_rows(out / out.DYNAMICS)
    if dynamics:
        correlations = trajectory_correlations(dynamics, read_rows(out.summary))
        write_rows(out / out.CORRELATIONS, correlations, CORRELATION_COLUMNS)
        written.append(out / out.CORRELATIONS)
    if plot:
        from equiaudit.report.plot import save_figure
        from equiaudit.report.plot_dynamics import dynamics_figure, landscape_figure, twirl_figure

        if dynamics:
            written.append(save_figure(dynamics_figure(dynamics, title=title), out / out.DYNAMICS_PLOT))
        twirl = read_rows(out / out.TWIRL)
        if twirl:
            written.append(save_figure(twirl_figure(twirl), out / out.TWIRL_PLOT))
        for grid in sorted((out / out.LANDSCAPE).glob("*.csv")) if (out / out.LANDSCAPE).is_dir() else []:
            import json

            try:
                meta = json.loads(grid.with_suffix(".json").read_text())
            except (OSError, ValueError):
                meta = None
            written.append(save_figure(landscape_figure(read_rows(grid), meta), grid.with_suffix(".png")))
    if report:
        from equiaudit.report.html import write_report

        written.append(write_report(out, title=title, threshold=threshold))
    return written

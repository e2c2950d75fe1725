"""Every output table's columns, in one place. Pure (no imports beyond the standard library).

Each CSV that equiaudit writes has a :class:`TableSpec`: its column order (written first,
then any other keys of the rows in first-seen order), the columns a reader requires (a
file lacking one is damaged), and whether ``total`` rows sort first within a checkpoint.
:data:`TABLES` maps the files of an output folder (``summary.csv`` …) to their spec; the
writers (:meth:`equiaudit.io.layout.OutputFolder.record`, the report) and the readers use
these lists, and :meth:`equiaudit.result.AuditResult.tables` maps a result to the rows of
each file. Adding a column is one edit here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SUMMARY_COLUMNS", "SUMMARY_EXTRA_COLUMNS", "MEASURE_COLUMNS", "BREAKDOWN_COLUMNS", "BREAKDOWN_EXTRA_COLUMNS",
    "DYNAMICS_COLUMNS", "TWIRL_COLUMNS", "CORRELATION_COLUMNS", "LANDSCAPE_COLUMNS", "COMPARE_COLUMNS",
    "EFFICIENCY_COLUMNS", "TableSpec", "TABLES", "SUMMARY", "BREAKDOWN", "DYNAMICS", "TWIRL",
]

# summary.csv: the contract's columns (docs/metric.md), one row per checkpoint × head.
SUMMARY_COLUMNS = (
    "run", "checkpoint", "step", "head", "loss_aug", "loss_sym", "equiv_error", "rel_equiv_error",
    "rel_equiv_error_ci_low", "rel_equiv_error_ci_high", "n_samples", "n_rotations", "group", "status",
)
# Always written after the contract's columns, in this order (empty where not measured).
# `epoch` and `checkpoint_time` (the checkpoint's mtime, Unix seconds) let plots use other x
# axes; `weights` says which weight set of the checkpoint was audited (raw, ema).
SUMMARY_EXTRA_COLUMNS = ("median_rel_equiv_error", "message", "config_hash", "seconds", "epoch", "checkpoint_time", "weights")
# Optional per-head figures of summary.csv, in the order they follow the columns above when measured.
MEASURE_COLUMNS = ("interp_floor", "float_floor", "flag", "local_equiv_error", "rel_local_equiv_error", "skill", "loss_null")

# breakdown.csv: one row per checkpoint × head × split (`by`) × bin.
BREAKDOWN_COLUMNS = (
    "run", "checkpoint", "step", "head", "by", "bin", "loss_aug", "loss_sym", "equiv_error", "rel_equiv_error", "n",
)
# After the contract's columns: the bin's weight in the total (Σ weight·equiv_error = the
# total over a split's bins), its share of the total error, and the settings hash.
BREAKDOWN_EXTRA_COLUMNS = ("weight", "share", "config_hash")

# dynamics.csv (--dynamics): gradients and curvature of the two parts of the loss per checkpoint × head.
DYNAMICS_COLUMNS = ("run", "checkpoint", "step", "head", "grad_norm_sym", "grad_norm_equiv", "grad_norm_ratio", "grad_cosine",
                    "grad_norm_aug", "loss_sym", "equiv_error", "rel_equiv_error", "hessian_top_sym", "hessian_top_equiv",
                    "config_hash")
# twirl.csv: the held-out loss of the k-rotation average, per checkpoint, head and k.
TWIRL_COLUMNS = ("run", "checkpoint", "step", "head", "k", "loss_twirled", "share_of_equiv_error_removed",
                 "loss_aug", "loss_sym", "equiv_error", "smallest_k", "twirl_target", "config_hash")
# correlations.csv: log REE against the dynamics' columns across a run's checkpoints.
CORRELATION_COLUMNS = ("run", "head", "x", "y", "pearson", "spearman", "n")
# landscape/<run>--<checkpoint>.csv: the loss surfaces on an N×N grid, long format.
LANDSCAPE_COLUMNS = ("alpha", "beta", "loss_sym", "equiv_error")
# compare.csv / efficiency.csv (equiaudit compare).
COMPARE_COLUMNS = (
    "run", "head", "threshold", "first_step_below", "final_step", "final_rel_equiv_error", "min_rel_equiv_error",
    "first_step_stays_below", "final_ci_low", "final_ci_high", "n_checkpoints", "dip_step", "n_not_learned",
)
EFFICIENCY_COLUMNS = ("run", "head", "loss_target", "hours_to_target", "speedup_needed", "final_loss_aug", "final_hours")


@dataclass(frozen=True)
class TableSpec:
    """One output CSV: ``columns`` written first, ``required`` to read it back, ``total_first``:
    within a checkpoint the ``total`` row comes first (else rows keep the order they came in)."""

    columns: tuple[str, ...]
    required: tuple[str, ...]
    total_first: bool


SUMMARY, BREAKDOWN, DYNAMICS, TWIRL = "summary.csv", "breakdown.csv", "dynamics.csv", "twirl.csv"

# The per-checkpoint row files of an output folder (merged checkpoint by checkpoint).
TABLES: dict[str, TableSpec] = {
    SUMMARY: TableSpec(SUMMARY_COLUMNS + SUMMARY_EXTRA_COLUMNS, SUMMARY_COLUMNS, True),
    BREAKDOWN: TableSpec(BREAKDOWN_COLUMNS + BREAKDOWN_EXTRA_COLUMNS, BREAKDOWN_COLUMNS, False),
    DYNAMICS: TableSpec(DYNAMICS_COLUMNS, DYNAMICS_COLUMNS[:4], True),
    TWIRL: TableSpec(TWIRL_COLUMNS, TWIRL_COLUMNS[:6], False),
}

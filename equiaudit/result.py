"""What an audit returns: :class:`AuditResult` (one model or checkpoint) and its rows. Pure.

The same object comes out of :func:`equiaudit.audit`, :meth:`equiaudit.EquivarianceMetric.compute`,
the CLI's runner (one per checkpoint) and the training-loop callbacks, and
:meth:`AuditResult.tables` gives the rows of every output table it fills (the one mapping
every writer uses; columns in :mod:`equiaudit.schema`). :meth:`AuditResult.rows` gives
exactly the ``summary.csv`` rows the CLI writes for it:
``total`` first (``Σ_h w_h · head``), then each head; a failed checkpoint gets a single
``total`` row with empty numbers and its status.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from equiaudit import schema
# The tables' columns live in equiaudit.schema; re-exported here for existing callers.
from equiaudit.schema import MEASURE_COLUMNS, SUMMARY_COLUMNS, TWIRL_COLUMNS
from equiaudit.schema import SUMMARY_EXTRA_COLUMNS as EXTRA_COLUMNS

__all__ = ["HeadResult", "AuditResult", "SUMMARY_COLUMNS", "EXTRA_COLUMNS", "MEASURE_COLUMNS", "TWIRL_COLUMNS",
           "SCALAR_COLUMNS", "scalars"]

# The figures a training logger gets (Lightning, Hugging Face, TensorBoard), see :func:`scalars`.
SCALAR_COLUMNS = ("rel_equiv_error", "loss_aug", "loss_sym", "skill")


def as_float(value: Any) -> float:
    """``float(value)``, or NaN for what is not a number (an empty CSV cell, None, text)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def scalars(rows: Iterable[Mapping[str, Any]], prefix: str = "equiaudit") -> dict[str, float]:
    """The logger scalars of one checkpoint's ``summary.csv`` rows: for the ``total`` row
    ``{prefix}/rel_equiv_error``, ``{prefix}/loss_aug``, ``{prefix}/loss_sym``; for each
    head ``{prefix}/{head}/rel_equiv_error``, ``.../loss_aug``, ``.../loss_sym``; and
    ``{prefix}/skill`` (``.../{head}/skill``) where a null loss is defined (``1 − L_sym/loss_null``:
    below ``--min-skill`` the REE says nothing, see :mod:`equiaudit.null`).

    ``rows`` may hold numbers (:meth:`AuditResult.rows`) or the strings read back from
    ``summary.csv``; empty and NaN values are left out (a failed checkpoint has none). The
    one naming of these scalars: the training callbacks and ``--tensorboard`` all use it.
    """
    out: dict[str, float] = {}
    for row in rows:
        head = row.get("head")
        if not head:
            continue
        base = prefix if head == "total" else f"{prefix}/{head}"
        for column in SCALAR_COLUMNS:
            value = row.get(column)
            if value is None or value == "":
                continue
            number = float(value)
            if not math.isnan(number):
                out[f"{base}/{column}"] = number
    return out


@dataclass(frozen=True)
class HeadResult:
    """Dataset-level figures of one head, or of the weighted ``total``.

    ``rel_equiv_error`` (REE) is ``equiv_error / loss_aug``, a fraction; ``loss_sym`` is
    ``loss_aug − equiv_error`` (bias-corrected), so ``loss_aug = loss_sym + equiv_error``.
    The interval is the 95 % studentized bootstrap over samples, truncated to [0, 1]. Floors
    and the local metric are ``None`` when not measured. ``loss_null`` is the loss of the best
    exactly equivariant predictor that ignores the geometry and ``skill = 1 − loss_sym /
    loss_null`` (NaN where no null is defined); ``flag`` is ``not_learned`` when the skill is
    below the audit's ``min_skill``, else ``at_float_floor`` or empty (:mod:`equiaudit.null`).
    """

    name: str
    loss_aug: float
    loss_sym: float
    equiv_error: float
    rel_equiv_error: float
    rel_equiv_error_ci_low: float
    rel_equiv_error_ci_high: float
    n_samples: int
    median_rel_equiv_error: float
    interp_floor: float | None = None
    float_floor: float | None = None
    flag: str | None = None
    local_equiv_error: float | None = None
    rel_local_equiv_error: float | None = None
    skill: float | None = None
    loss_null: float | None = None

    @property
    def not_learned(self) -> bool:
        """The skill ``1 − L_sym/loss_null`` is below the audit's ``min_skill``: the REE says nothing."""
        return self.flag == "not_learned"

    def columns(self) -> dict[str, Any]:
        """The head's ``summary.csv`` values (measures only where measured)."""
        out = {name: getattr(self, name) for name in (
            "loss_aug", "loss_sym", "equiv_error", "rel_equiv_error", "rel_equiv_error_ci_low",
            "rel_equiv_error_ci_high", "n_samples", "median_rel_equiv_error")}
        out.update({name: getattr(self, name) for name in MEASURE_COLUMNS if getattr(self, name) is not None})
        return out


@dataclass(frozen=True)
class AuditResult:
    """The audit of one model (an in-memory model, or one checkpoint of a run).

    Attributes:
        total, heads: the figures (``None``/empty when ``status`` is not ``ok``).
        status, message: ``ok`` or a short failure code, and the one-line reason.
        n_rotations, group, group_label: K, the group's name and how reports name it.
        config_hash: the settings' hash (the cache and ``summary.csv`` key on it).
        breakdown: ``breakdown.csv`` rows without the checkpoint's identity (see
            :mod:`equiaudit.breakdown`).
        twirl, dynamics: ``twirl.csv`` and ``dynamics.csv`` rows without the identity
            (``--dynamics``); landscape: the grid and its metadata when one was drawn
            (:mod:`equiaudit.analysis`).
        run, checkpoint, step, epoch, checkpoint_time, weights: the checkpoint's identity
            when it came from a file (empty for an in-memory model), and the weight set used
            (``raw``/``ema``; ``weights_source`` says where it was found, for run.json).
        seconds: wall time of the audit.
        head_weights: each head's weight in the total (``total = Σ w_h · head``), shown
            by the repr so a weighting that differs from the training loss's is seen.
    """

    total: HeadResult | None
    heads: Mapping[str, HeadResult] = field(default_factory=dict)
    status: str = "ok"
    message: str | None = None
    n_rotations: int | None = None
    group: str | None = None
    group_label: str | None = None
    config_hash: str | None = None
    breakdown: list[dict] = field(default_factory=list)
    twirl: list[dict] = field(default_factory=list)
    dynamics: list[dict] = field(default_factory=list)
    landscape: dict[str, Any] | None = None
    run: str = ""
    checkpoint: str = ""
    step: int | None = None
    epoch: int | None = None
    checkpoint_time: float | None = None
    weights: str | None = None
    weights_source: str | None = None
    seconds: float = 0.0
    head_weights: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, status: str, message: str, **identity: Any) -> AuditResult:
        return cls(None, {}, status=status, message=message, **identity)

    def with_identity(self, **identity: Any) -> AuditResult:
        """The same result with checkpoint identity fields set (``run``, ``step``, ...)."""
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in identity.items() if k in known})

    def __getitem__(self, head: str) -> HeadResult:
        """``result["total"]`` or ``result["forces"]``."""
        if head == "total" and self.total is not None:
            return self.total
        return self.heads[head]

    def rows(self) -> list[dict]:
        """``summary.csv`` rows: ``total`` first, then each head (see the module docstring)."""
        base = {
            "run": self.run,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "n_rotations": self.n_rotations,
            "group": self.group,
            "status": self.status,
            "message": self.message,
            "config_hash": self.config_hash,
            "seconds": round(self.seconds, 3),
            "epoch": self.epoch,
            "checkpoint_time": None if self.checkpoint_time is None else round(self.checkpoint_time, 3),
            "weights": self.weights,
        }
        if not self.ok or self.total is None:
            return [{**base, "head": "total"}]
        return [{**base, "head": head.name, **head.columns()} for head in (self.total, *self.heads.values())]

    def identity(self) -> dict[str, Any]:
        return {"run": self.run, "checkpoint": self.checkpoint, "step": self.step, "config_hash": self.config_hash}

    def scalars(self, prefix: str = "equiaudit") -> dict[str, float]:
        """Logger scalars (``{prefix}/rel_equiv_error``, ``{prefix}/{head}/loss_aug`` ...), see :func:`scalars`."""
        return scalars(self.rows(), prefix)

    def breakdown_rows(self) -> list[dict]:
        """``breakdown.csv`` rows with the checkpoint's identity and the settings hash."""
        return [{**self.identity(), **row} for row in self.breakdown]

    def twirl_rows(self) -> list[dict]:
        """``twirl.csv`` rows with the checkpoint's identity."""
        return [{**self.identity(), **row} for row in self.twirl]

    def dynamics_rows(self) -> list[dict]:
        """``dynamics.csv`` rows with the checkpoint's identity."""
        return [{**self.identity(), **row} for row in self.dynamics]

    def tables(self) -> dict[str, list[dict]]:
        """The rows of every per-checkpoint output table, by file name (:data:`equiaudit.schema.TABLES`):
        ``summary.csv``, ``breakdown.csv``, ``dynamics.csv``, ``twirl.csv``."""
        return {
            schema.SUMMARY: self.rows(),
            schema.BREAKDOWN: self.breakdown_rows(),
            schema.DYNAMICS: self.dynamics_rows(),
            schema.TWIRL: self.twirl_rows(),
        }

    def __repr__(self) -> str:
        if not self.ok or self.total is None:
            return f"AuditResult(status={self.status!r}, message={self.message!r})"
        t = self.total
        ci = "" if math.isnan(t.rel_equiv_error_ci_low) else f" [{100 * t.rel_equiv_error_ci_low:.3g}, {100 * t.rel_equiv_error_ci_high:.3g}]"
        def extras(h: HeadResult) -> str:
            # interp_floor wherever grids were rotated continuously; the skill, and not_learned when it is low.
            out = ""
            if h.interp_floor is not None and not math.isnan(h.interp_floor):
                out += f", interp_floor {100 * h.interp_floor:.3g} %"
            if h.skill is not None and not math.isnan(h.skill):
                out += f", skill {h.skill:.3g}"
            return out + (" NOT LEARNED" if h.not_learned else "")

        heads = ", ".join(f"{h.name}: {100 * h.rel_equiv_error:.3g} %{extras(h)}" for h in self.heads.values())
        weighted = ""
        if self.head_weights:
            weighted = "; total = " + " + ".join(f"{w:g}·{name}" for name, w in self.head_weights.items())
        return (f"AuditResult(REE {100 * t.rel_equiv_error:.3g} %{ci} of L_aug {t.loss_aug:.4g}{extras(t)} "
                f"({self.group_label}, K={self.n_rotations}, N={t.n_samples}); {heads}{weighted})")

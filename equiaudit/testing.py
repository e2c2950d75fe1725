"""``assert_equivariant``: the audit as an assertion for test suites (pytest, unittest).

::

    from equiaudit.testing import assert_equivariant

    def test_my_model_is_equivariant():
        assert_equivariant(model, data, task="force_field")            # exact: at the float floor

    def test_my_augmented_model_is_nearly_equivariant():
        assert_equivariant(model, data, task="force_field", max_ree=0.02)   # at most 2 % of the loss

The threshold is relative to the float floor the audit measures for this model at its own
precision (:mod:`equiaudit.floor`), not a fixed tolerance: an exactly equivariant model
passes in float32 and in float64 alike, and a model that is off by more than rounding
fails at either precision. The failure message names the REE and its interval, the floor,
the heads and the samples where the error lives.
"""

from __future__ import annotations

import math
from typing import Any

from equiaudit.floor import FLAG_FACTOR
from equiaudit.result import AuditResult, HeadResult

__all__ = ["assert_equivariant"]

WORST_SAMPLES = 3


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.3g} %"


def _allowed(head: HeadResult, max_ree: float | None, floor_factor: float) -> float:
    """The largest REE this head may read: ``floor_factor`` × its float floor, or ``max_ree`` if larger."""
    floor = head.float_floor if head.float_floor is not None and not math.isnan(head.float_floor) else 0.0
    bound = floor_factor * floor
    return bound if max_ree is None else max(bound, max_ree)


def _describe(head: HeadResult, allowed: float) -> str:
    return (f"{head.name}: REE {_percent(head.rel_equiv_error)} [{_percent(head.rel_equiv_error_ci_low)}, "
            f"{_percent(head.rel_equiv_error_ci_high)}] (95 % CI), float floor {_percent(head.float_floor)}, "
            f"allowed {_percent(allowed)}")


def assert_equivariant(model: Any, data: Any = None, *, max_ree: float | None = None, floor_factor: float = FLAG_FACTOR,
                       **settings: Any) -> AuditResult:
    """Audit ``model`` on ``data`` and raise ``AssertionError`` unless it is equivariant.

    Args:
        model, data, **settings: as :func:`equiaudit.audit` (``task=``, ``fields=``, ``heads=``,
            ``inputs=``, ``outputs=``, ``rotations=``, ``seed=``, ...). The float floor is always
            measured, and the worst samples are found by the ``sample`` breakdown.
        max_ree: the largest relative equivariance error (a fraction: 0.02 is 2 % of the loss)
            a head or the total may read. None (default): the model must be at its float floor.
        floor_factor: a result within this factor of its float floor counts as exactly
            equivariant (the audit's ``at_float_floor`` rule; calibration in ``equiaudit.floor``).

    Returns:
        The :class:`~equiaudit.result.AuditResult`, for further checks.

    Raises:
        AssertionError: a head or the total reads above what is allowed; the message names
            the REE, its interval, the float floor, the failing heads and the worst samples.
    """
    from equiaudit.api import audit  # (the API imports the plan: only when an assertion runs)

    settings.setdefault("by", ["sample"])
    settings["float_floor"] = True
    result = audit(model, data, **settings)
    failing = [(h, _allowed(h, max_ree, floor_factor)) for h in (result.total, *result.heads.values())]
    failing = [(h, allowed) for h, allowed in failing if not h.rel_equiv_error <= allowed]
    if not failing:
        return result
    worst = [row for row in result.breakdown if row.get("by") == "sample" and row.get("head") == "total"][:WORST_SAMPLES]
    lines = [f"the model is not equivariant{'' if max_ree is None else f' within max_ree={max_ree:g}'} "
             f"({result.group_label}, K={result.n_rotations}, N={result.total.n_samples}):"]
    lines += [f"  {_describe(h, allowed)}" for h, allowed in failing]
    if worst:
        described = ", ".join(f"#{row['bin']} (REE {_percent(row['rel_equiv_error'])}, {_percent(row['share'])} of the error)"
                              for row in worst)
        lines.append(f"  worst samples: {described}")
    if max_ree is None:
        lines.append(f"  (exact equivariance is REE ≤ {floor_factor:g} × float floor; pass max_ree= for a learned model)")
    raise AssertionError("\n".join(lines))

"""The float floor: how much REE rounding alone produces at the model's precision. Pure.

The group actions run in float64 (the tool adds no error of its own), but the model
computes at its own dtype, so even an exactly equivariant model reads a small REE: its
inputs are rounded after the action and its arithmetic rounds differently on every
rotated copy. Below that level a measured REE says nothing about learned symmetry.

Definition (cheap and model-specific): ``float_floor`` is the REE of a *null orbit*,
K copies of each input that are equal in exact arithmetic and differ only by rounding at
the compute dtype. Every floating field the group acts on (non-``scalar``) gets
``v + J·ε·s·u``, ``u ~ U(−1, 1)`` i.i.d. per entry, ``ε`` the unit roundoff of the
compute dtype (the autocast dtype when there is one, else the model's parameters'),
``s`` the entry's scale (the norm of its vector or tensor: rotating mixes components;
a voxel's own magnitude) and ``J`` = :data:`JITTER`. Outputs get the same at float64's
roundoff (the audit maps them back in float64) and are otherwise compared as they are
(the identity acts). The null orbit's equivariance error (bias-corrected like the
audit's) is divided by the audit's ``loss_aug``, as ``interp_floor`` is. It is measured
on the first ``n_samples`` samples with ``n_copies`` copies each, and gives a positive
floor even where the group action itself is exact (cube rotations of grids, permutations).

Calibration (``tests/test_floor.py``): exactly equivariant models read 0.1–0.7× their
floor in float32 and bfloat16 and 1–5× in float64 (where the tool's own float64
arithmetic is as coarse as the model's). It is an upper estimate when only invariant
features reach the low-precision (autocast) operations.

A result within :data:`FLAG_FACTOR` × of its floor is flagged ``at_float_floor``: it is
indistinguishable from a perfectly equivariant model evaluated at this precision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from equiaudit import actions
from equiaudit.actions.group_actions import GroupAction
from equiaudit.engine import OrbitSpec, audit_model, model_dtype

__all__ = ["FLAG_FACTOR", "AT_FLOOR", "JITTER", "unit_roundoff", "compute_dtype", "JitterAction", "null_orbit_error", "flag", "float_floor_metric"]

FLAG_FACTOR = 10.0
# Jitter amplitude in units of the unit roundoff: the cast to the compute dtype plus the
# float64 arithmetic of the action (a 3-term dot product per component).
JITTER = 2.0
AT_FLOOR = "at_float_floor"


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of one rounding (2⁻²⁴ for float32)."""
    return torch.finfo(dtype).eps / 2


def compute_dtype(model: torch.nn.Module, autocast: torch.dtype | None = None) -> torch.dtype:
    """The dtype the model's arithmetic rounds to: the autocast dtype, else its parameters'."""
    return autocast if autocast is not None else model_dtype(model)


class JitterAction(GroupAction):
    """The null orbit: ``act`` makes K copies of each non-scalar floating field, each entry
    moved by ``amplitude·scale·u`` (``u ~ U(−1, 1)`` from ``generator``, ``scale`` the norm of
    its vector/tensor or a voxel's magnitude); ``act_inverse`` does the same at float64's roundoff.

    ``point`` fields are centred first when ``centres_points`` (as the audited group does),
    so the copies sit where the audit's inputs sit.
    """

    name = "jitter"

    def __init__(self, amplitude: float, generator: torch.Generator, centres_points: bool = True):
        self.amplitude = amplitude
        self.generator = generator
        self.centres_points = centres_points

    def act(self, rep, value, elements, mask=None):
        if rep == "point" and self.centres_points:
            value = actions.centre(value, mask)
        orbit = value.unsqueeze(1).expand(value.shape[0], elements.shape[1], *value.shape[1:])
        return self._jitter(rep, orbit, self.amplitude)

    def _jitter(self, rep: str, orbit: torch.Tensor, amplitude: float) -> torch.Tensor:
        if rep == "scalar" or not orbit.is_floating_point():
            return orbit
        # Rounding a rotated vector (or tensor) errs relative to its norm, not to each component.
        components = {"point": 1, "vector": 1, "pseudovector": 1, "tensor2": 2}.get(rep, 0)
        scale = orbit.abs() if components == 0 else orbit.flatten(-components).norm(dim=-1)[(...,) + (None,) * components]
        # Drawn on the CPU so the same seed gives the same copies on any device.
        u = torch.rand(orbit.shape, generator=self.generator, dtype=torch.float64).to(orbit.device) * 2 - 1
        return orbit + amplitude * scale * u

    def act_inverse(self, rep, orbit, elements, mask=None):
        # The audit maps outputs back in float64: one more rounding at float64's roundoff.
        return self._jitter(rep, orbit, JITTER * unit_roundoff(torch.float64))


def null_orbit_error(
    model: torch.nn.Module,
    dataset: Mapping[str, torch.Tensor],
    spec: OrbitSpec,
    *,
    n_samples: int = 64,
    n_copies: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean equivariance error of the null orbit on the first ``n_samples`` samples:
    ``{"total": ..., head: ...}`` (same weights and reductions as the audit)."""
    n = min(n_samples, len(next(iter(dataset.values()))))
    subset = {name: value[:n] for name, value in dataset.items()}
    eps = JITTER * unit_roundoff(compute_dtype(model, spec.autocast))
    jitter = JitterAction(eps, torch.Generator().manual_seed(seed), spec.group.centres_points)
    # The preset's own orbit builder (exact voxelization) is for rotations: not used here.
    null_spec = dataclasses.replace(spec, group=jitter, orbit_inputs=None)
    elements = torch.zeros(n, max(2, n_copies), dtype=torch.float64)  # only the (N, K) shape is used
    accumulator = audit_model(model, subset, elements, null_spec, batch_size=batch_size, device=device)
    return {head: error.mean().item() for head, (_, error) in accumulator.per_sample().items()}


def flag(rel_equiv_error: float, float_floor: float, factor: float = FLAG_FACTOR) -> str:
    """``at_float_floor`` when the REE is within ``factor`` × the floor, else empty."""
    if math.isnan(rel_equiv_error) or math.isnan(float_floor):
        return ""
    return AT_FLOOR if rel_equiv_error <= factor * float_floor else ""


def float_floor_metric(plan, summaries) -> dict[str, dict[str, object]]:
    """The audit's extra metric (see :class:`equiaudit.audit.AuditPlan`): ``float_floor`` and
    ``flag`` per head and for the total, with the checkpoint's weights loaded."""
    errors = null_orbit_error(
        plan.model,
        plan.dataset,
        plan.spec,
        seed=plan.config.seed,
        batch_size=plan.config.batch_size,
        device=plan.device,
    )
    columns = {}
    for head, summary in summaries.items():
        floor = errors[head] / summary.loss_aug if summary.loss_aug > 0 else math.nan
        columns[head] = {"float_floor": floor, "flag": flag(summary.rel_equiv_error, floor)}
    return columns

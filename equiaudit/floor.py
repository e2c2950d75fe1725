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
a voxel's own magnitude), ``J`` = :data:`JITTER`, and ``u`` a pure function of the seed,
the sample and the copy (:class:`~equiaudit.random.SampleRandom`). Outputs get the same at float64's
roundoff (the audit maps them back in float64) and are otherwise compared as they are
(the identity acts). The null orbit's equivariance error (bias-corrected like the
audit's) is divided by the audit's ``loss_aug``, as ``interp_floor`` is. It is measured
on the audit's first :data:`FLOOR_SAMPLES` samples (ids below it) with :data:`FLOOR_COPIES`
copies each (:func:`null_orbit_error` is one batch of it), and gives a positive
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
from dataclasses import dataclass

import torch

from equiaudit import actions
from equiaudit.engine import OrbitSpec, evaluate_orbits, model_dtype
from equiaudit.groups.base import GroupAction, IIDElements
from equiaudit.random import SampleRandom
from equiaudit.representations import get_representation

__all__ = [
    "FLAG_FACTOR", "AT_FLOOR", "JITTER", "FLOOR_SAMPLES", "FLOOR_COPIES", "unit_roundoff", "compute_dtype",
    "JitterAction", "JitterGroup", "null_orbit_error", "flag",
]

FLAG_FACTOR = 10.0
# Jitter amplitude in units of the unit roundoff: the cast to the compute dtype plus the
# float64 arithmetic of the action (a 3-term dot product per component).
JITTER = 2.0
AT_FLOOR = "at_float_floor"
FLOOR_SAMPLES = 64  # the floor is measured on the samples with ids below this
FLOOR_COPIES = 4


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of one rounding (2⁻²⁴ for float32)."""
    return torch.finfo(dtype).eps / 2


def compute_dtype(model: torch.nn.Module, autocast: torch.dtype | None = None) -> torch.dtype:
    """The dtype the model's arithmetic rounds to: the autocast dtype, else its parameters'."""
    return autocast if autocast is not None else model_dtype(model)


class JitterAction(GroupAction):
    """The null orbit: ``act`` makes K copies of each non-scalar floating field, each entry
    moved by ``amplitude·scale·u``, ``u ~ U(−1, 1)`` (``scale`` the norm of its vector/tensor
    or a voxel's magnitude); ``act_inverse`` does the same at float64's roundoff.

    The elements are copy ids ``(B, K)`` int64 (:class:`JitterGroup`): ``u`` is drawn from
    ``random`` for each copy id, so a copy's jitter does not depend on its batch.
    ``point`` fields are centred first when ``centres_points`` (as the audited group does),
    so the copies sit where the audit's inputs sit.
    """

    name = "jitter"

    def __init__(self, amplitude: float, random: SampleRandom, centres_points: bool = True):
        self.amplitude = amplitude
        self.random = random
        self.centres_points = centres_points

    def act(self, rep, value, elements, mask=None):
        if get_representation(rep).centred and self.centres_points:
            value = actions.centre(value, mask)
        orbit = value.unsqueeze(1).expand(value.shape[0], elements.shape[1], *value.shape[1:])
        return self._jitter(rep, orbit, elements, self.amplitude, self.random)

    @staticmethod
    def _jitter(rep: str, orbit: torch.Tensor, elements: torch.Tensor, amplitude: float, random: SampleRandom) -> torch.Tensor:
        if get_representation(rep).invariant or not orbit.is_floating_point():
            return orbit
        # Rounding a rotated vector (or tensor) errs relative to its norm, not to each component.
        components = get_representation(rep).component_dims
        scale = orbit.abs() if components == 0 else orbit.flatten(-components).norm(dim=-1)[(...,) + (None,) * components]
        u = random.uniform(elements.reshape(-1).cpu(), orbit.shape[2:]).reshape(orbit.shape).to(orbit.device) * 2 - 1
        return orbit + amplitude * scale * u

    def act_inverse(self, rep, orbit, elements, mask=None):
        # The audit maps outputs back in float64: one more rounding at float64's roundoff.
        return self._jitter(rep, orbit, elements, JITTER * unit_roundoff(torch.float64), self.random.child("outputs"))


@dataclass(frozen=True)
class JitterGroup(IIDElements):
    """The "group" of the null orbit: K jittered copies per sample, as copy ids ``id·K + k``."""

    n_elements: int
    action: JitterAction
    name: str = "jitter"
    exact: bool = False

    def sample(self, ids: torch.Tensor, random: SampleRandom | None = None) -> torch.Tensor:
        k = self.n_elements
        return ids.reshape(-1, 1) * k + torch.arange(k, dtype=torch.int64, device=ids.device)


def null_orbit_error(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    ids: torch.Tensor,
    spec: OrbitSpec,
    *,
    seed: int = 0,
    n_copies: int = FLOOR_COPIES,
) -> dict[str, torch.Tensor]:
    """Per-sample equivariance error of the null orbit of one batch: ``{head: (B,)}``
    (bias-corrected like the audit's; weights and reductions as in the audit)."""
    eps = JITTER * unit_roundoff(compute_dtype(model, spec.autocast))
    jitter = JitterAction(eps, SampleRandom.named(seed, "float floor"), spec.group.action.centres_points)
    group = JitterGroup(max(2, n_copies), jitter)
    # The preset's own orbit builder (exact voxelization) is for rotations: not used here.
    null_spec = dataclasses.replace(spec, group=group, orbit_inputs=None)
    results = evaluate_orbits(model, batch, group.sample(ids), null_spec)
    return {head: result.equiv_error for head, result in results.items()}


def flag(rel_equiv_error: float, float_floor: float, factor: float = FLAG_FACTOR) -> str:
    """``at_float_floor`` when the REE is within ``factor`` × the floor, else empty."""
    if math.isnan(rel_equiv_error) or math.isnan(float_floor):
        return ""
    return AT_FLOOR if rel_equiv_error <= factor * float_floor else ""

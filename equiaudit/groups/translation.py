"""``translation``: shifts of the positions, for models that do not centre their inputs. Pure.

Elements are vectors ``t`` ``(N, K, 3)`` float64, uniform in the ball ``|t| ≤ radius``
(``shape: ball``, the default) or the box ``|t_i| ≤ radius`` (``shape: box``), drawn i.i.d.
(``exact`` is False, so the K/(K−1) and jackknife corrections apply). They act on ``point``
fields only — valid atoms move by ``t``, without centring — and ``point`` outputs move back
by ``−t``; every other representation is invariant. Grids are not translated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from equiaudit.groups.base import GroupAction, GroupEntry, expand_orbit, IIDElements, register_group, sample_inputs
from equiaudit.random import SampleRandom
from equiaudit.representations import get_representation

__all__ = ["TranslationAction", "TRANSLATION", "TranslationSet"]

_DEFAULT_K = 32


class TranslationAction(GroupAction):
    """Vectors ``t`` ``(B, K, 3)`` acting on ``point`` fields (see the module docstring)."""

    name = "translation"
    centres_points = False

    def _shift(self, rep, value, shift, mask):
        representation = get_representation(rep)
        if representation.grid:
            raise ValueError("the translation group does not act on voxel grids; use so3, o3 or octahedral")
        if not representation.translates:
            return value
        # value (B, K, N, 3); shift (B, K, 3) -> per atom, zero at padded atoms.
        shift = shift.unsqueeze(2)
        if mask is not None:
            shift = shift * mask[:, None, :, None].to(shift.dtype)
        return (value.to(shift.dtype) + shift).to(value.dtype)

    def act(self, rep, value, elements, mask=None):
        return self._shift(rep, expand_orbit(value, elements.shape[1]), elements, mask)

    def act_inverse(self, rep, orbit, elements, mask=None):
        return self._shift(rep, orbit, -elements, mask)


TRANSLATION = TranslationAction()


@dataclass(frozen=True)
class TranslationSet(IIDElements):
    """Shifts uniform in the ball ``|t| ≤ radius`` (``shape="ball"``) or the box ``|t_i| ≤ radius``."""

    n_elements: int
    radius: float = 1.0
    shape: str = "ball"
    name: str = "translation"
    exact: bool = False
    action: GroupAction = TRANSLATION

    def sample(self, ids: torch.Tensor | int, random: SampleRandom | int) -> torch.Tensor:
        """``(N, K, 3)`` float64."""
        ids, random = sample_inputs(ids, random)
        k = self.n_elements
        if self.shape == "box":
            return (random.uniform(ids, (k, 3)) * 2 - 1) * self.radius
        # Uniform direction times a radius with density ∝ r²: uniform in the ball.
        direction = random.normal(ids, (k, 3))
        direction = direction / direction.norm(dim=-1, keepdim=True)
        length = random.child("translation length").uniform(ids, (k, 1)) ** (1 / 3) * self.radius
        return direction * length


def _build(n_elements: int | None, options: Mapping[str, Any], context: Mapping[str, Any]) -> TranslationSet:
    k = _DEFAULT_K if n_elements is None else n_elements
    if k < 2:
        raise ValueError("group.rotations must be at least 2 (the error is a spread over group elements)")
    radius = options.get("radius", 1.0)
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"group.radius={radius!r} must be a positive number (same units as the positions)")
    shape = options.get("shape", "ball")
    if shape not in ("ball", "box"):
        raise ValueError(f"group.shape={shape!r} is not allowed; allowed: ball, box")
    return TranslationSet(k, float(radius), shape)


register_group(GroupEntry("translation", _build, options=("radius", "shape"), acts_on_grids=False))

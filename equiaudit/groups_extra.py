"""Groups beyond the proper rotations: ``o3``, ``translation`` and ``permutation``. Pure.

Each is an audit of its own with the same decomposition ``L_aug = L_sym + EE`` (the orbit
average over the group's distribution is the symmetrised model). Every set has the
:class:`~equiaudit.groups.RotationSet` interface (``group``, ``n_rotations``, ``exact``,
``sample(n_samples, generator)``) plus ``action``, the
:class:`~equiaudit.actions.group_actions.GroupAction` the engine applies:

* ``o3``: a Haar rotation times ``±I`` with a fair coin, ``(N, K, 3, 3)``. Axial outputs
  (cross products, angular momenta) must be declared ``pseudovector``.
* ``translation``: shifts ``(N, K, 3)`` uniform in a ball (or box) of radius ``radius``,
  acting on ``point`` fields only and without centring, for models that do not centre.
* ``permutation``: random permutations of each sample's valid atoms, as sort keys
  ``(N, K, A)``; padded atoms stay where they are.

Elements are drawn i.i.d., so the K/(K−1) and jackknife corrections apply (``exact`` is False).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from equiaudit import rotations as rot
from equiaudit.actions.group_actions import PERMUTATION, ROTATION, TRANSLATION, GroupAction

__all__ = ["EXTRA_GROUP_NAMES", "GROUP_OPTIONS", "O3Set", "TranslationSet", "PermutationSet", "make_extra_group", "group_action"]

EXTRA_GROUP_NAMES = ("o3", "translation", "permutation")
# Options of the config's ``group:`` section besides ``name`` and ``rotations`` (= K, elements per sample).
GROUP_OPTIONS = ("radius", "shape")
_DEFAULT_K = 32


@dataclass(frozen=True)
class O3Set:
    """Haar on O(3): ``R`` or ``−R`` (``R`` Haar on SO(3)) with probability 1/2 each."""

    n_rotations: int
    group: str = "o3"
    exact: bool = False
    action: GroupAction = ROTATION

    def sample(self, n_samples: int, generator: torch.Generator) -> torch.Tensor:
        """``(n_samples, K, 3, 3)`` float64; about half of them improper (det −1)."""
        k = self.n_rotations
        proper = rot.haar_rotations(n_samples * k, generator).reshape(n_samples, k, 3, 3)
        signs = torch.randint(2, (n_samples, k), generator=generator).to(torch.float64) * 2 - 1
        return proper * signs[..., None, None]


@dataclass(frozen=True)
class TranslationSet:
    """Shifts uniform in the ball ``|t| ≤ radius`` (``shape="ball"``) or the box ``|t_i| ≤ radius``."""

    n_rotations: int
    radius: float = 1.0
    shape: str = "ball"
    group: str = "translation"
    exact: bool = False
    action: GroupAction = TRANSLATION

    def sample(self, n_samples: int, generator: torch.Generator) -> torch.Tensor:
        """``(n_samples, K, 3)`` float64."""
        n = n_samples * self.n_rotations
        if self.shape == "box":
            shifts = (torch.rand(n, 3, generator=generator, dtype=torch.float64) * 2 - 1) * self.radius
        else:
            # Uniform direction times a radius with density ∝ r²: uniform in the ball.
            direction = torch.randn(n, 3, generator=generator, dtype=torch.float64)
            direction = direction / direction.norm(dim=-1, keepdim=True)
            length = torch.rand(n, 1, generator=generator, dtype=torch.float64) ** (1 / 3) * self.radius
            shifts = direction * length
        return shifts.reshape(n_samples, self.n_rotations, 3)


@dataclass(frozen=True)
class PermutationSet:
    """Uniformly random permutations of the ``n_atoms`` atom slots, as sort keys (see
    :func:`~equiaudit.actions.group_actions.permutation_index`)."""

    n_rotations: int
    n_atoms: int
    group: str = "permutation"
    exact: bool = False
    action: GroupAction = PERMUTATION

    def sample(self, n_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Sort keys ``(n_samples, K, n_atoms)`` float64."""
        return torch.rand(n_samples, self.n_rotations, self.n_atoms, generator=generator, dtype=torch.float64)


def make_extra_group(
    name: str,
    n_rotations: int | None,
    options: Mapping[str, Any] | None = None,
    *,
    n_atoms: int | None = None,
):
    """A validated set for ``o3``, ``translation`` or ``permutation``; raises ``ValueError``.

    ``options``: ``radius`` (> 0, default 1.0) and ``shape`` (``ball`` | ``box``) for
    ``translation``; none for the others. ``n_atoms``: the atom axis length, needed by
    ``permutation``.
    """
    if name not in EXTRA_GROUP_NAMES:
        raise ValueError(f"unknown group {name!r}; allowed: {', '.join(EXTRA_GROUP_NAMES)}")
    options = dict(options or {})
    allowed = GROUP_OPTIONS if name == "translation" else ()
    for key in options:
        if key not in allowed:
            raise ValueError(f"group.{key} does not apply to group {name}" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
    k = _DEFAULT_K if n_rotations is None else n_rotations
    if k < 2:
        raise ValueError("group.rotations must be at least 2 (the error is a spread over group elements)")
    if name == "o3":
        return O3Set(k)
    if name == "translation":
        radius = options.get("radius", 1.0)
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
            raise ValueError(f"group.radius={radius!r} must be a positive number (same units as the positions)")
        shape = options.get("shape", "ball")
        if shape not in ("ball", "box"):
            raise ValueError(f"group.shape={shape!r} is not allowed; allowed: ball, box")
        return TranslationSet(k, float(radius), shape)
    if n_atoms is None:
        raise ValueError("the permutation group needs per-atom data (a mask or a point field (N, A, 3))")
    return PermutationSet(k, n_atoms)


def group_action(group_set) -> GroupAction:
    """The action of any set (a :class:`~equiaudit.groups.RotationSet` acts by rotation)."""
    return getattr(group_set, "action", ROTATION)

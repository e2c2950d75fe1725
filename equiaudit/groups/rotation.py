"""Proper rotations: ``so3`` (continuous) and the finite ``octahedral`` (24) and ``icosahedral`` (60). Pure.

A :class:`RotationSet` turns sample ids into rotations ``(N, K, 3, 3)`` float64; a sample's
rotations depend only on the seed and its id (:mod:`equiaudit.random`), so every
checkpoint sees the same samples under the same rotations (common random numbers)
whatever the batch size, the loader order or the process.

Sampling on ``so3`` (the estimators are in ``docs/uncertainty.md``):

* ``haar``: K i.i.d. Haar rotations per sample (``blocks = K``).
* ``quasi``: M ≥ 2 blocks, each a finite rotation group ``H`` (icosahedral 60,
  octahedral 24 or tetrahedral 12: the largest with ``K = M·|H|``) turned by its own
  Haar rotation ``G``: ``R = G·h``. Each group is a spherical design on SO(3) (its
  averages are exact for all Wigner-D components of degree ℓ ≤ 5, 3, 2), so block
  averages are far less noisy than i.i.d. ones. ``K`` must be a multiple of 12, ≥ 24.
* ``fibonacci``: two blocks of K/2 rotations, a super-Fibonacci spiral turned by a Haar
  rotation per block. Any even ``K``; it only beats ``haar`` for K ≳ 64.

In both randomised sets every ``R = G·Q`` is marginally Haar for any fixed ``Q`` because
Haar measure is bi-invariant (``Q·G`` would be as well; we turn the whole set rigidly,
which keeps its spacing). The blocks are independent, so
:func:`~equiaudit.metrics.orbit_terms` with ``blocks=M`` removes the bias of the orbit
mean exactly (MSE) whatever the rotations inside a block.

Haar rotations come from four standard normals per rotation (a uniform unit quaternion).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from equiaudit import rotations as rot
from equiaudit.groups.base import ROTATION, GroupAction, GroupEntry, register_group, sample_inputs
from equiaudit.random import SampleRandom

__all__ = ["RotationSet", "ROTATION_GROUPS", "SAMPLINGS", "make_rotation_set"]

ROTATION_GROUPS = ("so3", "octahedral", "icosahedral")
SAMPLINGS = ("haar", "quasi", "fibonacci")
# Finite groups used as randomised designs by ``quasi``, largest first.
_DESIGNS = ((60, rot.icosahedral_rotations), (24, rot.cube_rotations), (12, rot.tetrahedral_rotations))
_DEFAULT_K = {"quasi": 24, "haar": 32, "fibonacci": 32}
_SIZES = {"octahedral": 24, "icosahedral": 60}


def _quasi_design(k: int) -> torch.Tensor | None:
    """The largest design group ``H`` with ``k = M·|H|``, ``M ≥ 2``; None if there is none."""
    for order, elements in _DESIGNS:
        if k % order == 0 and k // order >= 2:
            return elements()
    return None


def haar(ids: torch.Tensor, random: SampleRandom, count: int) -> torch.Tensor:
    """``count`` Haar rotations per sample: ``(N, count, 3, 3)`` float64."""
    return rot.quaternion_to_matrix(random.normal(ids, (count, 4)))


@dataclass(frozen=True)
class RotationSet:
    """How the K rotations of each sample are chosen.

    Attributes:
        name: ``so3``, ``octahedral`` (24 cube rotations) or ``icosahedral`` (60).
        n_elements: K, rotations per sample.
        sampling: ``haar``, ``quasi`` or ``fibonacci`` (see the module docstring);
            finite groups always use ``haar`` (uniform over their elements).
    """

    name: str
    n_elements: int
    sampling: str = "haar"

    action: GroupAction = ROTATION

    @property
    def finite_elements(self) -> torch.Tensor | None:
        if self.name == "octahedral":
            return rot.cube_rotations()
        if self.name == "icosahedral":
            return rot.icosahedral_rotations()
        return None

    @property
    def exact(self) -> bool:
        """The whole finite group is enumerated: orbit averages are exact, no correction applies."""
        elements = self.finite_elements
        return elements is not None and self.n_elements == len(elements)

    @property
    def base(self) -> torch.Tensor | None:
        """The deterministic set that each block turns, ``(K/M, 3, 3)``; None for i.i.d. sets."""
        if self.sampling == "quasi":
            return _quasi_design(self.n_elements)
        if self.sampling == "fibonacci":
            return rot.super_fibonacci_rotations(self.n_elements // 2)
        return None

    @property
    def blocks(self) -> int:
        """M, the number of independent blocks along K (K for i.i.d. rotations)."""
        base = self.base
        return self.n_elements if base is None else self.n_elements // len(base)

    @property
    def label(self) -> str:
        detail = "exact" if self.exact else ("" if self.sampling == "haar" else self.sampling)
        return f"{self.name} ({detail})" if detail else self.name

    def sample(self, ids: torch.Tensor | int, random: SampleRandom | int) -> torch.Tensor:
        """Rotations for the samples ``ids`` (or ``0 … ids−1`` for an int): ``(N, K, 3, 3)`` float64.

        ``random``: a :class:`~equiaudit.random.SampleRandom` (or a seed). Randomised sets are
        laid out block by block: ``R[b, m·|Q| + j] = G[b, m] · Q[j]``.
        """
        ids, random = sample_inputs(ids, random)
        k = self.n_elements
        base = self.base
        if base is not None:
            m = k // len(base)
            turns = haar(ids, random, m).unsqueeze(2)  # (N, M, 1, 3, 3)
            return (turns @ base.to(turns.device)).reshape(len(ids), k, 3, 3)
        elements = self.finite_elements
        if elements is None:
            return haar(ids, random, k)
        elements = elements.to(ids.device)
        if self.exact:
            return elements.expand(len(ids), -1, -1, -1).clone()
        # Fewer than the whole group: i.i.d. uniform over its elements (with replacement),
        # which keeps the K/(K-1) and jackknife corrections exact.
        return elements[random.randint(ids, len(elements), (k,))]


def make_rotation_set(group: str, n_rotations: int | None, sampling: str | None = None) -> RotationSet:
    """Validated :class:`RotationSet`; ``None`` means the default. Raises ``ValueError``.

    Defaults on ``so3``: ``quasi`` with K = 24 when neither is given; with only K given,
    ``quasi`` when K allows it (a multiple of 12, at least 24), else ``haar``.
    """
    if group not in ROTATION_GROUPS:
        raise ValueError(f"unknown group {group!r}; allowed: {', '.join(ROTATION_GROUPS)}")
    if sampling is not None and sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; allowed: {', '.join(SAMPLINGS)}")
    if group != "so3":
        if sampling not in (None, "haar"):
            raise ValueError(f"sampling {sampling!r} applies to so3 only (group is {group})")
        sampling = "haar"
    elif sampling is None:
        sampling = "quasi" if n_rotations is None or _quasi_design(n_rotations) is not None else "haar"
    size = _SIZES.get(group)
    if n_rotations is None:
        n_rotations = size or _DEFAULT_K[sampling]
    if n_rotations < 2:
        raise ValueError("group.rotations must be at least 2 (the error is a spread over rotations)")
    if size is not None and n_rotations > size:
        raise ValueError(f"group.rotations={n_rotations} exceeds the {size} elements of {group}")
    if sampling == "quasi" and _quasi_design(n_rotations) is None:
        raise ValueError(
            f"group.rotations={n_rotations} does not suit sampling 'quasi': use a multiple of 12, "
            "at least 24 (e.g. 24, 48, 120)"
        )
    if sampling == "fibonacci" and n_rotations % 2:
        raise ValueError(f"group.rotations={n_rotations} must be even with sampling 'fibonacci' (two blocks)")
    return RotationSet(group, n_rotations, sampling)


def _build(name: str):
    def build(n_elements: int | None, options: Mapping[str, Any], context: Mapping[str, Any]) -> RotationSet:
        return make_rotation_set(name, n_elements, options.get("sampling"))

    return build


for _name in ROTATION_GROUPS:
    register_group(GroupEntry(_name, _build(_name), options=("sampling",)))

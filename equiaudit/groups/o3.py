"""``o3``: rotations and reflections, Haar on O(3). Pure.

Each element is ``s·R`` with ``R`` Haar on SO(3) and a fair sign ``s = ±1`` (``−I`` is the
inversion), so half the elements are improper (det −1). Axial outputs (cross products,
angular momenta, magnetic moments) must be declared ``pseudovector``: they pick up
``det`` under the action (:mod:`equiaudit.representations`). Elements are drawn i.i.d., so
the K/(K−1) and jackknife corrections apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from equiaudit.groups.base import ROTATION, GroupAction, GroupEntry, IIDElements, register_group, sample_inputs
from equiaudit.groups.rotation import haar
from equiaudit.random import SampleRandom

__all__ = ["O3Set"]

_DEFAULT_K = 32


@dataclass(frozen=True)
class O3Set(IIDElements):
    """Haar on O(3): ``R`` or ``−R`` (``R`` Haar on SO(3)) with probability 1/2 each."""

    n_elements: int
    name: str = "o3"
    exact: bool = False
    action: GroupAction = ROTATION

    def sample(self, ids: torch.Tensor | int, random: SampleRandom | int) -> torch.Tensor:
        """``(N, K, 3, 3)`` float64; about half of them improper (det −1)."""
        ids, random = sample_inputs(ids, random)
        proper = haar(ids, random, self.n_elements)
        signs = random.child("o3 signs").randint(ids, 2, (self.n_elements,)).to(torch.float64) * 2 - 1
        return proper * signs[..., None, None]


def _build(n_elements: int | None, options: Mapping[str, Any], context: Mapping[str, Any]) -> O3Set:
    k = _DEFAULT_K if n_elements is None else n_elements
    if k < 2:
        raise ValueError("group.rotations must be at least 2 (the error is a spread over group elements)")
    return O3Set(k)


register_group(GroupEntry("o3", _build))

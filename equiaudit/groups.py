"""Rotation sets for an audit: which rotations each sample's orbit is evaluated on. Pure.

A :class:`RotationSet` turns ``(n_samples, generator)`` into rotations of shape
``(n_samples, K, 3, 3)``. The whole dataset's rotations are drawn once, up front, from a
seeded generator, so every checkpoint sees the same samples under the same rotations
(common random numbers) whatever the batch or chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from equiaudit import rotations as rot

__all__ = ["RotationSet", "GROUP_NAMES", "make_rotation_set"]

GROUP_NAMES = ("so3", "octahedral", "icosahedral")


@dataclass(frozen=True)
class RotationSet:
    """How the K rotations of each sample are chosen.

    Attributes:
        group: ``so3`` (Haar i.i.d.), ``octahedral`` (24 cube rotations) or
            ``icosahedral`` (60).
        n_rotations: K, rotations per sample.
        exact: the whole finite group is enumerated, so orbit averages are exact and
            no Monte Carlo bias correction applies.
    """

    group: str
    n_rotations: int

    @property
    def finite_elements(self) -> torch.Tensor | None:
        if self.group == "octahedral":
            return rot.cube_rotations()
        if self.group == "icosahedral":
            return rot.icosahedral_rotations()
        return None

    @property
    def exact(self) -> bool:
        elements = self.finite_elements
        return elements is not None and self.n_rotations == len(elements)

    def sample(self, n_samples: int, generator: torch.Generator) -> torch.Tensor:
        """Rotations for ``n_samples`` samples: ``(n_samples, K, 3, 3)``, float64, CPU."""
        k = self.n_rotations
        elements = self.finite_elements
        if elements is None:
            return rot.haar_rotations(n_samples * k, generator).reshape(n_samples, k, 3, 3)
        if self.exact:
            return elements.expand(n_samples, -1, -1, -1).clone()
        # Fewer than the whole group: i.i.d. uniform over its elements (with replacement),
        # which keeps the K/(K-1) and jackknife corrections exact.
        index = torch.randint(len(elements), (n_samples, k), generator=generator)
        return elements[index]


def make_rotation_set(group: str, n_rotations: int | None) -> RotationSet:
    """Validated :class:`RotationSet`; ``n_rotations=None`` means the default for the group."""
    if group not in GROUP_NAMES:
        raise ValueError(f"unknown group {group!r}; allowed: {', '.join(GROUP_NAMES)}")
    size = {"octahedral": 24, "icosahedral": 60}.get(group)
    if n_rotations is None:
        n_rotations = size or 32
    if n_rotations < 2:
        raise ValueError("group.rotations must be at least 2 (the error is a spread over rotations)")
    if size is not None and n_rotations > size:
        raise ValueError(f"group.rotations={n_rotations} exceeds the {size} elements of {group}")
    return RotationSet(group, n_rotations)

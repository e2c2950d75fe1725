"""Group actions on fields: the per-representation kernels behind :mod:`equiaudit.representations`.

One entry point for every caller:

* :func:`rotate` takes a field of one sample per row, ``(B, ...)``, and rotations
  ``(B, K, 3, 3)``, and returns the orbit ``(B, K, ...)``: ``out[b, k] = R[b, k] · value[b]``.
* :func:`unrotate` takes an orbit ``(B, K, ...)`` and returns ``R[b, k]⁻¹ · value[b, k]``.

``point`` fields are centred on their masked centroid before rotating; ``unrotate`` of a
``point`` output is a plain ``Rᵀ`` (outputs live in the centred frame). The kernels live in
:mod:`~equiaudit.actions.points` (centring) and :mod:`~equiaudit.actions.voxels` (grids).
"""

from __future__ import annotations

import torch

from equiaudit.actions.points import centre, masked_centroid

__all__ = ["rotate", "unrotate", "centre", "masked_centroid"]


def rotate(rep: str, value: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Orbit of a field: value ``(B, ...)``, rotations ``(B, K, 3, 3)`` → ``(B, K, ...)``.

    ``mask`` ``(B, N)`` marks valid atoms for centring ``point`` fields.
    """
    from equiaudit.representations import get_representation  # (it imports this package's kernels)

    return get_representation(rep).orbit(value, rotations, mask)


def unrotate(rep: str, value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Map an orbit back to each sample's own frame: ``(B, K, ...)`` → ``R⁻¹ · value``."""
    from equiaudit.representations import get_representation

    return get_representation(rep).back(value, rotations)

"""Group actions: how each representation is rotated (``g·v``) and rotated back (``g⁻¹·v``).

One entry point for every caller:

* :func:`rotate` takes a field of one sample per row, ``(B, ...)``, and rotations
  ``(B, K, 3, 3)``, and returns the orbit ``(B, K, ...)``: ``out[b, k] = R[b, k] · value[b]``.
* :func:`unrotate` takes an orbit ``(B, K, ...)`` and returns ``R[b, k]⁻¹ · value[b, k]``.

``point`` fields are centred on their masked centroid before rotating; ``unrotate`` of a
``point`` output is a plain ``Rᵀ`` (outputs live in the centred frame).
"""

from __future__ import annotations

import torch

from equiaudit.actions.points import POINT_REPRESENTATIONS, apply_rotation, centre, masked_centroid

__all__ = ["rotate", "unrotate", "centre", "masked_centroid", "REPRESENTATIONS", "check_representation"]

REPRESENTATIONS = POINT_REPRESENTATIONS + ("voxel",)


def check_representation(rep: str) -> str:
    if rep not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {rep!r}; allowed: {', '.join(REPRESENTATIONS)}")
    return rep


def rotate(rep: str, value: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Orbit of a field: value ``(B, ...)``, rotations ``(B, K, 3, 3)`` → ``(B, K, ...)``.

    ``mask`` ``(B, N)`` marks valid atoms for centring ``point`` fields.
    """
    check_representation(rep)
    k = rotations.shape[1]
    if rep == "voxel":
        from equiaudit.actions import voxels

        return voxels.rotate_grid(value, rotations)
    if rep == "point":
        value = centre(value, mask)
    expanded = value.unsqueeze(1).expand(value.shape[0], k, *value.shape[1:])
    return apply_rotation(rep, expanded, rotations)


def unrotate(rep: str, value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Map an orbit back to each sample's own frame: ``(B, K, ...)`` → ``R⁻¹ · value``."""
    check_representation(rep)
    if rep == "voxel":
        from equiaudit.actions import voxels

        return voxels.unrotate_grid(value, rotations)
    # For improper R (O(3)) the inverse is still Rᵀ, and det(Rᵀ) = det(R).
    return apply_rotation(rep, value, rotations.transpose(-1, -2))

"""Rotation actions on per-sample and per-atom tensors. Pure math.

Shapes: a field has a leading sample axis ``B``; per-atom fields are ``(B, N, ...)``
padded with a boolean mask ``(B, N)``. Rotations are ``(B, K, 3, 3)``: K rotations per
sample. Results carry both axes, ``(B, K, ...)``.

Convention: vectors are rows, so ``R v`` is computed as ``v @ R.T``. The arithmetic runs
in the rotations' dtype (float64 by default) and the result is cast back to the
value's dtype, so the tool adds at most one rounding to the model's input.
"""

from __future__ import annotations

import torch

__all__ = ["masked_centroid", "centre", "apply_rotation", "POINT_REPRESENTATIONS"]

POINT_REPRESENTATIONS = ("scalar", "point", "vector", "pseudovector", "tensor2")


def masked_centroid(positions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Centroid of the valid atoms: positions ``(B, N, 3)``, mask ``(B, N)`` → ``(B, 1, 3)``."""
    if mask is None:
        return positions.mean(dim=1, keepdim=True)
    weights = mask.to(positions.dtype).unsqueeze(-1)
    return (positions * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)


def centre(positions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions ``(B, N, 3)`` minus their masked centroid; padded atoms are set to 0."""
    centred = positions - masked_centroid(positions, mask)
    if mask is not None:
        centred = centred * mask.to(positions.dtype).unsqueeze(-1)
    return centred


def apply_rotation(rep: str, value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Apply ``R`` to a value that already has the rotation axis: ``(B, K, ...)`` → same shape.

    ``scalar``: unchanged. ``point``/``vector``: ``R v`` on the last axis (size 3).
    ``pseudovector``: ``det(R) R v`` (differs from ``vector`` only for improper R).
    ``tensor2``: ``R T Rᵀ`` on the last two axes (3, 3). ``point`` is centred by the
    caller (see :func:`centre`): here it rotates about the origin like a vector.
    """
    if rep == "scalar":
        return value
    work = value.to(rotations.dtype)
    if rep in ("point", "vector", "pseudovector"):
        out = torch.einsum("bkij,bk...j->bk...i", rotations, work)
        if rep == "pseudovector":
            det = torch.linalg.det(rotations)
            out = out * det.reshape(*det.shape, *([1] * (out.dim() - 2)))
    elif rep == "tensor2":
        out = torch.einsum("bkij,bk...jl,bkml->bk...im", rotations, work, rotations)
    else:
        raise ValueError(f"unknown representation {rep!r}; allowed: {', '.join(POINT_REPRESENTATIONS)}")
    return out.to(value.dtype)

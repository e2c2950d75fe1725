"""Centring of per-atom positions before a rotation about the origin. Pure math.

Shapes: a field has a leading sample axis ``B``; per-atom fields are ``(B, N, ...)``
padded with a boolean mask ``(B, N)``. The rotation of each representation (which calls
this centring for ``point`` fields) is defined in :mod:`equiaudit.representations`.
"""

from __future__ import annotations

import torch

__all__ = ["masked_centroid", "centre"]


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

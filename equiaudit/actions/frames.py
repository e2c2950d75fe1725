"""Residue frames: per-residue rotations from backbone atoms, and how the group moves them. Pure.

Convention (AlphaFold2's ``rigid_from_3_points``, Jumper et al. 2021, Suppl. Alg. 21; the
one FrameFlow, Genie and OpenFold use): with ``v1 = C − CA`` and ``v2 = N − CA``,

* ``e1 = v1 / |v1|``;
* ``e2 = u2 / |u2|`` with ``u2 = v2 − (e1·v2) e1`` (Gram–Schmidt);
* ``e3 = e1 × e2``;

and the frame is the rotation ``R = [e1 e2 e3]`` (columns), ``det R = +1``, translation ``CA``.
A residue's local coordinates ``x_local`` map to the global ones as ``CA + R x_local``.

Group action. A proper rotation ``g`` moves the atoms to ``g·x``, so ``v1, v2`` to ``g v1, g v2``
and the frame to ``g R`` (left multiplication): frames built from atoms are exactly
equivariant. An improper ``g`` (``o3``) would flip ``e1 × e2`` relative to ``g e1, g e2``: the
frame of the reflected atoms is ``g R diag(1, 1, det g)``, still a rotation, and that is the
action used here (:func:`act_on_frames`), so the identity ``frames(g·x) = g·frames(x)`` holds
on all of O(3).
"""

from __future__ import annotations

import torch

__all__ = ["frames_from_backbone", "act_on_frames", "geodesic_angle", "nearest_rotation"]


def frames_from_backbone(n: torch.Tensor, ca: torch.Tensor, c: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Frames ``(..., 3, 3)`` (columns ``e1, e2, e3``) from atoms ``N, CA, C`` ``(..., 3)``.

    Degenerate residues (coincident or collinear atoms: missing atoms stored as zeros)
    give a finite matrix; mask them (the structure reader does)."""
    v1, v2 = c - ca, n - ca
    e1 = v1 / v1.norm(dim=-1, keepdim=True).clamp_min(eps)
    u2 = v2 - (e1 * v2).sum(-1, keepdim=True) * e1
    e2 = u2 / u2.norm(dim=-1, keepdim=True).clamp_min(eps)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1)


def act_on_frames(frames: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``g·R = g R diag(1, 1, det g)``: frames ``(B, K, ..., 3, 3)`` under ``rotations``
    ``(B, K, 3, 3)`` (float64 arithmetic, cast back to the frames' dtype)."""
    out = torch.einsum("bkij,bk...jl->bk...il", rotations, frames.to(rotations.dtype))
    det = torch.linalg.det(rotations)
    if bool((det < 0).any()):
        flip = torch.ones(*det.shape, 3, dtype=out.dtype, device=out.device)
        flip[..., 2] = det
        out = out * flip.reshape(*det.shape, *([1] * (out.dim() - 4)), 1, 3)
    return out.to(frames.dtype)


def geodesic_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The rotation angle of ``aᵀ b`` ``(...)`` in radians, in ``[0, π]``, for rotations ``(..., 3, 3)``.

    ``arccos((tr(aᵀb) − 1)/2)``, clamped; its square is the geodesic loss on SO(3), which is
    **not convex** in the prediction (the metric's Jensen gap can be negative with it: see
    ``docs/metric.md``)."""
    trace = (a * b).sum((-1, -2))
    return torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0))


def nearest_rotation(matrices: torch.Tensor) -> torch.Tensor:
    """The rotation closest in Frobenius norm to each ``(..., 3, 3)`` matrix: ``U diag(1, 1, det UVᵀ) Vᵀ``
    from its SVD (the chordal L2 mean of rotations, when given their average). Exact rotations
    come back unchanged to rounding."""
    u, _, vh = torch.linalg.svd(matrices)
    det = torch.linalg.det(u @ vh)
    fix = torch.ones(*det.shape, 3, dtype=matrices.dtype, device=matrices.device)
    fix[..., 2] = det
    return (u * fix[..., None, :]) @ vh

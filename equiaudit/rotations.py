"""Rotation matrices: Haar sampling, finite groups, conversions. Pure math, no I/O.

Conventions used everywhere in equiaudit:

* A rotation is a proper orthogonal matrix ``R`` of shape ``(..., 3, 3)``, ``det R = +1``.
* It acts on a column vector as ``R v``; on the row-vector tensors we store
  (``(..., 3)``), that is ``v @ R.T``.
* Rotations are float64 by default: the tool rotates in double precision so that it
  adds no error of its own to what the model does.
* Every random function takes an explicit ``torch.Generator`` (CPU); samples are drawn
  on the CPU and then moved, so the same seed gives the same rotations on any device.
"""

from __future__ import annotations

import itertools
import math

import torch

__all__ = [
    "haar_rotations",
    "super_fibonacci_rotations",
    "quaternion_to_matrix",
    "cube_rotations",
    "tetrahedral_rotations",
    "icosahedral_rotations",
    "rotation_angle",
    "so3_generators",
    "axis_angle_to_matrix",
    "is_signed_permutation",
]


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` as ``(w, x, y, z)`` → rotation matrices ``(..., 3, 3)``.

    ``q`` and ``-q`` give the same matrix; ``q`` need not be normalised.
    """
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def haar_rotations(
    n: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` i.i.d. Haar-uniform rotations, shape ``(n, 3, 3)``.

    A standard normal 4-vector, normalised, is uniform on S³; its rotation matrix is
    Haar-distributed on SO(3) (the double cover maps uniform to uniform).
    """
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)


# Super-Fibonacci constants (Alexa 2022): φ = √2 and ψ, the real root of ψ⁴ = ψ + 4.
_SF_PHI = math.sqrt(2.0)
_SF_PSI = 1.533751168755204288118041


def super_fibonacci_rotations(
    n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """``n`` deterministic, quasi-uniform rotations on SO(3): shape ``(n, 3, 3)``.

    Super-Fibonacci spiral (M. Alexa, "Super-Fibonacci Spirals: Fast, Low-Discrepancy
    Sampling of SO(3)", CVPR 2022): for ``s = i + ½``, ``r = √(s/n)``, ``R = √(1 − s/n)``,
    ``α = 2πs/φ``, ``β = 2πs/ψ``, the unit quaternion ``(r sin α, r cos α, R sin β, R cos β)``.
    The points are area-uniform in the Hopf-like coordinates ``(r, α, β)`` of S³ and spread
    by two incommensurate golden-ratio-like rotations, giving low discrepancy for any ``n``.
    Averages of smooth functions over these rotations converge much faster than i.i.d.
    Haar averages; they are not random, so :class:`~equiaudit.groups.RotationSet`
    randomises them by a Haar rotation per sample.
    """
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r, big_r = torch.sqrt(s / n), torch.sqrt(1 - s / n)
    alpha, beta = 2 * math.pi * s / _SF_PHI, 2 * math.pi * s / _SF_PSI
    q = torch.stack([r * torch.sin(alpha), r * torch.cos(alpha), big_r * torch.sin(beta), big_r * torch.cos(beta)], -1)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)


def is_signed_permutation(rotations: torch.Tensor, atol: float = 1e-9) -> bool:
    """True when every matrix in ``(..., 3, 3)`` has entries in {-1, 0, 1} (a cube symmetry)."""
    r = rotations.abs()
    return bool(((r < atol) | ((r - 1).abs() < atol)).all())


def cube_rotations(*, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The 24 proper rotations of the cube (signed permutation matrices, det +1): ``(24, 3, 3)``.

    Order is deterministic; element 0 is the identity.
    """
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=torch.float64)
            for row, (col, s) in enumerate(zip(perm, signs)):
                m[row, col] = s
            if torch.linalg.det(m) > 0:
                mats.append(m)
    out = torch.stack(mats)
    identity_first = torch.argsort((out - torch.eye(3, dtype=out.dtype)).abs().sum((-1, -2)), stable=True)
    return out[identity_first].to(dtype=dtype, device=device)


def tetrahedral_rotations(*, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The 12 proper rotations of the tetrahedron: ``(12, 3, 3)``, identity first.

    The cube rotations whose underlying axis permutation is even (A₄: the identity, the
    three 180° turns about the axes, the eight 120° turns about the body diagonals).
    """
    cube = cube_rotations()
    even = torch.linalg.det(cube.abs()) > 0  # |R| is the permutation matrix
    return cube[even].to(dtype=dtype, device=device)


def _closure(generators: torch.Tensor, expected: int) -> torch.Tensor:
    """All products of ``generators`` (``(g, 3, 3)``, float64), deduplicated; ``(expected, 3, 3)``."""
    elements = [torch.eye(3, dtype=torch.float64)]
    keys = {tuple(torch.round(elements[0] * 1e6).flatten().tolist())}
    frontier = list(elements)
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                b = g @ a
                key = tuple(torch.round(b * 1e6).flatten().tolist())
                if key not in keys:
                    keys.add(key)
                    new.append(b)
        elements.extend(new)
        frontier = new
        if len(elements) > expected:
            raise AssertionError("group closure exceeded the expected order")
    if len(elements) != expected:
        raise AssertionError(f"group closure has {len(elements)} elements, expected {expected}")
    return torch.stack(elements)


def icosahedral_rotations(*, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The 60 proper rotations of the icosahedron: ``(60, 3, 3)``, identity first.

    Generated by a 5-fold rotation about a vertex axis ``(0, 1, φ)`` and a 2-fold
    rotation about ``z`` (both symmetries of the icosahedron with vertices at the
    cyclic permutations of ``(0, ±1, ±φ)``).
    """
    phi = (1 + math.sqrt(5)) / 2
    axis = torch.tensor([0.0, 1.0, phi], dtype=torch.float64)
    five_fold = axis_angle_to_matrix(axis / axis.norm(), torch.tensor(2 * math.pi / 5, dtype=torch.float64))
    two_fold = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    group = _closure(torch.stack([five_fold, two_fold]), 60)
    return group.to(dtype=dtype, device=device)


def so3_generators(*, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The standard basis of so(3): ``(3, 3, 3)``, ``L[j] v = e_j × v``.

    ``(L_x)_{zy} = 1``, ``(L_x)_{yz} = -1`` and cyclic; ``exp(θ L_j)`` rotates by θ
    counter-clockwise about axis ``j``.
    """
    L = torch.zeros(3, 3, 3, dtype=dtype, device=device)
    for j in range(3):
        k, m = (j + 1) % 3, (j + 2) % 3
        L[j, m, k] = 1.0
        L[j, k, m] = -1.0
    return L


def axis_angle_to_matrix(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Unit axes ``(..., 3)`` and angles ``(...)`` → rotations ``(..., 3, 3)`` (right-hand rule)."""
    generators = so3_generators(dtype=axis.dtype, device=axis.device)
    skew = torch.einsum("...j,jab->...ab", axis, generators)
    return torch.linalg.matrix_exp(skew * angle[..., None, None])


def rotation_angle(rotations: torch.Tensor) -> torch.Tensor:
    """Rotation angle in ``[0, π]`` of each matrix in ``(..., 3, 3)``: shape ``(...)``."""
    trace = rotations.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.arccos(((trace - 1) / 2).clamp(-1.0, 1.0))

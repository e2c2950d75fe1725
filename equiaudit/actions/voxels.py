"""Rotations of scalar fields sampled on voxel grids. Pure math.

Layout and axis convention (shared with :mod:`equiaudit.voxelize`):

* A grid is ``(B, C, D, H, W)``. The spatial axes ``(D, H, W)`` are ``(z, y, x)``:
  ``grid[b, c, d, h, w]`` is the field at the voxel centre
  ``(x, y, z) = ((w - (W-1)/2)·res, (h - (H-1)/2)·res, (d - (D-1)/2)·res)``
  (see :func:`voxel_centres`). The origin is the centre of the volume: for an even size
  it is a voxel corner, for an odd size the centre of the middle voxel.
* A rotation ``R`` acts on ``(x, y, z)`` coordinates as ``R v`` (row vectors: ``v @ R.T``),
  exactly as on point clouds. On a field it acts by ``(R·F)(r) = F(R⁻¹ r)``: the content
  moves with ``R``, so voxelizing rotated atoms equals rotating the voxelized grid.
  ``R⁻¹ = Rᵀ``.

Two paths:

* **exact**: when every matrix is a signed permutation (the 24 cube rotations; the other
  24 signed permutations, with det −1, work too), voxel centres map onto voxel centres.
  The result is one ``torch.gather`` with a precomputed flat index map per group element:
  no interpolation, bit-exact. Needs a cubic grid.
* **trilinear**: otherwise, ``affine_grid`` + ``grid_sample`` (trilinear, zero padding).
  This adds an interpolation error even for a perfectly equivariant model; corners also
  rotate out of (and zeros into) the box, which :func:`spherical_mask` excludes.

``ALIGN_CORNERS = False``. Both values give the same rotation about the volume centre
once theta is conjugated by the matching normalised-coordinate scale (done here), so the
choice only fixes how normalised coordinates are read: with ``False`` (PyTorch's default)
``[-1, 1]`` spans the faces of the volume, voxel ``i`` being the cell ``[i, i+1)`` as in
the voxelizer, and the normalised voxel centres ``(2i+1)/L − 1`` are exact binary
fractions for power-of-two sizes, so the trilinear path reproduces cube rotations to
(nearly) the last bit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from equiaudit.rotations import cube_rotations, is_signed_permutation

__all__ = [
    "ALIGN_CORNERS",
    "rotate_grid",
    "unrotate_grid",
    "cube_rotation_index",
    "spherical_mask",
    "voxel_centres",
]

ALIGN_CORNERS = False

_METHODS = ("auto", "exact", "trilinear")


def _shape3(shape) -> tuple[int, int, int]:
    if isinstance(shape, int):
        return (shape, shape, shape)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"expected a spatial shape (D, H, W); got {shape}")
    return shape


def voxel_centres(
    shape: int | tuple[int, int, int],
    resolution: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coordinates of the voxel centres, ``(D, H, W, 3)`` with the last axis ``(x, y, z)``.

    ``out[d, h, w] = ((w - (W-1)/2)·res, (h - (H-1)/2)·res, (d - (D-1)/2)·res)``: the grid
    is centred on the origin and axis ``D`` is ``z``, ``H`` is ``y``, ``W`` is ``x``. This is
    the single definition of the convention; everything else derives from it.
    """
    d, h, w = _shape3(shape)
    # (2i - (n-1)) is an exact integer; scaling by res/2 keeps the grid exactly symmetric.
    axes = [(2 * torch.arange(n, dtype=torch.float64) - (n - 1)) * (resolution / 2) for n in (d, h, w)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1).to(dtype=dtype, device=device)


def spherical_mask(shape: int | tuple[int, int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``(D, H, W)``: voxels whose centre lies in the sphere inscribed in the box of centres.

    Radius ``(min(D, H, W) − 1)/2`` voxels about the volume centre: a rotation about the
    centre maps every masked centre to a point where trilinear interpolation reads only
    real voxels, never the zero padding. The mask is invariant under all cube rotations.
    """
    doubled = voxel_centres(shape, 2.0)  # exact integers 2i - (n-1)
    radius2 = (min(_shape3(shape)) - 1) ** 2
    return ((doubled**2).sum(-1) <= radius2).to(device)


# --------------------------------------------------------------------------- exact path

@functools.lru_cache(maxsize=1)
def _signed_permutations() -> torch.Tensor:
    """All 48 signed permutation matrices, ``(48, 3, 3)`` float64: the 24 cube rotations, then their negatives."""
    cube = cube_rotations()
    return torch.cat([cube, -cube])


def _element_codes(matrices: torch.Tensor) -> torch.Tensor:
    """An integer code for each matrix with entries in {-1, 0, 1}: ``(..., 3, 3)`` → ``(...)``."""
    digits = matrices.round().to(torch.int64) + 1
    powers = 3 ** torch.arange(9, device=matrices.device)
    return (digits.flatten(-2) * powers).sum(-1)


def _element_ids(rotations: torch.Tensor) -> torch.Tensor:
    """Index into :func:`_signed_permutations` of each matrix ``(..., 3, 3)`` → int64 ``(...)``."""
    group_codes = _element_codes(_signed_permutations().to(rotations.device))
    matches = _element_codes(rotations).unsqueeze(-1) == group_codes
    if not (is_signed_permutation(rotations) and bool(matches.any(-1).all())):
        raise ValueError("exact voxel rotation needs signed permutation matrices (cube symmetries)")
    return matches.to(torch.int64).argmax(-1)


@functools.lru_cache(maxsize=256)
def _index_map(size: int, element: int, device: torch.device) -> torch.Tensor:
    """Flat source index ``(size³,)`` of ``M·grid`` for group element ``M`` on a cubic grid.

    Output voxel at centre ``u`` reads the input voxel at ``M⁻¹ u = Mᵀ u`` (row form ``u @ M``).
    """
    matrix = _signed_permutations()[element]
    u = voxel_centres(size, 2.0).reshape(-1, 3)  # (x, y, z) as exact integers 2i - (n-1)
    source = u @ matrix  # exact: entries are 0 and ±1
    ix, iy, iz = ((source + (size - 1)) / 2).round().to(torch.int64).unbind(-1)
    return ((iz * size + iy) * size + ix).to(device)


def cube_rotation_index(rotations: torch.Tensor, shape) -> torch.Tensor:
    """Gather indices for exact cube rotations: rotations ``(..., 3, 3)`` → int64 ``(..., L³)``.

    ``(R·grid).flatten(-3)[..., j] == grid.flatten(-3)[..., idx[..., j]]`` for a cubic
    ``shape`` ``(L, L, L)``. Index maps are built once per (size, element, device) and cached.
    """
    d, h, w = _shape3(shape)
    if not d == h == w:
        raise ValueError(f"cube rotations need a cubic grid; got (D, H, W) = {(d, h, w)}")
    ids = _element_ids(rotations)
    distinct, inverse = torch.unique(ids, return_inverse=True)
    device = rotations.device
    maps = torch.stack([_index_map(d, int(e), device) for e in distinct.tolist()])
    return maps[inverse]


def _gather(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Exact path: ``x`` ``(N, C, L, L, L)``, rotations ``(N, M, 3, 3)`` → ``(N, M, C, L, L, L)``."""
    n, c = x.shape[:2]
    m = rotations.shape[1]
    index = cube_rotation_index(rotations.to(x.device), x.shape[-3:])  # (N, M, L³)
    size = index.shape[-1]
    source = x.reshape(n, 1, c, size).expand(n, m, c, size)
    out = torch.gather(source, 3, index.unsqueeze(2).expand(n, m, c, size))
    return out.view(n, m, c, *x.shape[-3:])


# ----------------------------------------------------------------------- trilinear path

def _normalised_scale(shape: tuple[int, int, int], align_corners: bool) -> torch.Tensor:
    """``s`` ``(3,)`` in ``(x, y, z)`` order: ``grid_sample``'s coordinate ``p`` is the voxel centre ``p·s`` in half-voxels."""
    d, h, w = shape
    sizes = torch.tensor([w, h, d], dtype=torch.float64)
    return (sizes - 1).clamp_min(1) if align_corners else sizes


def _resample(x: torch.Tensor, rotations: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Trilinear path: ``x`` ``(N, C, D, H, W)``, rotations ``(N, M, 3, 3)`` → ``(N, M, C, D, H, W)``."""
    n, c, d, h, w = x.shape
    m = rotations.shape[1]
    # Output point p samples the input at R⁻¹ p = Rᵀ p in physical coordinates; in
    # normalised ones that is S⁻¹ Rᵀ S p with S = diag(s) (isotropic voxels).
    s = _normalised_scale((d, h, w), align_corners).to(rotations.device)
    linear = rotations.to(torch.float64).transpose(-1, -2) * s / s[:, None]
    theta = torch.cat([linear, linear.new_zeros(n, m, 3, 1)], dim=-1)
    from equiaudit.actions import voxel_kernel

    if voxel_kernel.usable(x):  # opt-in fused kernel (EQUIAUDIT_VOXEL_KERNEL=triton); this path is its reference
        return voxel_kernel.rotate_trilinear(x, theta, align_corners)
    theta = theta.reshape(n * m, 3, 4).to(device=x.device, dtype=x.dtype)
    points = F.affine_grid(theta, [n * m, 1, d, h, w], align_corners=align_corners)
    # Stack the M sampling grids along depth so the input is read in place, not copied M times.
    points = points.view(n, m * d, h, w, 3)
    out = F.grid_sample(x, points, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    return out.view(n, c, m, d, h, w).transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------- public

def _apply(x: torch.Tensor, rotations: torch.Tensor, method: str, align_corners: bool) -> torch.Tensor:
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(_METHODS)}")
    exact = method == "exact" or (method == "auto" and is_signed_permutation(rotations))
    if exact:
        return _gather(x, rotations)
    return _resample(x, rotations, align_corners)


def _check(grid: torch.Tensor, rotations: torch.Tensor, grid_dims: int) -> None:
    if grid.dim() != grid_dims:
        raise ValueError(f"expected a grid with {grid_dims} dims; got shape {tuple(grid.shape)}")
    if rotations.dim() != 4 or rotations.shape[-2:] != (3, 3) or rotations.shape[0] != grid.shape[0]:
        raise ValueError(
            f"expected rotations (B, K, 3, 3) with B = {grid.shape[0]}; got {tuple(rotations.shape)}"
        )


def rotate_grid(
    grid: torch.Tensor,
    rotations: torch.Tensor,
    *,
    align_corners: bool = ALIGN_CORNERS,
    method: str = "auto",
) -> torch.Tensor:
    """Orbit of voxel grids: ``grid`` ``(B, C, D, H, W)``, rotations ``(B, K, 3, 3)`` → ``(B, K, C, D, H, W)``.

    ``out[b, k] = R[b, k] · grid[b]``, i.e. ``out[b, k](r) = grid[b](R⁻¹ r)``, with ``R``
    acting on ``(x, y, z) = (W, H, D)`` coordinates as ``R v`` (the point-cloud convention).
    ``method``: ``"auto"`` (exact gather when every matrix is a signed permutation, else
    trilinear), ``"exact"`` or ``"trilinear"``. The exact path needs ``D == H == W``,
    ignores ``align_corners`` and is differentiable in ``grid`` only: to differentiate
    with respect to ``R`` (e.g. at the identity), use ``"trilinear"``. The result has the
    grid's dtype and device.
    """
    _check(grid, rotations, 5)
    return _apply(grid, rotations, method, align_corners)


def unrotate_grid(
    orbit: torch.Tensor,
    rotations: torch.Tensor,
    *,
    align_corners: bool = ALIGN_CORNERS,
    method: str = "auto",
) -> torch.Tensor:
    """Map an orbit back: ``orbit`` ``(B, K, C, D, H, W)`` → ``out[b, k] = R[b, k]⁻¹ · orbit[b, k]`` (same shape).

    ``R⁻¹ = Rᵀ``; same conventions and ``method`` as :func:`rotate_grid`.
    """
    _check(orbit, rotations, 6)
    b, k = orbit.shape[:2]
    if rotations.shape[1] != k:
        raise ValueError(f"orbit has K = {k} but rotations have K = {rotations.shape[1]}")
    inverse = rotations.transpose(-1, -2).reshape(b * k, 1, 3, 3)
    out = _apply(orbit.reshape(b * k, *orbit.shape[2:]), inverse, method, align_corners)
    return out.view(orbit.shape)

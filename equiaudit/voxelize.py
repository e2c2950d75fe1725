"""Atoms → per-element density grids (VoxMol-style). Pure math, batched, any device.

Density (VoxMol, which uses PyUUL's Gaussian occupancy): each atom ``a`` of radius
``r`` (``spec.atom_radius``, 0.5 Å for every element as in VoxMol) contributes
``ρ_a(p) = exp(−|p − a|² / (0.93·r)²)``, i.e. a Gaussian with ``σ = 0.93·r/√2`` (0.33 Å
at the defaults), and the atoms of one element combine as a union of occupancies,
``1 − Π_a (1 − ρ_a)``, so every channel stays in ``[0, 1]`` and equals 1 at an atom
centre. The whole grid is a function of distances only, hence exactly as equivariant as
the continuous field it samples.

The grid is centred on the molecule's masked centroid and follows the axis convention
of :mod:`equiaudit.actions.voxels` (axes ``(D, H, W)`` are ``(z, y, x)``, the same
:func:`~equiaudit.actions.voxels.voxel_centres`), so that for cube rotations
``voxelize(R·atoms) == rotate_grid(voxelize(atoms), R)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from equiaudit.actions.points import masked_centroid
from equiaudit.actions.voxels import voxel_centres

__all__ = ["VoxelGridSpec", "voxelize", "VOXMOL_SIGMA_FACTOR"]

# PyUUL's Gaussian occupancy exp(-d² / (0.93·r)²), used by VoxMol.
VOXMOL_SIGMA_FACTOR = 0.93

# The log of an empty-voxel probability at an atom centre is -inf; clamp it (exp(-50) is
# below float64 resolution next to 1, so the union is still exactly 1 there) to keep the
# per-element sum free of 0·inf.
_LOG_FLOOR = -50.0

# Target elements of the (B, atoms, voxels) work tensor per chunk of atoms.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class VoxelGridSpec:
    """How molecules become grids.

    Attributes:
        grid_size: L, voxels per side (VoxMol: 32 on QM9, 64 on GEOM-drugs).
        resolution: voxel side in Å (VoxMol: 0.25).
        atom_radius: radius ``r`` of every atom in Å (VoxMol: 0.5).
        elements: atomic numbers, one channel each, in channel order. Default: the first
            eight entries of VoxMol's element table, in its order: C, H, O, N, F, S, Cl, Br
            (VoxMol's QM9 grids use the first five).
    """

    grid_size: int = 32
    resolution: float = 0.25
    atom_radius: float = 0.5
    elements: tuple[int, ...] = (6, 1, 8, 7, 9, 16, 17, 35)

    @property
    def n_channels(self) -> int:
        return len(self.elements)


def voxelize(
    pos: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor | None = None,
    spec: VoxelGridSpec = VoxelGridSpec(),
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-element density grids: ``pos`` ``(B, A, 3)`` Å, ``z`` ``(B, A)`` int, ``mask`` ``(B, A)`` bool → ``(B, C, L, L, L)``.

    Channel ``c`` holds the atoms with ``z == spec.elements[c]``; the grid centre is the
    centroid of the valid atoms. Padded atoms (``mask`` False) are ignored whatever their
    ``z``; a valid atom of an element not in ``spec.elements`` raises ``ValueError``
    (dropping it silently would audit a different molecule). Atoms beyond the box just
    lose their tails. Computed in ``dtype`` (default: ``pos``'s) on ``pos``'s device.
    """
    if pos.dim() != 3 or pos.shape[-1] != 3 or z.shape != pos.shape[:2]:
        raise ValueError(f"expected pos (B, A, 3) and z (B, A); got {tuple(pos.shape)} and {tuple(z.shape)}")
    dtype = dtype or (pos.dtype if pos.is_floating_point() else torch.get_default_dtype())
    device = pos.device
    if mask is None:
        mask = torch.ones(z.shape, dtype=torch.bool, device=device)
    mask = mask.to(device=device, dtype=torch.bool)

    z = z.to(device=device, dtype=torch.int64)
    elements = torch.tensor(spec.elements, dtype=torch.int64, device=device)
    onehot = (z.unsqueeze(-1) == elements) & mask.unsqueeze(-1)  # (B, A, C)
    unknown = mask & ~onehot.any(-1)
    if bool(unknown.any()):
        missing = sorted(set(z[unknown].tolist()))
        raise ValueError(f"atomic numbers {missing} are not in the voxel grid's elements {list(spec.elements)}")

    # Zero the padded rows so that a NaN/inf padding value cannot leak through 0·x.
    pos = torch.where(mask.unsqueeze(-1), pos.to(dtype), 0)
    rel = pos - masked_centroid(pos, mask)  # (B, A, 3)
    # Per-axis coordinates of the voxel centres; the grid is separable, so the squared
    # distance is a broadcast sum of three small per-axis terms (no (B, A, L³, 3) tensor).
    centres = voxel_centres(spec.grid_size, spec.resolution, dtype=dtype, device=device)
    size = spec.grid_size
    cx, cy, cz = centres[0, 0, :, 0], centres[0, :, 0, 1], centres[:, 0, 0, 2]  # (L,) each
    scale = (VOXMOL_SIGMA_FACTOR * spec.atom_radius) ** 2
    weights = onehot.to(dtype)

    batch, atoms = z.shape
    log_empty = torch.zeros(batch, spec.n_channels, size**3, dtype=dtype, device=device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * size**3))
    # Chunks of atoms keep the (B, a, L³) work tensor near _CHUNK_ELEMENTS (all molecules
    # always go together: a chunk holds at least one atom of each).
    for start in range(0, atoms, chunk):
        part = rel[:, start : start + chunk]
        dx2 = (cx - part[..., 0:1]) ** 2  # (B, a, L)
        dy2 = (cy - part[..., 1:2]) ** 2
        dz2 = (cz - part[..., 2:3]) ** 2
        # (B, a, D, H, W), grid axes (z, y, x); the sum order is fixed, (dz² + dy²) + dx².
        dist2 = dz2[..., :, None, None] + dy2[..., None, :, None] + dx2[..., None, None, :]
        # In place: this (B, a, L³) tensor is the whole cost. log(1 - ρ) of each atom.
        log_free = dist2.mul_(-1.0 / scale).exp_().neg_().log1p_().clamp_min_(_LOG_FLOOR).flatten(2)
        log_empty += torch.einsum("bac,ban->bcn", weights[:, start : start + chunk], log_free)
    # 0 - expm1 rather than -expm1: empty voxels are +0.0, not -0.0.
    return (0.0 - torch.expm1(log_empty)).view(batch, spec.n_channels, size, size, size)

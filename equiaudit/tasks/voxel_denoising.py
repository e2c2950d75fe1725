"""``voxel_denoising`` (VoxMol-style): a model maps a noisy density grid to the clean one.

Data are atoms (``pos``, ``z``, ``mask``), voxelized once per audit, or ready grids under
the field ``grid`` ``(N, C, D, H, W)``. Per sample the noise ``ε ~ N(0, I)`` is drawn once,
seeded (identical for every checkpoint): input ``noisy = clean + σ·ε``, target ``clean``,
MSE over voxels. A rotation acts on the noisy grid as a whole, so input and target are
one orbit element.

* ``octahedral`` (default): the 24 cube rotations permute voxels exactly.
* ``so3``: grids are resampled trilinearly. When the data are atoms the clean part of the
  input is exact (rotate the atoms, then voxelize) and only the noise is resampled; the
  prediction is mapped back by trilinear resampling, whose error is reported separately
  as ``interp_floor``. Only voxels inside the inscribed sphere count (``spherical_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from equiaudit.actions.voxels import rotate_grid
from equiaudit.errors import DataError
from equiaudit.random import SampleRandom
from equiaudit.representations import rotate
from equiaudit.rotations import is_signed_permutation
from equiaudit.tasks.base import TaskPreset, register_task
from equiaudit.voxelize import VoxelGridSpec, voxelize

__all__ = ["grid_spec", "resolve_voxel_options", "prepare_voxels", "atoms_orbit_inputs", "VOXEL_DENOISING"]

# VoxMol's channel order; elements outside it follow in ascending order.
VOXMOL_ORDER = VoxelGridSpec().elements
# Molecules voxelized per call when preparing the dataset (bounds memory, not a hot loop).
_VOXELIZE_CHUNK = 64


def grid_spec(options: Mapping[str, Any], z: torch.Tensor | None, mask: torch.Tensor | None) -> VoxelGridSpec:
    """The grid from the config's ``voxel:`` options; ``elements`` default to those in the data."""
    elements = options.get("elements")
    if elements is None:
        present = set(z[mask].tolist()) if z is not None else set()
        elements = [e for e in VOXMOL_ORDER if e in present] + sorted(present - set(VOXMOL_ORDER))
    return VoxelGridSpec(
        grid_size=int(options.get("grid_size") or 32),
        resolution=float(options["resolution"]),
        atom_radius=float(options["atom_radius"]),
        elements=tuple(int(e) for e in elements),
    )


def resolve_voxel_options(options: Mapping[str, Any], dataset: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fix the channels once per audit: ``voxel.elements`` defaults to the elements in the data."""
    options = dict(options)
    if options.get("elements") is None and "grid" not in dataset and "z" in dataset:
        options["elements"] = list(grid_spec(options, dataset["z"], dataset.get("mask")).elements)
    return options


def prepare_voxels(dataset: dict[str, torch.Tensor], options: Mapping[str, Any], random: SampleRandom, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add ``clean``, ``noise`` and ``noisy`` grids ``(N, C, L, L, L)``; the noise of a sample
    is a function of the seed and its id."""
    if "grid" in dataset:
        clean = dataset["grid"]
        if clean.dim() != 5:
            raise DataError(f"voxel grids must be (N, C, D, H, W); the data's 'grid' is {tuple(clean.shape)}")
        size = options.get("grid_size")
        if size is not None and tuple(clean.shape[2:]) != (size,) * 3:
            raise DataError(f"the data's grids are {tuple(clean.shape[1:])} (C, D, H, W) but voxel.grid_size is {size}")
        if options.get("elements") is not None and clean.shape[1] != len(options["elements"]):
            raise DataError(f"the data's grids have {clean.shape[1]} channels but voxel.elements lists {len(options['elements'])}")
    elif "pos" in dataset and "z" in dataset:
        mask = dataset.get("mask")
        spec = grid_spec(options, dataset["z"], mask)
        try:
            clean = torch.cat([
                voxelize(dataset["pos"][i : i + _VOXELIZE_CHUNK], dataset["z"][i : i + _VOXELIZE_CHUNK],
                         None if mask is None else mask[i : i + _VOXELIZE_CHUNK], spec)
                for i in range(0, len(dataset["pos"]), _VOXELIZE_CHUNK)
            ])
        except ValueError as exc:
            raise DataError(f"voxelizing the data: {exc}") from exc
    else:
        raise DataError("voxel_denoising needs atoms (pos, z) or ready grids under 'grid' (map them in data.keys)")
    noise = random.child("voxel noise").normal(ids, clean.shape[1:]).to(clean)
    return {**dataset, "clean": clean, "noise": noise, "noisy": clean + float(options["noise"]) * noise}


def atoms_orbit_inputs(options: Mapping[str, Any], dataset: Mapping[str, torch.Tensor]):
    """Orbit builder for continuous rotations of atom data: voxelize ``R·atoms``, resample only ``ε``.

    ``dataset`` is the prepared dataset (its elements fix the channels, as in
    :func:`prepare_voxels`). Returns ``(batch, rotations) -> {"noisy": (B, K, C, L, L, L)}``,
    or ``None`` for ready grids; for cube rotations it returns ``{}`` so that the exact
    permutation of the noisy grid is used.
    """
    if "grid" in dataset or "pos" not in dataset:
        return None
    sigma = float(options["noise"])
    spec = grid_spec(options, dataset["z"], dataset.get("mask"))

    def build(batch: Mapping[str, torch.Tensor], rotations: torch.Tensor) -> dict[str, torch.Tensor]:
        if is_signed_permutation(rotations):
            return {}
        b, k = rotations.shape[:2]
        mask = batch.get("mask")
        atoms = rotate("point", batch["pos"], rotations, mask=mask).reshape(b * k, -1, 3)
        z = batch["z"].repeat_interleave(k, 0)
        clean = voxelize(atoms, z, None if mask is None else mask.repeat_interleave(k, 0), spec)
        clean = clean.reshape(b, k, *clean.shape[1:]).to(batch["noise"].dtype)
        return {"noisy": clean + sigma * rotate_grid(batch["noise"], rotations)}

    return build


VOXEL_DENOISING = register_task(
    TaskPreset(
        name="voxel_denoising",
        fields={"noisy": "voxel"},
        heads={"denoised": {"rep": "voxel", "target": "clean", "loss": "mse", "weight": 1.0}},
        inputs=("noisy",),
        group="octahedral",
        section="voxel",
        resolve_options=resolve_voxel_options,
        prepare=prepare_voxels,
        orbit_inputs=atoms_orbit_inputs,
        denoises={"denoised": "noisy"},
        options={
            "grid_size": None,
            "resolution": 0.25,
            "atom_radius": 0.5,
            "elements": None,
            "noise": 0.9,
            "spherical_mask": "auto",
        },
    )
)

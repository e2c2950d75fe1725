"""Voxel-grid rotations and the voxelizer: conventions, exactness, batching."""

from __future__ import annotations

import math

import pytest
import torch

from equiaudit.actions import rotate, unrotate
from equiaudit.actions import voxels as V
from equiaudit.rotations import axis_angle_to_matrix, cube_rotations, haar_rotations
from equiaudit.voxelize import VoxelGridSpec, voxelize

CUBE = cube_rotations()  # (24, 3, 3), identity first
RZ90 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # x -> y


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grid(b=2, c=3, size=8, seed=0, dtype=torch.float32):
    return torch.randn(b, c, size, size, size, generator=_gen(seed), dtype=dtype)


def _all_cube(b: int) -> torch.Tensor:
    return CUBE.expand(b, 24, 3, 3)


def _voxelize_orbit(pos, z, mask, rotations, spec, dtype=None):
    """Reference: rotate the centred atoms (point action), then voxelize: (B, K, C, L, L, L)."""
    b, k = rotations.shape[:2]
    moved = rotate("point", pos, rotations, mask)  # (B, K, A, 3)
    grids = voxelize(moved.flatten(0, 1), z.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), spec, dtype=dtype)
    return grids.view(b, k, *grids.shape[1:])


# ------------------------------------------------------------------------ exact path

@pytest.mark.parametrize("size", [7, 8])
def test_cube_round_trip_is_bit_exact(size):
    grid = _grid(size=size)
    orbit = V.rotate_grid(grid, _all_cube(2))
    assert orbit.shape == (2, 24, 3, size, size, size)
    assert torch.equal(orbit[:, 0], grid)  # identity
    assert torch.equal(V.unrotate_grid(orbit, _all_cube(2)), grid.unsqueeze(1).expand_as(orbit))
    # Every element is a permutation of the voxels: same multiset of values.
    assert torch.equal(orbit.flatten(2).sort(-1).values, grid.flatten(1).sort(-1).values.unsqueeze(1).expand(2, 24, -1))


def test_cube_composition_law():
    grid = _grid(b=1, c=2, size=6)
    r1 = CUBE.repeat_interleave(24, 0)  # all 576 pairs (R1, R2)
    r2 = CUBE.repeat(24, 1, 1)
    once = V.rotate_grid(grid, r1.unsqueeze(0))  # (1, 576, ...)
    twice = V.rotate_grid(once.view(576, 2, 6, 6, 6), r2.unsqueeze(1))[:, 0]
    direct = V.rotate_grid(grid, (r2 @ r1).unsqueeze(0))[0]
    assert torch.equal(twice, direct)


@pytest.mark.parametrize("size", [7, 8])
def test_exact_and_trilinear_agree_on_cube_rotations(size):
    grid = _grid(size=size)
    exact = V.rotate_grid(grid, _all_cube(2), method="exact")
    smooth = V.rotate_grid(grid, _all_cube(2), method="trilinear")
    assert (exact - smooth).abs().max() < 1e-5
    back = V.unrotate_grid(exact, _all_cube(2), method="trilinear")
    assert (back - grid.unsqueeze(1)).abs().max() < 1e-5


def test_auto_picks_exact_path_for_numerically_perturbed_cube_rotations():
    grid = _grid(b=1, size=5, dtype=torch.float64)
    r = axis_angle_to_matrix(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor(math.pi / 2, dtype=torch.float64))
    assert not torch.equal(r, RZ90)  # matrix_exp leaves ~1e-16 entries
    assert torch.equal(V.rotate_grid(grid, r.view(1, 1, 3, 3)), V.rotate_grid(grid, RZ90.view(1, 1, 3, 3), method="exact"))


def test_improper_signed_permutations_are_exact_too():
    grid = _grid(b=1, size=4)
    inversion = -torch.eye(3, dtype=torch.float64).view(1, 1, 3, 3)
    assert torch.equal(V.rotate_grid(grid, inversion)[:, 0], grid.flip(-1, -2, -3))


def test_cube_rotations_need_cubic_grid():
    grid = torch.zeros(1, 1, 4, 4, 6)
    with pytest.raises(ValueError, match=r"cube rotations need a cubic grid; got \(D, H, W\) = \(4, 4, 6\)"):
        V.rotate_grid(grid, _all_cube(1))
    # A non-cubic grid still rotates on the trilinear path.
    r = haar_rotations(2, _gen()).view(1, 2, 3, 3)
    assert V.rotate_grid(grid, r).shape == (1, 2, 1, 4, 4, 6)


def test_exact_method_rejects_non_cube_rotations():
    with pytest.raises(ValueError, match="signed permutation"):
        V.rotate_grid(_grid(b=1), haar_rotations(1, _gen()).view(1, 1, 3, 3), method="exact")


# ------------------------------------------------------------------------ convention

@pytest.mark.parametrize("method", ["exact", "trilinear"])
def test_blob_at_plus_x_goes_to_plus_y_under_90_degrees_about_z(method):
    size, mid = 9, 4
    grid = torch.zeros(1, 1, size, size, size)
    grid[0, 0, mid, mid, mid + 3] = 1.0  # (d, h, w) = (z, y, x): the blob sits at +x
    out = V.rotate_grid(grid, RZ90.view(1, 1, 3, 3), method=method)[0, 0, 0]
    assert torch.equal(torch.tensor(torch.unravel_index(out.argmax(), out.shape)), torch.tensor([mid, mid + 3, mid]))
    # ... and about x, +y goes to +z.
    rx90 = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=torch.float64)
    grid = torch.zeros(1, 1, size, size, size)
    grid[0, 0, mid, mid + 2, mid] = 1.0
    out = V.rotate_grid(grid, rx90.view(1, 1, 3, 3), method=method)[0, 0, 0]
    assert torch.equal(torch.tensor(torch.unravel_index(out.argmax(), out.shape)), torch.tensor([mid + 2, mid, mid]))


def test_non_cubic_grid_rotates_about_its_centre_with_either_align_corners():
    grid = torch.zeros(1, 1, 5, 7, 9)
    grid[0, 0, 2, 3, 4 + 3] = 1.0  # centre voxel (2, 3, 4), blob at x = +3 voxels
    for align in (False, True):
        out = V.rotate_grid(grid, RZ90.view(1, 1, 3, 3), align_corners=align, method="trilinear")[0, 0, 0]
        assert torch.allclose(out[2, 3 + 3, 4], torch.tensor(1.0), atol=1e-5)  # now at y = +3
    smooth = torch.nn.functional.avg_pool3d(torch.randn(2, 2, 6, 8, 10, generator=_gen(7)), 3, 1, 1)
    r = haar_rotations(2 * 3, _gen(8)).view(2, 3, 3, 3)
    a = V.rotate_grid(smooth, r, align_corners=False)
    b = V.rotate_grid(smooth, r, align_corners=True)
    assert (a - b).abs().max() < 1e-5  # the constant changes the reading of theta, not the rotation


def test_voxel_centres_convention():
    c = V.voxel_centres((2, 3, 4), 0.5)
    assert c.shape == (2, 3, 4, 3)
    assert torch.equal(c[0, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=torch.float64))  # x along W
    assert torch.equal(c[0, :, 0, 1], torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64))  # y along H
    assert torch.equal(c[:, 0, 0, 2], torch.tensor([-0.25, 0.25], dtype=torch.float64))  # z along D


def test_single_atom_lands_where_expected():
    spec = VoxelGridSpec(grid_size=8, resolution=0.5, elements=(6, 1))
    pos = torch.tensor([[[1.25, 0.25, -0.25], [-1.25, -0.25, 0.25]]], dtype=torch.float64)  # centroid at 0
    grid = voxelize(pos, torch.tensor([[6, 1]]), None, spec)
    assert grid.shape == (1, 2, 8, 8, 8)
    # x = 1.25 -> w = 1.25/0.5 + 3.5 = 6; y = 0.25 -> h = 4; z = -0.25 -> d = 3.
    assert torch.equal(torch.tensor(torch.unravel_index(grid[0, 0].argmax(), grid.shape[2:])), torch.tensor([3, 4, 6]))
    assert grid[0, 0, 3, 4, 6] == 1.0  # union density is exactly 1 at an atom centre
    assert torch.equal(torch.tensor(torch.unravel_index(grid[0, 1].argmax(), grid.shape[2:])), torch.tensor([4, 3, 1]))


# ------------------------------------------------------------------- points vs grid

def _dyadic_molecules(b=3, a=10, seed=0):
    """Atoms at multiples of 1/16 Å with 8 valid atoms each (padding after): exact arithmetic.

    Differences of such coordinates and their centroid (a sum divided by 8) are short
    binary fractions, so every squared distance is exact whatever the order of its three
    terms; signed permutations map voxel centres onto voxel centres exactly. Rotating the
    atoms and rotating the grid then compute each voxel from identical floats.
    """
    g = _gen(seed)
    pos = torch.randint(-24, 25, (b, a, 3), generator=g).to(torch.float64) / 16 + 0.375
    z = torch.tensor([6, 1, 8, 7, 9, 16, 17, 35, 1, 1])[:a].expand(b, a)
    mask = torch.arange(a) < 8
    return pos, z, mask.expand(b, a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_voxelize_commutes_with_cube_rotations_exactly(dtype):
    spec = VoxelGridSpec(grid_size=24)
    pos, z, mask = _dyadic_molecules()
    r = _all_cube(3)
    expected = _voxelize_orbit(pos, z, mask, r, spec, dtype)
    grid = voxelize(pos, z, mask, spec, dtype=dtype)
    assert grid.dtype == dtype and grid.amax() > 0.5
    assert torch.equal(V.rotate_grid(grid, r), expected)


def test_voxelize_commutes_with_cube_rotations_for_generic_positions():
    spec = VoxelGridSpec(grid_size=24)
    _, z, mask = _dyadic_molecules()
    pos = torch.randn(3, 10, 3, generator=_gen(1), dtype=torch.float64) * 1.2
    r = _all_cube(3)
    assert (V.rotate_grid(voxelize(pos, z, mask, spec), r) - _voxelize_orbit(pos, z, mask, r, spec)).abs().max() < 1e-12


def test_voxelize_commutes_with_random_rotations_up_to_interpolation():
    spec = VoxelGridSpec(grid_size=32)
    _, z, mask = _dyadic_molecules(b=2)
    pos = torch.randn(2, 10, 3, generator=_gen(2), dtype=torch.float64) * 1.2  # well inside the 8 Å box
    r = haar_rotations(2 * 6, _gen(3)).view(2, 6, 3, 3)
    grid = voxelize(pos, z, mask, spec)
    expected = _voxelize_orbit(pos, z, mask, r, spec)

    def rel_err(rotations):
        got = V.rotate_grid(grid, rotations)
        return float((got - expected).norm() / expected.norm()), float((got - expected).abs().max())

    rel, worst = rel_err(r)
    rel_wrong, worst_wrong = rel_err(r.transpose(-1, -2))  # the other convention: Rᵀ instead of R
    # Trilinear interpolation of 1.3-voxel-wide Gaussians: about 9 % relative L2, 0.18 max.
    assert rel < 0.15 and worst < 0.3
    assert rel_wrong > 0.8 and worst_wrong > 0.8
    assert rel < rel_wrong / 6


def test_voxelize_options_and_errors():
    spec = VoxelGridSpec(grid_size=8, elements=(6, 1))
    pos = torch.zeros(1, 3, 3)
    pos[0, 1, 0] = 0.5
    pos[0, 2] = float("nan")  # padded atom: must not leak
    grid = voxelize(pos, torch.tensor([[6, 1, 99]]), torch.tensor([[True, True, False]]), spec)
    assert grid.dtype == torch.float32 and torch.isfinite(grid).all()
    assert grid[0, 0].amax() > 0.5 and grid[0, 1].amax() > 0.5  # atoms at x = ±0.25, between centres
    with pytest.raises(ValueError, match=r"\[99\]"):
        voxelize(pos.nan_to_num(), torch.tensor([[6, 1, 99]]), None, spec)


def test_voxelize_chunking_over_atoms_matches_one_pass(monkeypatch):
    import equiaudit.voxelize as vz

    spec = VoxelGridSpec(grid_size=12)
    pos, z, mask = _dyadic_molecules(b=2)
    one_pass = voxelize(pos, z, mask, spec)
    monkeypatch.setattr(vz, "_CHUNK_ELEMENTS", 1)  # one atom per chunk
    assert torch.allclose(voxelize(pos, z, mask, spec), one_pass, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- batching, masks

@pytest.mark.parametrize("method", ["exact", "trilinear"])
def test_batched_shapes_and_no_mixing_between_samples(method):
    b, k = 3, 5
    grid = _grid(b=b, c=2, size=6, seed=4)
    if method == "exact":
        r = CUBE[torch.randint(0, 24, (b, k), generator=_gen(5))]
    else:
        r = haar_rotations(b * k, _gen(5)).view(b, k, 3, 3)
    orbit = V.rotate_grid(grid, r)
    assert orbit.shape == (b, k, 2, 6, 6, 6) and orbit.dtype == grid.dtype
    for i in range(b):
        alone = V.rotate_grid(grid[i : i + 1], r[i : i + 1])[0]
        assert torch.allclose(orbit[i], alone, atol=1e-6)
    # Changing sample 0 changes nothing else.
    other = grid.clone()
    other[0] = 0.0
    assert torch.equal(V.rotate_grid(other, r)[1:], orbit[1:])
    back = V.unrotate_grid(orbit, r)
    assert back.shape == orbit.shape


def test_dispatch_through_actions_entry_points():
    grid = _grid(b=2, size=6)
    orbit = rotate("voxel", grid, _all_cube(2))
    assert torch.equal(unrotate("voxel", orbit, _all_cube(2)), grid.unsqueeze(1).expand_as(orbit))


def test_float64_grids_and_trilinear_round_trip_inside_mask():
    grid = torch.nn.functional.avg_pool3d(_grid(b=1, c=1, size=20, dtype=torch.float64), 5, 1, 2)  # smooth field
    r = haar_rotations(3, _gen(6)).view(1, 3, 3, 3)
    back = V.unrotate_grid(V.rotate_grid(grid, r), r)
    assert back.dtype == torch.float64
    inside = V.spherical_mask(20)
    err = (back - grid.unsqueeze(1))[..., inside].abs().max()
    assert err < 0.5 * grid[..., inside].abs().max()


def test_spherical_mask():
    for size in (7, 8):
        mask = V.spherical_mask(size)
        assert mask.shape == (size,) * 3 and mask.dtype == torch.bool
        assert not mask[0, 0, 0] and mask[size // 2, size // 2, size // 2]
        orbit = V.rotate_grid(mask.float().view(1, 1, size, size, size), _all_cube(1))
        assert torch.equal(orbit, mask.float().expand_as(orbit))  # invariant under the cube group
        assert torch.equal(mask, mask.flip(0)) and torch.equal(mask, mask.flip(1, 2))
    assert V.spherical_mask(7)[3, 3, 0]  # radius (L-1)/2: touches the centres of the face voxels
    assert V.spherical_mask((4, 6, 8)).shape == (4, 6, 8)

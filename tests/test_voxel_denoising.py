"""The voxel-denoising preset end to end: exact cube group, continuous SO(3) with its floor, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equiaudit.errors import ConfigError, DataError
from equiaudit.io.checkpoints import CheckpointRef
from equiaudit.io.config import parse_config
from equiaudit.runner import audit_checkpoint, open_audit


def _atoms(path, n=6, atoms=5, seed=0):
    rng = np.random.default_rng(seed)
    z = np.array([6, 6, 8, 6, 8])[:atoms]
    np.savez(path, pos=rng.normal(scale=0.8, size=(n, atoms, 3)), z=np.broadcast_to(z, (n, atoms)).copy())


def _audit(tmp_path, factory, *, group="octahedral", rotations=None, voxel=None, data=None, kwargs=None, float64=True):
    data = data or tmp_path / "atoms.npz"
    if not data.exists():
        _atoms(data)
    config = parse_config({
        "task": "voxel_denoising",
        "model": {"factory": f"helpers:{factory}", "kwargs": kwargs or {}, "dtype": "float64" if float64 else "float32"},
        "data": {"path": str(data)},
        "group": {"name": group, **({"rotations": rotations} if rotations else {})},
        "voxel": {"grid_size": 12, "resolution": 0.4, **(voxel or {})},
        "bootstrap": 100,
    })
    plan = open_audit(config, device="cpu")
    checkpoint = tmp_path / f"{factory}.pt"
    from helpers import conv3d, identity

    model = {"identity": identity, "conv3d": conv3d}[factory](**(kwargs or {}))
    torch.save(model.state_dict(), checkpoint)
    return plan, audit_checkpoint(plan, CheckpointRef(checkpoint, checkpoint.name, "run", 0))


def test_identity_is_exact_under_cube_group(tmp_path):
    plan, result = _audit(tmp_path, "identity")
    assert result.ok, result.message
    assert plan.plan.group.exact and plan.plan.group.n_elements == 24
    assert plan.prepared.data["noisy"].shape == (6, 2, 12, 12, 12)  # C and O channels present
    assert result.total.loss_aug > 0.5  # the noise, σ = 0.9
    assert abs(result.total.rel_equiv_error) <= 1e-6
    assert result.total.interp_floor is None


def test_random_conv_is_caught_and_its_cube_average_is_not(tmp_path):
    _, raw = _audit(tmp_path, "conv3d")
    _, symmetric = _audit(tmp_path, "conv3d", kwargs={"symmetrize": True})
    assert raw.total.rel_equiv_error > 1e-3
    assert abs(symmetric.total.rel_equiv_error) < 1e-5


def test_identity_under_so3_is_all_interpolation_floor(tmp_path):
    plan, result = _audit(tmp_path, "identity", group="so3", rotations=6)
    total = result.total
    floor = result.total.interp_floor
    assert total.rel_equiv_error > 1e-3
    assert floor > 1e-3
    # The input's clean part is exact (atoms rotated, then voxelized); the rest is resampling.
    assert floor == pytest.approx(total.rel_equiv_error, rel=0.25)
    weights = plan.plan.spec.head_weights["denoised"]
    assert weights.shape == (1, 1, 12, 12, 12) and not weights.all()  # spherical mask on


def test_ready_grids_under_so3_floor_equals_ree(tmp_path):
    grids = torch.rand(4, 1, 10, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.savez(tmp_path / "grids.npz", grid=grids.numpy())
    _, result = _audit(tmp_path, "identity", group="so3", rotations=4, data=tmp_path / "grids.npz", voxel={"grid_size": None})
    assert result.total.interp_floor == pytest.approx(result.total.rel_equiv_error, rel=1e-9)


def test_non_cubic_grid_under_cube_group_is_refused(tmp_path):
    np.savez(tmp_path / "grids.npz", grid=np.zeros((3, 1, 8, 8, 10)))
    with pytest.raises(ConfigError, match="cubic"):
        _audit(tmp_path, "identity", data=tmp_path / "grids.npz", voxel={"grid_size": None})


def test_grid_shape_must_match_config(tmp_path):
    np.savez(tmp_path / "grids.npz", grid=np.zeros((3, 1, 8, 8, 8)))
    with pytest.raises(DataError, match="grid_size is 12"):
        _audit(tmp_path, "identity", data=tmp_path / "grids.npz")


def test_wrong_output_shape_fails_the_checkpoint(tmp_path):
    np.savez(tmp_path / "three.npz", grid=np.zeros((2, 3, 8, 8, 8)))
    plan, _ = _audit(tmp_path, "identity", data=tmp_path / "three.npz", voxel={"grid_size": 8})
    # A model with the wrong number of output channels: the checkpoint fails, the audit does not.
    plan.model = torch.nn.Sequential(torch.nn.Conv3d(3, 2, 1)).double()
    torch.save(plan.model.state_dict(), tmp_path / "wrong.pt")
    result = audit_checkpoint(plan, CheckpointRef(tmp_path / "wrong.pt", "wrong.pt", "run", 1))
    assert result.status == "bad_output_shape" and "(2, 8, 8, 8)" in result.message


def test_default_batch_size_shrinks_for_large_grids():
    from equiaudit.plan import ORBIT_BYTES, default_batch_size
    from equiaudit.engine import HeadSpec, OrbitSpec

    grids = OrbitSpec(fields={}, heads=(HeadSpec("denoised", "voxel", "clean"),), inputs=["noisy"])
    small = default_batch_size({"clean": torch.zeros(1, 2, 12, 12, 12)}, grids, 24)
    large = default_batch_size({"clean": torch.zeros(1, 8, 32, 32, 32)}, grids, 24)
    assert small == 64  # the usual default when memory is no concern
    assert large == 1 and 8 * 24 * 8 * 32**3 * 2 > ORBIT_BYTES  # two samples would exceed the budget
    points = OrbitSpec(fields={}, heads=(HeadSpec("forces", "vector", "forces"),), inputs=["pos"])
    assert default_batch_size({"forces": torch.zeros(1, 13, 3)}, points, 16) == 64

"""Defaults that match the docs: voxel grids default to the exact cube group whatever the task,
interp_floor is shown where grids rotate continuously, and weights saved as the trainer's weight
average read as ``ema``."""

from __future__ import annotations

import pytest
import torch

import equiaudit
from equiaudit.errors import CheckpointError
from equiaudit.io.checkpoints import AVERAGED_MARKER, describe_checkpoint, read_checkpoint, save_checkpoint
from helpers import conv3d


def grids(n=4, channels=2, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, size, generator=g, dtype=torch.float64)
    return {"grid": x, "target": x.clone()}


def test_custom_voxel_task_defaults_to_the_cube_group_and_continuous_shows_interp_floor():
    settings = dict(task="custom", fields={"grid": "voxel"}, heads={"out": {"rep": "voxel", "target": "target"}},
                    inputs=["grid"], outputs=["out"], bootstrap=0)
    model = conv3d().double()
    cube = equiaudit.audit(model, grids(), **settings)
    assert (cube.group, cube.n_rotations) == ("octahedral", 24)
    assert cube.total.interp_floor is None and "interp_floor" not in repr(cube)
    continuous = equiaudit.audit(model, grids(), group="so3", rotations=4, sampling="haar", **settings)
    assert continuous.group == "so3" and continuous.total.interp_floor > 0
    assert "interp_floor" in repr(continuous)
    # A point-cloud custom task keeps so3.
    pts = torch.randn(4, 3, 3, dtype=torch.float64)
    linear = torch.nn.Linear(3, 3, bias=False).double()
    assert equiaudit.audit(linear, {"pos": pts, "target": pts}, task="custom", fields={"pos": "vector"},
                           heads={"out": {"rep": "vector", "target": "target"}}, inputs=["pos"], outputs=["out"],
                           bootstrap=0).group == "so3"


def test_weights_saved_as_the_average_read_as_ema(tmp_path):
    state = {"w": torch.ones(2)}
    marked = save_checkpoint(tmp_path / "step_000010.pt", state, step=10, averaged=True)
    plain = save_checkpoint(tmp_path / "step_000020.pt", state, step=20)
    assert torch.load(marked, weights_only=True)[AVERAGED_MARKER] is True
    assert read_checkpoint(marked).weights == "ema" and describe_checkpoint(marked)["weights"] == "ema"
    assert read_checkpoint(plain).weights == "raw"
    with pytest.raises(CheckpointError, match="only EMA"):  # its raw weights were never saved
        read_checkpoint(marked, weights="raw")

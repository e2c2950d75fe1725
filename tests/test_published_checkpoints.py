"""Real checkpoints as their projects ship them, from the installed wheels (no model code
needed): ``pip install --no-deps chgnet sevenn`` (CI does; see .ci/run). Skipped where the
packages are absent.

* CHGNet ``chgnet/pretrained/*/*.pth.tar``: ``{"model": {"state_dict", "model_args"},
  "optimizer", "scheduler", ...}`` — the weights one level down, no step at the top.
* SevenNet ``sevenn/pretrained_potentials/*/*.pth``: ``model_state_dict`` beside a
  ``config`` holding numpy arrays and a ``torch.device``, and the ``epoch``.

The packages are located with ``importlib.util.find_spec`` (which does not import them:
their ``__init__`` needs torch_geometric, ase, ... that these tests do not install).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.io.checkpoints import describe_checkpoint, discover_checkpoints, load_into_model, read_checkpoint


def shipped(package: str, pattern: str) -> list:
    """pytest params: the package's files matching ``pattern``, or one skipping param."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for root in roots for f in Path(root).glob(pattern))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{package} not installed: pip install --no-deps {package}"))]
    return [pytest.param(f, id=f"{f.parent.name}/{f.name}") for f in files]


CHGNET = shipped("chgnet", "pretrained/*/*.pth.tar")
SEVENNET = shipped("sevenn", "pretrained_potentials/*/*.pth")


class Mirror(nn.Module):
    """A module whose state_dict has exactly the given keys and shapes (every entry a
    parameter), standing in for the real network, whose code is not installed."""

    def __init__(self, shapes: dict[str, torch.Size]):
        super().__init__()
        for key, shape in shapes.items():
            module = self
            *path, leaf = key.split(".")
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, nn.Parameter(torch.zeros(shape), requires_grad=False))


class Wrapped(nn.Module):
    """A factory that wraps the network as ``self.model`` (the published keys lack ``model.``)."""

    def __init__(self, shapes):
        super().__init__()
        self.model = Mirror(shapes)


def check_loads(ckpt) -> None:
    shapes = {k: v.shape for k, v in ckpt.state_dict.items()}
    model = Wrapped(shapes)
    assert load_into_model(model, ckpt) == "added 'model.'"
    own = model.model.state_dict()
    assert all(torch.equal(own[k], v.float()) for k, v in ckpt.state_dict.items())


@pytest.mark.parametrize("path", CHGNET)
def test_chgnet_weights_one_level_down(path):
    ckpt = read_checkpoint(path)
    assert (ckpt.format, ckpt.weights, ckpt.weights_source) == ("training_dict", "raw", "model.state_dict")
    assert ckpt.step is None and ckpt.step_source is None  # `e30f77s348m32` names MAEs, not a step
    assert "composition_model.fc.weight" in ckpt.state_dict and len(ckpt.state_dict) in (99, 136)
    check_loads(ckpt)
    with pytest.raises(Exception, match="no EMA weights found"):
        read_checkpoint(path, weights="ema")


@pytest.mark.parametrize("path", SEVENNET)
def test_sevennet_numpy_globals(path):
    ckpt = read_checkpoint(path)  # its config needs numpy's _reconstruct, ndarray, dtype, Float64DType
    assert (ckpt.format, ckpt.weights, ckpt.weights_source) == ("training_dict", "raw", "model_state_dict")
    assert ckpt.step_source == "epoch" and ckpt.step == ckpt.epoch and ckpt.epoch > 0  # `_0` in the name is not it
    assert len(ckpt.state_dict) in (121, 169)
    check_loads(ckpt)
    [ref] = discover_checkpoints([path.parent])
    assert (ref.name, ref.run, ref.step, ref.step_source) == (path.name, path.parent.name, ckpt.step, "epoch")


@pytest.mark.parametrize("path", [*CHGNET[:1], *SEVENNET[:1]])
def test_inspect_real_files(path):
    info = describe_checkpoint(path)
    assert info["weights"] == "raw" and info["prefix"] is None and info["dtypes"] == {"float32": info["n_tensors"]}
    result = CliRunner().invoke(app, ["inspect", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_parameters"] == info["n_parameters"] > 100_000
    table = CliRunner().invoke(app, ["inspect", str(path)])
    assert table.exit_code == 0 and "raw (model" in table.output

"""The float floor: actions in float64, a positive floor at every precision, and the at_float_floor flag."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from equiaudit.engine import _orbit_inputs, evaluate_orbits
from equiaudit.floor import AT_FLOOR, JITTER, JitterAction, flag, unit_roundoff
from equiaudit.groups import make_group, make_rotation_set
from equiaudit.random import SampleRandom
from helpers import RadialScaling, random_matrix, run_audit, vector_dataset, vector_spec


class ScaledIdentity(torch.nn.Module):
    """``f(x) = c·x`` through a Linear layer (so autocast runs it in low precision): exactly equivariant."""

    def __init__(self, c: float = 0.9):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(c * torch.eye(3))

    def forward(self, pos):
        return self.linear(pos)


class LinearLayer(ScaledIdentity):
    """``f(x) = A x`` through a Linear layer: not equivariant."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.linear.weight.copy_(random_matrix().float())


def _ree_and_floor(model, *, dtype=torch.float32, autocast=None, n=48, k=8):
    data = vector_dataset(n, 6)
    data["target"] = data["pos"] * 0.5
    spec = dataclasses.replace(vector_spec("point"), autocast=autocast)
    model = model.to(dtype)
    total = run_audit(model, data, spec, k=k, sampling="haar", float_floor=True).total
    return total.rel_equiv_error, total.float_floor


def test_unit_roundoff():
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float64) == 2.0**-53


def test_actions_run_in_float64_and_cast_once():
    """The model sees float32(R·x computed in float64); its outputs are mapped back in float64."""
    data = vector_dataset(4, 5)
    rotations = make_rotation_set("so3", 3).sample(4, 0)
    spec = dataclasses.replace(vector_spec("vector"), group=make_group("so3", 3))
    inputs = _orbit_inputs(data, rotations, spec, torch.float32)["pos"]
    expected = torch.einsum("bkij,bnj->bkni", rotations, data["pos"]).reshape(12, 5, 3).float()
    assert inputs.dtype == torch.float32 and torch.equal(inputs, expected)

    seen = {}

    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, pos):
            seen["out"] = pos * 1.0
            return seen["out"]

    result = evaluate_orbits(Record(), data, rotations, spec)
    back = torch.einsum("bkji,bknj->bkni", rotations, seen["out"].double().reshape(4, 3, 5, 3))
    spread = (back - back.mean(1, keepdim=True)).square().mean((1, 2, 3)) * 3 / 2
    assert torch.allclose(result["out"].equiv_error, spread, rtol=1e-12, atol=0)


def test_jitter_copies_differ_by_rounding_only():
    jitter = JitterAction(unit_roundoff(torch.float32), SampleRandom(0), centres_points=False)
    pos, energy = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    copy_ids = torch.arange(10).reshape(2, 5)
    copies = jitter.act("vector", pos, copy_ids)
    relative = (copies - pos.unsqueeze(1)).abs() / pos.norm(dim=-1, keepdim=True).unsqueeze(1)  # to each vector's norm
    assert 0 < relative.max() <= unit_roundoff(torch.float32)
    assert torch.equal(jitter.act("vector", pos[1:], copy_ids[1:]), copies[1:])  # a copy's jitter is its own
    assert torch.equal(jitter.act("scalar", energy, copy_ids), energy.unsqueeze(1).expand(2, 5))
    back = jitter.act_inverse("vector", copies, copy_ids)
    assert 0 < ((back - copies).abs() / copies.norm(dim=-1, keepdim=True)).max() <= 2 * JITTER * unit_roundoff(torch.float64)  # + its own rounding


def test_grid_jitter_is_a_copys_own():
    # A voxel grid (≥ BULK numbers a copy) draws from its copy's own seeded generator: same copy,
    # same jitter whatever is beside it; within ±1 rounding of each voxel.
    from equiaudit.random import BULK

    jitter = JitterAction(unit_roundoff(torch.float32), SampleRandom(3), centres_points=False)
    grids = torch.rand(3, 2, 16, 16, 16, dtype=torch.float64) + 0.5
    assert grids[0].numel() >= BULK
    copy_ids = torch.arange(12).reshape(3, 4)
    copies = jitter.act("voxel", grids, copy_ids)
    assert torch.equal(jitter.act("voxel", grids[2:], copy_ids[2:]), copies[2:])
    relative = (copies - grids.unsqueeze(1)) / grids.unsqueeze(1)
    assert 0 < relative.abs().max() <= unit_roundoff(torch.float32)
    assert not torch.equal(copies[0, 0], copies[0, 1])


@pytest.mark.parametrize("model", [RadialScaling(), ScaledIdentity()], ids=["radial", "linear-identity"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_equivariant_models_read_within_the_floor(model, dtype):
    ree, floor = _ree_and_floor(model, dtype=dtype)
    assert floor > 0
    assert flag(ree, floor) == AT_FLOOR, (ree, floor)


def test_bf16_autocast_flag_fires_for_an_equivariant_model_and_not_for_a_broken_one():
    ree, floor = _ree_and_floor(ScaledIdentity(), autocast=torch.bfloat16)
    ree32, floor32 = _ree_and_floor(ScaledIdentity())
    # Autocast really ran the layer in bfloat16: the error and the floor are far above float32's.
    assert ree > 1e3 * ree32 and floor > 1e3 * floor32
    assert flag(ree, floor) == AT_FLOOR
    broken, broken_floor = _ree_and_floor(LinearLayer(), autocast=torch.bfloat16)
    assert broken > 0.1 and flag(broken, broken_floor) == ""


def test_flag_rule():
    assert flag(1e-9, 1e-10) == AT_FLOOR and flag(1e-8, 1e-10) == ""
    assert flag(float("nan"), 1e-10) == ""
    assert flag(0.0, 0.0) == AT_FLOOR


def test_floor_is_reported_for_every_audit_with_a_flag(tmp_path):
    """Through the config: model.autocast: bf16 and the summary's float_floor / flag columns."""
    from equiaudit.io.checkpoints import CheckpointRef
    from equiaudit.io.config import parse_config
    from equiaudit.io.data import save_npz
    from equiaudit.runner import audit_checkpoint, open_audit

    data = vector_dataset(16, 5)
    save_npz(tmp_path / "data.npz", {"pos": data["pos"].numpy(), "target": data["pos"].numpy()})
    results = {}
    for name, autocast in (("f32", None), ("bf16", "bf16")):
        config = parse_config({
            "model": {"factory": f"{__file__}:ScaledIdentity", "inputs": ["pos"], "outputs": ["out"],
                      **({"autocast": autocast} if autocast else {})},
            "data": {"path": str(tmp_path / "data.npz")},
            "fields": {"pos": "point"},
            "heads": {"out": {"rep": "point", "target": "target"}},
            "group": {"name": "so3", "rotations": 4},
            "bootstrap": 20,
        })
        audit = open_audit(config, device="cpu")
        torch.save(audit.model.state_dict(), tmp_path / "m.pt")
        results[name] = audit_checkpoint(audit, CheckpointRef(tmp_path / "m.pt", "m.pt", "run", 0))
        assert results[name].ok, results[name].message
        assert flag(results[name].total.rel_equiv_error, results[name].total.float_floor) == AT_FLOOR
    assert results["bf16"].total.float_floor > 1e3 * results["f32"].total.float_floor

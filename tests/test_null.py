"""loss_null and skill (equiaudit.null): closed forms per representation, computed by hand here
from the data the test builds, and the not_learned flag of a model that outputs the null predictor."""

from __future__ import annotations

import math

import pytest
import torch

import equiaudit
from equiaudit.null import NOT_LEARNED
from helpers import LinearMap

BASE = dict(rotations=8, sampling="haar", bootstrap=0, seed=3)


def padded_atoms(n=12, atoms=5, seed=0):
    """``pos``, ``z`` (types 1, 6, 8), ``mask`` (every third sample two atoms shorter)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, atoms, 3, generator=g, dtype=torch.float64)
    z = torch.tensor([1, 6, 8])[torch.randint(3, (n, atoms), generator=g)]
    mask = torch.ones(n, atoms, dtype=torch.bool)
    mask[::3, -2:] = False
    return pos * mask[..., None], z * mask, mask, g


class Constant(torch.nn.Module):
    """Returns fixed per-sample outputs whatever the input (looked up by a per-sample index)."""

    def __init__(self, outputs: dict[str, torch.Tensor]):
        super().__init__()
        self.outputs = outputs
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, index):
        return {name: value[index.long()] + 0 * self.dummy for name, value in self.outputs.items()}


def test_vector_and_point_nulls_are_zero_and_centroid():
    pos, z, mask, g = padded_atoms()
    forces = torch.randn(pos.shape, generator=g, dtype=torch.float64) * mask[..., None]
    target_points = (torch.randn(pos.shape, generator=g, dtype=torch.float64) + 2.0) * mask[..., None]
    data = {"pos": pos, "z": z, "mask": mask, "forces": forces, "points": target_points}
    class Two(LinearMap):
        def forward(self, pos):
            return {"forces": super().forward(pos), "points": super().forward(pos)}

    result = equiaudit.audit(
        Two(torch.eye(3, dtype=torch.float64) * 0.5), data, task="custom",
        fields={"pos": "point"}, heads={"forces": {"rep": "vector", "target": "forces"},
                                        "points": {"rep": "point", "target": "points"}},
        inputs=["pos"], **BASE)
    valid = mask[..., None].double()
    per_sample_vector = (forces.square() * valid).sum((1, 2)) / (3 * mask.sum(1))
    centroid = (target_points * valid).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
    per_sample_point = ((target_points - centroid).square() * valid).sum((1, 2)) / (3 * mask.sum(1))
    assert result["forces"].loss_null == pytest.approx(per_sample_vector.mean().item(), rel=1e-12)
    assert result["points"].loss_null == pytest.approx(per_sample_point.mean().item(), rel=1e-12)
    assert result.total.loss_null == pytest.approx(result["forces"].loss_null + result["points"].loss_null, rel=1e-12)
    total = result.total
    assert total.skill == pytest.approx(1 - total.loss_sym / total.loss_null, rel=1e-12)


def test_per_atom_scalar_null_is_the_per_element_mean():
    pos, z, mask, g = padded_atoms(n=16)
    charges = (torch.randn(mask.shape, generator=g, dtype=torch.float64) + z.double() / 3) * mask
    index = torch.arange(len(pos))
    data = {"pos": pos, "z": z, "mask": mask, "charges": charges, "index": index}
    zero = Constant({"charges": torch.zeros_like(charges)})
    result = equiaudit.audit(zero, data, task="custom", fields={"pos": "point"},
                             heads={"charges": {"rep": "scalar", "target": "charges"}}, inputs=["index"], **BASE)
    # By hand: weights 1/n_atoms(sample) per valid atom; μ_e the weighted mean of type e; loss the weighted MSE / N.
    w = mask.double() / mask.sum(1, keepdim=True)
    expected = 0.0
    for element in (1, 6, 8):
        sel = (z == element) & mask
        mu = (charges * w)[sel].sum() / w[sel].sum()
        expected += ((charges - mu).square() * w)[sel].sum().item()
    expected /= len(pos)
    assert result["charges"].loss_null == pytest.approx(expected, rel=1e-10)


def test_energy_null_is_least_squares_on_composition():
    pos, z, mask, g = padded_atoms(n=30)
    counts = torch.stack([((z == e) & mask).sum(1) for e in (1, 6, 8)], 1).double()
    energy = counts @ torch.tensor([-0.5, -37.8, -75.0], dtype=torch.float64) + 0.3 * torch.randn(30, generator=g, dtype=torch.float64)
    data = {"pos": pos, "z": z, "mask": mask, "energy": energy, "index": torch.arange(30)}
    design = torch.cat([counts, torch.ones(30, 1, dtype=torch.float64)], 1)
    fitted = design @ torch.linalg.lstsq(design, energy[:, None]).solution
    expected = (energy[:, None] - fitted).square().mean().item()
    # A model that outputs exactly the null predictor: skill 0, not_learned.
    null_model = Constant({"energy": fitted[:, 0]})
    settings = dict(task="custom", fields={"pos": "point"}, heads={"energy": {"rep": "scalar", "target": "energy"}},
                    inputs=["index"], **BASE)
    result = equiaudit.audit(null_model, data, **settings)
    head = result["energy"]
    assert head.loss_null == pytest.approx(expected, rel=1e-9)
    assert head.skill == pytest.approx(0.0, abs=1e-9)
    assert head.flag == NOT_LEARNED and result.total.not_learned
    # The truth itself: skill 1, no flag; and the same numbers in batches of 7 (merged per-sample tables).
    perfect = equiaudit.audit(Constant({"energy": energy}), data, **settings)
    assert perfect["energy"].skill == pytest.approx(1.0, abs=1e-12) and perfect["energy"].flag != NOT_LEARNED
    batched = equiaudit.audit(null_model, data, batch_size=7, **settings)
    assert batched["energy"].loss_null == pytest.approx(head.loss_null, rel=1e-12)


def test_zero_force_model_is_not_learned_and_threshold_is_configurable():
    pos, z, mask, g = padded_atoms()
    forces = torch.randn(pos.shape, generator=g, dtype=torch.float64) * mask[..., None]
    data = {"pos": pos, "z": z, "mask": mask, "forces": forces, "index": torch.arange(len(pos))}
    settings = dict(task="custom", fields={"pos": "point"}, heads={"forces": {"rep": "vector", "target": "forces"}},
                    inputs=["index"], **BASE)
    zero = Constant({"forces": torch.zeros_like(forces)})
    result = equiaudit.audit(zero, data, **settings)
    assert result.total.skill == pytest.approx(0.0, abs=1e-12) and result.total.flag == NOT_LEARNED
    assert "NOT LEARNED" in repr(result)
    rows = result.rows()
    assert all(r["flag"] == NOT_LEARNED and abs(r["skill"]) < 1e-12 for r in rows)
    assert list(rows[0])[-2:] == ["skill", "loss_null"]  # new columns come last
    assert result.scalars()["equiaudit/skill"] == pytest.approx(0.0, abs=1e-12)
    # Half the target learnt by an equivariant map (f(x) = x/2, target x): skill 1 − 1/4 = 0.75 ≥ 0.1,
    # and flagged under --min-skill 0.8.
    half = LinearMap(torch.eye(3, dtype=torch.float64) / 2)
    settings = {**settings, "fields": {"pos": "vector"}, "inputs": ["pos"]}
    data = {**data, "forces": pos}
    assert equiaudit.audit(half, data, **settings).total.skill == pytest.approx(0.75, rel=1e-12)
    assert equiaudit.audit(half, data, min_skill=0.8, **settings).total.flag == NOT_LEARNED
    assert equiaudit.audit(half, data, **settings).total.flag != NOT_LEARNED


def test_voxel_and_tensor_nulls():
    g = torch.Generator().manual_seed(5)
    n = 10
    grids = torch.rand(n, 2, 4, 4, 4, generator=g, dtype=torch.float64) + torch.tensor([0.0, 3.0]).reshape(1, 2, 1, 1, 1)
    tensors = torch.randn(n, 3, 3, generator=g, dtype=torch.float64) + 2 * torch.eye(3, dtype=torch.float64)
    data = {"grid": grids, "stress": tensors, "index": torch.arange(n)}
    zero = Constant({"grid": torch.zeros_like(grids), "stress": torch.zeros_like(tensors)})
    result = equiaudit.audit(zero, data, task="custom", fields={"grid": "voxel"}, group="octahedral", rotations=24,
                             heads={"grid": {"rep": "voxel", "target": "grid"}, "stress": {"rep": "tensor2", "target": "stress"}},
                             inputs=["index"], bootstrap=0)
    channel_mean = grids.mean((0, 2, 3, 4), keepdim=True)  # the best uniform grid per channel
    assert result["grid"].loss_null == pytest.approx((grids - channel_mean).square().mean().item(), rel=1e-10)
    c = torch.diagonal(tensors, dim1=-2, dim2=-1).mean()  # the best c·I
    expected = (tensors - c * torch.eye(3, dtype=torch.float64)).square().mean().item()
    assert result["stress"].loss_null == pytest.approx(expected, rel=1e-10)


def test_denoising_null_takes_the_identity_map_when_lower():
    from equiaudit.engine import HeadSpec, OrbitSpec
    from equiaudit.null import loss_null, null_columns

    g = torch.Generator().manual_seed(2)
    clean = torch.rand(6, 1, 4, 4, 4, generator=g, dtype=torch.float64)
    noisy = clean + 0.01 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    head = HeadSpec("denoised", "voxel", "clean")
    spec = OrbitSpec(fields={"noisy": "voxel"}, heads=(head,), inputs=["noisy"], mask=None)
    columns = null_columns(head, spec, {"clean": clean, "noisy": noisy}, identity_input="noisy")
    identity = (noisy - clean).square().mean().item()
    assert loss_null("denoised", columns) == pytest.approx(identity, rel=1e-10)
    assert loss_null("denoised", {k: v for k, v in columns.items() if not k.startswith("null_id")}) == \
        pytest.approx((clean - clean.mean()).square().mean().item(), rel=1e-10)
    assert math.isnan(loss_null("other", columns))

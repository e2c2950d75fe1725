"""The flow-matching preset: consistent rotation of input and target, and known answers."""

import pytest
import torch

import equiaudit
from equiaudit.api import settings
from equiaudit.plan import resolve


def _dataset(n=64, atoms=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, atoms, 3, generator=g, dtype=torch.float64) * 1.5 + 3.0
    mask = torch.ones(n, atoms, dtype=torch.bool)
    mask[::3, -2:] = False  # some molecules are smaller
    pos = pos * mask[..., None]
    return {"pos": pos, "z": torch.full((n, atoms), 6) * mask, "mask": mask}


class Velocity(torch.nn.Module):
    """``v = a·x_t·(1 + t)`` (equivariant) plus a constant vector ``bias`` on valid atoms."""

    def __init__(self, bias=(0.0, 0.0, 0.0), scale=0.5):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(bias, dtype=torch.float64))
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def forward(self, x_t, t, z, mask):
        v = self.scale * x_t * (1 + t[:, None, None]) + self.bias
        return v * mask[..., None]


def _audit(model, dataset, k=8, seed=0):
    options = dict(task="flow_matching", rotations=k, sampling="haar", seed=seed, batch_size=32, bootstrap=100)
    prepared = resolve(settings(**options), dataset, device="cpu").prepare(dataset).data
    return prepared, equiaudit.audit(model, dataset, device="cpu", **options)


def test_prepared_fields_are_consistent():
    prepared, _ = _audit(Velocity(), _dataset())
    mask = prepared["mask"]
    x0, x1, t = prepared["x0"], prepared["x1"], prepared["t"]
    assert torch.allclose(prepared["x_t"], (1 - t[:, None, None]) * x0 + t[:, None, None] * x1)
    assert torch.allclose(prepared["velocity"], x1 - x0)
    assert ((0 <= t) & (t <= 1)).all() and t.shape == (64,)
    assert x0[~mask].abs().max() == 0 and x1[~mask].abs().max() == 0
    valid = mask[..., None].double()
    assert ((x0 * valid).sum(1) / valid.sum(1)).abs().max() < 1e-12  # centred on valid atoms
    again, _ = _audit(Velocity(), _dataset())
    assert torch.equal(again["x_t"], prepared["x_t"])  # seeded: identical for every checkpoint


def test_equivariant_velocity_reads_at_float_floor():
    _, summary = _audit(Velocity(), _dataset())
    assert summary["velocity"].loss_aug > 0.1
    assert abs(summary["velocity"].rel_equiv_error) < 1e-5


def test_constant_bias_has_closed_form_ree():
    """``v = v_eq + b``: P(g) = v_eq + Rᵀb, so EE = |b|²/3 per component and L_sym is v_eq's loss."""
    bias = torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64)
    dataset = _dataset(n=512)
    prepared, summary = _audit(Velocity(bias=bias.tolist()), dataset, k=16)
    mask = prepared["mask"][..., None].double().expand(-1, -1, 3)
    v_eq = 0.5 * prepared["x_t"] * (1 + prepared["t"][:, None, None])
    sym_loss = (((v_eq - prepared["velocity"]) ** 2 * mask).sum((1, 2)) / mask.sum((1, 2))).mean()
    ee = bias.square().sum() / 3
    expected = float(ee / (sym_loss + ee))
    assert summary["velocity"].rel_equiv_error == pytest.approx(expected, rel=0.03)
    assert summary["velocity"].loss_sym == pytest.approx(float(sym_loss), rel=0.03)

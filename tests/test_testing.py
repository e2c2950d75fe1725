"""equiaudit.testing.assert_equivariant: passes exactly equivariant models at their float floor
(float32 and float64, EGNN and an e3nn network), fails a non-equivariant transformer with a
message naming REE and floor, and lets a learned model through only under ``max_ree``."""

from __future__ import annotations

import pytest
import torch

from equiaudit.testing import assert_equivariant
from equiaudit.zoo.models import egnn_force_field, transformer_force_field
from helpers import molecule_clouds


def _force_data(dtype=torch.float64, n: int = 24):
    data = molecule_clouds(n=n, atoms=6, seed=3)
    g = torch.Generator().manual_seed(4)
    data["forces"] = torch.randn(n, 6, 3, generator=g, dtype=torch.float64) * data["mask"][..., None]
    data["energy"] = torch.randn(n, generator=g, dtype=torch.float64)
    return data


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_egnn_passes_at_either_precision(dtype):
    torch.manual_seed(0)
    model = egnn_force_field(hidden=16, layers=2).to(dtype)
    result = assert_equivariant(model, _force_data(), task="force_field", rotations=8, bootstrap=0)
    assert result.total.rel_equiv_error <= 10 * result.total.float_floor


def test_an_e3nn_network_passes():
    o3 = pytest.importorskip("e3nn.o3")

    class E3Vectors(torch.nn.Module):
        """Per-atom vectors from e3nn tensor products of the position with its spherical harmonics.

        e3nn orders an l = 1 irrep (y, z, x): positions are permuted into that basis and the
        output back, so the network is equivariant to rotations of (x, y, z)."""

        def __init__(self):
            super().__init__()
            self.tp = o3.FullyConnectedTensorProduct("1x1o", "1x0e+1x1o+1x2e", "2x0e+2x1o")
            self.out = o3.Linear("2x1o", "1x1o")

        def forward(self, pos):
            x = pos[..., [1, 2, 0]]
            h = self.tp(x, o3.spherical_harmonics("0e+1o+2e", x, normalize=False))
            gates, vectors = torch.sigmoid(h[..., :2]), h[..., 2:].unflatten(-1, (2, 3))
            return self.out((gates.unsqueeze(-1) * vectors).flatten(-2))[..., [2, 0, 1]]

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(32, 5, 3, generator=g, dtype=torch.float64)
    data = {"pos": pos, "target": torch.randn(32, 5, 3, generator=g, dtype=torch.float64)}
    assert_equivariant(E3Vectors(), data, task="custom", fields={"pos": "point"},
                       heads={"out": {"rep": "vector", "target": "target"}}, inputs=["pos"], outputs=["out"],
                       rotations=8, bootstrap=100)


def test_a_transformer_fails_with_ree_and_floor_named():
    torch.manual_seed(0)
    model = transformer_force_field(hidden=16, layers=1, heads=2)
    with pytest.raises(AssertionError) as failure:
        assert_equivariant(model, _force_data(), task="force_field", rotations=8, bootstrap=100)
    message = str(failure.value)
    assert "not equivariant" in message
    assert "REE" in message and "float floor" in message and "95 % CI" in message
    assert "forces:" in message and "worst samples: #" in message


def test_max_ree_lets_a_learned_model_through_and_only_above_its_reading():
    torch.manual_seed(0)
    model = transformer_force_field(hidden=16, layers=1, heads=2)
    data = _force_data()
    # Measure once, then allow just above and just below what it reads.
    with pytest.raises(AssertionError):
        assert_equivariant(model, data, task="force_field", rotations=8, bootstrap=0)
    from equiaudit import audit

    result = audit(model, data, task="force_field", rotations=8, bootstrap=0)
    worst = max(h.rel_equiv_error for h in (result.total, *result.heads.values()))
    assert_equivariant(model, data, task="force_field", rotations=8, bootstrap=0, max_ree=1.01 * worst)
    with pytest.raises(AssertionError, match="within max_ree"):
        assert_equivariant(model, data, task="force_field", rotations=8, bootstrap=0, max_ree=0.5 * worst)

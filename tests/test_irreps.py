"""e3nn irreps strings as representations: Wigner-D against e3nn, an e3nn network at the floor,
the closed form of a non-equivariant map on ``l = 2`` and the per-``l`` breakdown."""

import pytest
import torch

o3 = pytest.importorskip("e3nn.o3")

import equiaudit  # noqa: E402
from equiaudit.api import settings  # noqa: E402
from equiaudit.errors import ConfigError  # noqa: E402
from equiaudit.irreps import act_irreps, parse_irreps, wigner_d  # noqa: E402
from equiaudit.representations import get_representation  # noqa: E402


def _rotations(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, dtype=torch.float64, generator=g))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    return q * torch.linalg.det(q)[..., None, None]  # proper


def test_parse():
    irreps = parse_irreps("1x0e+2x1o+1x2e")
    assert irreps.blocks == ((1, 0, 1), (2, 1, -1), (1, 2, 1)) and irreps.dim == 12
    assert parse_irreps(" 0e + 3x2o ").dim == 16 and str(parse_irreps("0e+1o")) == "1x0e+1x1o"
    assert irreps.degree_of_component().tolist() == [0] + [1] * 6 + [2] * 5
    for bad in ("", "1x", "2x1q", "vector", "1x0e++1o"):
        with pytest.raises(ValueError):
            parse_irreps(bad)
    with pytest.raises(ValueError, match="irreps string"):
        get_representation("1x2q")
    with pytest.raises(ConfigError, match="irreps string"):
        settings(task="custom", fields={"x": "2x1q"})


def test_wigner_d_is_e3nns_basis():
    r, s = _rotations(64, 0), _rotations(64, 1)
    ds, dr, drs = wigner_d(4, r), wigner_d(4, s), wigner_d(4, r @ s)
    points = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for l in range(5):
        eye = torch.eye(2 * l + 1, dtype=torch.float64)
        assert (drs[l] - ds[l] @ dr[l]).abs().max() < 1e-13  # a homomorphism
        assert (ds[l] @ ds[l].transpose(-1, -2) - eye).abs().max() < 1e-13  # orthogonal
        # e3nn's real spherical harmonics move by it: Y(R x) = D(R) Y(x), to float64 rounding
        y = o3.spherical_harmonics(l, points, normalize=True)
        y_rotated = o3.spherical_harmonics(l, points @ r[0].T, normalize=True)
        assert (y_rotated - y @ ds[l][0].T).abs().max() < 1e-13
    # e3nn's own D_from_matrix agrees to its float32 tables' precision
    reference = o3.Irreps("0e+1o+2e+3o").D_from_matrix(r)
    mine = torch.block_diag(*[d[0] for d in ds[:4]])
    assert (reference[0] - mine).abs().max() < 1e-5
    assert torch.equal(ds[1], r)  # D¹ = R in x, y, z order


def test_parity_under_o3():
    irreps = parse_irreps("1x0e+1x0o+1x1o+1x1e+1x2e")
    r = _rotations(8)
    value = torch.randn(1, 1, irreps.dim, dtype=torch.float64).expand(1, 8, -1)
    plus = act_irreps(irreps, value, r[None])
    minus = act_irreps(irreps, value, -r[None])
    sign = torch.tensor([1, -1] + [-1] * 3 + [1] * 3 + [1] * 5, dtype=torch.float64)
    assert torch.allclose(minus, plus * sign, atol=1e-15)
    vector = get_representation("vector").orbit(value[:, 0, 2:5], -r[None])
    assert torch.allclose(minus[..., 2:5], vector, atol=1e-15)  # 1o is a vector; 1e a pseudovector


class SphericalNet(torch.nn.Module):
    """An e3nn network: spherical harmonics of each atom's position, a tensor product with
    itself and a linear layer; per-atom output ``1x0e+1x1o+1x2e`` (an ``l = 2`` part)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        sh = o3.Irreps.spherical_harmonics(2)
        self.sh = sh
        self.product = o3.FullyConnectedTensorProduct(sh, sh, "2x0e+2x1o+2x2e")
        self.linear = o3.Linear("2x0e+2x1o+2x2e", "1x0e+1x1o+1x2e")

    def forward(self, pos):
        y = o3.spherical_harmonics(self.sh, pos, normalize=False)
        return self.linear(self.product(y, y))


def _clouds(n=32, atoms=5):
    pos = torch.randn(n, atoms, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = torch.randn(n, atoms, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    return {"pos": pos, "y": target}


@pytest.mark.parametrize("group", ["so3", "o3"])
def test_e3nn_network_reads_at_floor(group):
    result = equiaudit.audit(SphericalNet(), _clouds(), task="custom", fields={"pos": "vector"},
                             heads={"out": {"rep": "1x0e+1x1o+1x2e", "target": "y"}}, inputs=["pos"], outputs=["out"],
                             group=group, rotations=8, seed=0, device="cpu", bootstrap=0)
    head = result.heads["out"]
    assert head.loss_aug > 0.5 and head.rel_equiv_error <= 10 * head.float_floor, (head.rel_equiv_error, head.float_floor)
    # negative control: the same outputs declared with the wrong parity are caught under o3 only
    wrong = equiaudit.audit(SphericalNet(), _clouds(), task="custom", fields={"pos": "vector"},
                            heads={"out": {"rep": "1x0e+1x1e+1x2e", "target": "y"}}, inputs=["pos"], outputs=["out"],
                            group=group, rotations=8, seed=0, device="cpu", bootstrap=0)
    assert (wrong.heads["out"].rel_equiv_error > 0.01) == (group == "o3")


def test_mixing_l2_matches_closed_form_and_breakdown_finds_l2():
    """``f = M`` on the ``l = 2`` block (identity on ``l = 0``), target ``x``: Schur's lemma gives
    ``E_g D⁻¹MD = c I`` with ``c = tr M/5``, so with ``B = M − cI`` and ``s = E|x₂|²``,
    ``EE = ‖B‖²_F s/5`` and ``L_sym = (c − 1)² s`` (over 6 components), i.e.
    ``REE = ‖B‖²_F / (‖B‖²_F + 5(c − 1)²)``; the ``l = 0`` component carries no error."""
    m = torch.eye(5, dtype=torch.float64) * 1.2 + 0.3 * torch.randn(5, 5, dtype=torch.float64,
                                                                      generator=torch.Generator().manual_seed(7))
    c = torch.trace(m) / 5
    frob = (m - c * torch.eye(5, dtype=torch.float64)).square().sum()
    expected = float(frob / (frob + 5 * (c - 1) ** 2))

    class MixL2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = torch.nn.Parameter(m.clone())

        def forward(self, x):
            return torch.cat([x[..., :1], x[..., 1:] @ self.m.T], dim=-1)

    x = torch.randn(256, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    result = equiaudit.audit(MixL2(), {"x": x}, task="custom", fields={"x": "1x0e+1x2e"},
                             heads={"out": {"rep": "1x0e+1x2e", "target": "x"}}, inputs=["x"], outputs=["out"],
                             rotations=32, seed=0, device="cpu", bootstrap=0, dtype="float64",
                             breakdown={"by": []})
    assert result.heads["out"].rel_equiv_error == pytest.approx(expected, rel=0.05)
    rows = {row["bin"]: row for row in result.breakdown if row["by"] == "l" and row["head"] == "out"}
    assert set(rows) == {"0", "2"}
    assert abs(rows["0"]["equiv_error"]) < 1e-12 and rows["2"]["share"] == pytest.approx(1.0, abs=1e-9)
    assert rows["2"]["rel_equiv_error"] == pytest.approx(expected, rel=0.05)

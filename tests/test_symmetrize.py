"""equiaudit.Symmetrized: the orbit average of a model, checked against closed forms.

* ``f(x) = A x`` (vector field, target ``y = x``): with ``c = tr A / 3`` and ``B = A − c I``
  the orbit mean of ``g⁻¹ A g`` is ``c I`` (Schur), so per unit ``|x|²/3`` the symmetric loss
  is ``3 (c − 1)²`` and the equivariance error ``‖B‖²_F``. The average of k i.i.d. Haar
  conjugates ``M_k = c I + (1/k) Σ_j g_j⁻¹ B g_j`` has ``E‖M_k − c I‖² = ‖B‖²/k`` (the terms
  are independent with mean zero), so its expected loss is ``L_sym + EE/k``.
* An exactly equivariant model (EGNN) is unchanged, to the float floor.
* A random Conv3d averaged over the 24 cube rotations is exactly cube-equivariant.
* ``grad`` force fields: the forces equal ``−∇`` of the averaged energy (autograd in the test).
"""

from __future__ import annotations

import pytest
import torch

import equiaudit
from equiaudit.errors import ConfigError, ModelOutputError
from equiaudit.rotations import cube_rotations
from equiaudit.zoo.models import egnn_force_field, transformer_force_field
from helpers import LinearMap, conv3d, molecule_clouds, random_matrix

VECTOR = dict(task="custom", fields={"pos": "vector"}, heads={"out": {"rep": "vector", "target": "target"}},
              inputs=["pos"], outputs=["out"])


def _vector_data(n: int = 256, atoms: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, atoms, 3, generator=g, dtype=torch.float64)
    return {"pos": pos, "target": pos.clone()}


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_linear_map_loss_is_l_sym_plus_ee_over_k(k):
    matrix = random_matrix(seed=3, scale=0.5)
    c = torch.trace(matrix) / 3
    frob = (matrix - c * torch.eye(3, dtype=matrix.dtype)).square().sum()
    expected_ratio = float((3 * (c - 1) ** 2 + frob / k) / (3 * (c - 1) ** 2 + frob))

    data = _vector_data()
    raw = LinearMap(matrix).double()
    base = equiaudit.audit(raw, data, rotations=16, seed=0, bootstrap=0, float_floor=False, **VECTOR).total
    sym = equiaudit.Symmetrized(raw, k, seed=1, **VECTOR)
    twirled = equiaudit.audit(sym, data, rotations=16, seed=0, bootstrap=0, float_floor=False, **VECTOR).total
    # The audit's own loss_sym/EE decompose the raw loss the same way (closed form within noise).
    assert twirled.loss_aug / base.loss_aug == pytest.approx(expected_ratio, rel=0.05)
    assert twirled.loss_aug == pytest.approx(base.loss_sym + base.equiv_error / k, rel=0.05)


def test_random_elements_change_per_call_and_fixed_ones_do_not():
    data = _vector_data(8)
    raw = LinearMap(random_matrix(seed=2)).double()
    random_sym = equiaudit.Symmetrized(raw, 4, seed=0, **VECTOR)
    fixed_sym = equiaudit.Symmetrized(raw, 4, seed=0, elements="fixed", **VECTOR)
    assert not torch.allclose(random_sym(data["pos"]), random_sym(data["pos"]))
    assert torch.equal(fixed_sym(data["pos"]), fixed_sym(data["pos"]))
    # A fixed grid is the same rotations for every sample: the wrapper is the linear map
    # M = mean_j R_jᵀ A R_j applied to each row.
    rotations = fixed_sym._draw(1, torch.device("cpu"))[0]
    m = torch.einsum("kji,jl,klm->im", rotations, raw.matrix.detach(), rotations)
    m = m / rotations.shape[0]
    torch.testing.assert_close(fixed_sym(data["pos"]), data["pos"] @ m.T, rtol=1e-12, atol=1e-12)
    # Reproducible: the same seed gives the same sequence of calls.
    again = equiaudit.Symmetrized(raw, 4, seed=0, **VECTOR)
    assert torch.equal(again(data["pos"]), equiaudit.Symmetrized(raw, 4, seed=0, **VECTOR)(data["pos"]))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_an_equivariant_model_is_unchanged(dtype, tol):
    torch.manual_seed(0)
    model = egnn_force_field(hidden=16, layers=2).to(dtype).eval()
    data = molecule_clouds(n=6, atoms=7)
    pos, z, mask = data["pos"].to(dtype), data["z"], data["mask"]
    sym = equiaudit.Symmetrized(model, 8, task="force_field")
    with torch.no_grad():
        plain, averaged = model(pos, z, mask), sym(pos, z, mask)
    for name in ("energy", "forces"):
        scale = plain[name].abs().max()
        assert (averaged[name] - plain[name]).abs().max() <= tol * scale, name


def test_cube_average_of_a_conv_is_exactly_cube_equivariant():
    conv = conv3d(channels=2, seed=4).double()
    g = torch.Generator().manual_seed(0)
    grids = torch.randn(16, 2, 6, 6, 6, generator=g, dtype=torch.float64)
    settings = dict(task="custom", fields={"grid": "voxel"}, heads={"out": {"rep": "voxel", "target": "clean"}},
                    inputs=["grid"], outputs=["out"])
    data = {"grid": grids, "clean": grids.clone()}
    raw = equiaudit.audit(conv, data, group="octahedral", bootstrap=0, **settings).total
    sym = equiaudit.Symmetrized(conv, group="octahedral", **settings)
    assert sym.k == 24
    result = equiaudit.audit(sym, data, group="octahedral", bootstrap=0, **settings).total
    assert raw.rel_equiv_error > 1e-3  # a random kernel is not cube-equivariant
    # At the float floor (the flag column says not_learned first: a random conv has learnt nothing).
    assert result.rel_equiv_error <= 10 * result.float_floor
    # And directly: sym(R·x) = R·sym(x) for every cube rotation R.
    from equiaudit.actions.voxels import rotate_grid

    x = grids[:2]
    rotated_in = rotate_grid(x, cube_rotations().unsqueeze(0).expand(2, 24, 3, 3))  # (2, 24, C, D, H, W)
    out_of_rotated = sym(rotated_in.flatten(0, 1)).reshape(rotated_in.shape)
    rotated_out = rotate_grid(sym(x), cube_rotations().unsqueeze(0).expand(2, 24, 3, 3))
    torch.testing.assert_close(out_of_rotated, rotated_out, rtol=1e-12, atol=1e-12)


def test_grad_force_field_forces_are_those_of_the_averaged_energy():
    torch.manual_seed(1)
    model = transformer_force_field(hidden=16, layers=1, heads=2, grad=True).double().eval()
    data = molecule_clouds(n=3, atoms=6, seed=2)
    pos, z, mask = data["pos"], data["z"], data["mask"]
    sym = equiaudit.Symmetrized(model, 4, task="force_field", grad=True, elements="fixed", seed=5)
    out = sym(pos, z, mask)
    # Independent: −∇ of mean_k E(R_k (x − c(x))) by autograd, with the wrapper's own rotations.
    rotations = sym._draw(len(pos), pos.device)  # (B, K, 3, 3), the same for every sample ("fixed")
    x = pos.clone().requires_grad_(True)
    w = mask.double().unsqueeze(-1)
    centred = (x - (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)) * w
    k = rotations.shape[1]
    rotated = torch.einsum("bkij,baj->bkai", rotations, centred).reshape(len(pos) * k, *pos.shape[1:])
    energy = model(rotated, z.repeat_interleave(k, 0), mask.repeat_interleave(k, 0))["energy"].reshape(len(pos), k).mean(1)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    torch.testing.assert_close(out["energy"], energy.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["forces"], -grad * w, rtol=1e-9, atol=1e-11)


def test_unknown_output_and_bad_mode_are_one_line_errors():
    raw = LinearMap(random_matrix()).double()
    with pytest.raises(ConfigError, match="elements="):
        equiaudit.Symmetrized(raw, 4, elements="sometimes", **VECTOR)

    class TwoOutputs(torch.nn.Module):
        def forward(self, pos):
            return {"out": pos, "stress": pos.sum(1)}

    sym = equiaudit.Symmetrized(TwoOutputs(), 2, **VECTOR)
    with pytest.raises(ModelOutputError, match="stress"):
        sym(torch.randn(2, 3, 3, dtype=torch.float64))
    named = equiaudit.Symmetrized(TwoOutputs(), 2, reps={"stress": "vector"}, **VECTOR)
    assert set(named(torch.randn(2, 3, 3, dtype=torch.float64))) == {"out", "stress"}

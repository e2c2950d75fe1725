"""The local metric: Lie derivative of g⁻¹·f(g·x) at the identity, against closed forms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from equiaudit.actions.voxels import rotate_grid, voxel_centres
from equiaudit.engine import HeadSpec, OrbitSpec
from equiaudit.local import grid_lie_derivative
from equiaudit.rotations import so3_generators
from helpers import LinearMap, RadialScaling, random_matrix, run_audit, vector_dataset, vector_spec


def local_equivariance(model, data, spec, batch_size=64):
    """The audit's local columns per head (and total), through the plan (--local)."""
    result = run_audit(model, data, spec, k=2, sampling="haar", batch_size=batch_size, local=True)
    return {h.name: {"local_equiv_error": h.local_equiv_error, "rel_local_equiv_error": h.rel_local_equiv_error}
            for h in (result.total, *result.heads.values())}


def _commutator_answer(matrix: torch.Tensor, pos: torch.Tensor) -> tuple[float, float]:
    """Closed form for f(x) = A x: D_j f(x) = (A L_j − L_j A) x; per-scalar mean, and over ‖f‖²."""
    generators = so3_generators()
    commutators = matrix @ generators - generators @ matrix  # (3, 3, 3)
    derivative = torch.einsum("jab,nib->njia", commutators, pos)
    error = derivative.square().sum(1).mean((1, 2)).mean()  # Σ_j, then / (atoms·3), then mean over samples
    scale = (pos @ matrix.T).square().mean((1, 2)).mean()
    return error.item(), (error / scale).item()


@pytest.mark.parametrize("rep", ["vector", "point"])
def test_linear_map_matches_the_commutator_closed_form(rep):
    matrix = random_matrix()
    data = vector_dataset(40, 6)
    pos = data["pos"] - data["pos"].mean(1, keepdim=True) if rep == "point" else data["pos"]  # points are centred
    expected, expected_rel = _commutator_answer(matrix, pos)
    got = local_equivariance(LinearMap(matrix).double(), data, vector_spec(rep), batch_size=16)
    assert got["out"]["local_equiv_error"] == pytest.approx(expected, rel=1e-4)
    assert got["out"]["rel_local_equiv_error"] == pytest.approx(expected_rel, rel=1e-4)
    assert got["total"] == got["out"]


def test_isotropic_map_and_equivariant_model_read_zero():
    data = vector_dataset(20, 5)
    assert local_equivariance(LinearMap(0.7 * torch.eye(3, dtype=torch.float64)).double(), data, vector_spec())["total"]["local_equiv_error"] < 1e-28
    assert local_equivariance(RadialScaling().double(), data, vector_spec("point"))["total"]["local_equiv_error"] < 1e-28


class Swirl(torch.nn.Module):
    """A nonlinear, non-equivariant per-atom map (to check the derivative, not just linear algebra)."""

    def forward(self, pos):
        return torch.stack([torch.sin(pos[..., 1]) * pos[..., 0], pos[..., 2] ** 2, torch.tanh(pos[..., 0] + pos[..., 1])], -1)


def test_derivative_matches_finite_differences_of_the_exponential():
    """The jvp through I + θL equals d/dθ R(θ)ᵀ f(R(θ) x) with R(θ) = exp(θ L_j): conventions and signs."""
    data = vector_dataset(6, 4)
    x = data["pos"]
    h = 1e-5
    total = 0.0
    for generator in so3_generators():
        plus, minus = torch.linalg.matrix_exp(h * generator), torch.linalg.matrix_exp(-h * generator)
        orbit = lambda r: Swirl()(x @ r.T) @ r  # R⁻¹ f(R x) on row vectors
        derivative = (orbit(plus) - orbit(minus)) / (2 * h)
        total += derivative.square().mean((1, 2)).mean().item()
    got = local_equivariance(Swirl(), data, vector_spec())["total"]["local_equiv_error"]
    assert got == pytest.approx(total, rel=1e-6)


class GradientForces(torch.nn.Module):
    """Forces = −dE/dpos by autograd inside the model (``model.grad: true``)."""

    def __init__(self, invariant: bool):
        super().__init__()
        self.invariant = invariant
        self.weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))

    def forward(self, pos):
        energy = (pos.square().sum(-1) if self.invariant else (pos.square() * self.weight).sum(-1)).sum(1)
        return energy, -torch.autograd.grad(energy.sum(), pos, create_graph=True)[0]


def test_autograd_forces_models_are_supported():
    data = vector_dataset(10, 4)
    data["energy"] = torch.zeros(10, dtype=torch.float64)
    heads = (HeadSpec("energy", "scalar", "energy"), HeadSpec("forces", "vector", "target"))
    spec = OrbitSpec(fields={"pos": "point"}, heads=heads, inputs=["pos"], outputs=["energy", "forces"], mask=None, grad=True)
    assert local_equivariance(GradientForces(True), data, spec)["total"]["local_equiv_error"] < 1e-26
    assert local_equivariance(GradientForces(False), data, spec)["forces"]["rel_local_equiv_error"] > 0.1


# ------------------------------------------------------------------------------ voxel grids

def _blobs(n: int = 12, channels: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth Gaussian densities (width 1.5 voxels) on an n³ grid: ``(1, C, n, n, n)``."""
    g = torch.Generator().manual_seed(seed)
    r = voxel_centres(n, 1.0)
    centres = torch.randn(channels, 3, 3, generator=g, dtype=torch.float64) * 1.5
    dens = torch.exp(-((r[None, None] - centres[:, :, None, None, None]) ** 2).sum(-1) / (2 * 1.5**2)).sum(1)
    return dens.unsqueeze(0)


def test_grid_tangent_is_the_symmetric_derivative_of_trilinear_resampling():
    grid = _blobs().expand(3, -1, -1, -1, -1)
    generators = so3_generators()
    h = 1e-5
    plus = rotate_grid(grid, torch.linalg.matrix_exp(h * generators)[:, None], method="trilinear")[:, 0]
    minus = rotate_grid(grid, torch.linalg.matrix_exp(-h * generators)[:, None], method="trilinear")[:, 0]
    symmetric = (plus - minus) / (2 * h)
    tangent = -grid_lie_derivative(grid, generators)  # d/dθ F(R_θ⁻¹ r)
    assert ((symmetric - tangent).norm() / tangent.norm()).item() < 1e-4


class Pointwise(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.unused = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, grid):
        return self.fn(grid)


def test_grid_floor_identity_zero_pointwise_small_convolution_large():
    data = {"grid": _blobs().expand(3, -1, -1, -1, -1).clone()}
    spec = OrbitSpec(fields={"grid": "voxel"}, heads=(HeadSpec("out", "voxel", "grid"),), inputs=["grid"], outputs=["out"], mask=None)
    identity = local_equivariance(Pointwise(lambda x: x), data, spec)["out"]["rel_local_equiv_error"]
    pointwise = local_equivariance(Pointwise(torch.tanh), data, spec)["out"]["rel_local_equiv_error"]
    torch.manual_seed(0)
    conv = local_equivariance(torch.nn.Conv3d(2, 2, 3, padding=1).double(), data, spec)["out"]["rel_local_equiv_error"]
    assert identity == 0.0
    assert 1e-4 < pointwise < 3e-2  # the central-difference floor (documented in equiaudit.local)
    assert conv > 30 * pointwise


def test_autocast_runs_and_is_coarser_than_float32():
    matrix = random_matrix()
    data = vector_dataset(8, 4)
    spec = vector_spec()
    f32 = local_equivariance(LinearMap(matrix).float(), data, spec)["out"]["local_equiv_error"]
    bf16 = local_equivariance(LinearMap(matrix).float(), data, dataclasses.replace(spec, autocast=torch.bfloat16))["out"]["local_equiv_error"]
    expected, _ = _commutator_answer(matrix, data["pos"])
    assert f32 == pytest.approx(expected, rel=1e-5)
    assert bf16 == pytest.approx(expected, rel=0.05) and bf16 != f32

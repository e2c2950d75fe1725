"""equiaudit.dynamics on known answers.

The linear map ``f(x) = A x`` on vectors, target ``y = x``, MSE over components, with
``s² = mean |x|²``, ``c = tr A / 3`` and ``B = A − cI`` (traceless): the orbit mean is
``c x``, so per sample ``L_sym = (c−1)²|x|²/3`` and ``EE = E_R ‖Rᵀ B R x‖²/3 = ‖B‖²_F |x|²/9``.
Over the data, ``L_sym = (c−1)² s²/3`` and ``EE = ‖B‖²_F s²/9``; as functions of A,

* ``∇_A L_sym = (2s²(c−1)/9) I`` (``∂c/∂A = I/3``) and ``∇_A EE = (2s²/9) B`` (B is the
  orthogonal projection of A on traceless matrices);
* ``Hess L_sym = (2s²/9) · (I/√3)(I/√3)ᵀ`` (rank one) and ``Hess EE = (2s²/9) · Π₀`` with Π₀
  the projection on the 8-dimensional traceless subspace (eigenvalue 2s²/9, multiplicity 8);
* ``⟨∇L_sym, ∇EE⟩ ∝ tr B = 0`` and ``‖∇EE‖/‖∇L_sym‖ = ‖B‖_F / (√3 |c−1|)``.

With the 24 cube rotations (a rotation design exact for the degree-2 averages above) every
identity holds per sample to rounding; with i.i.d. Haar rotations up to rotation noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from equiaudit import actions
from equiaudit import dynamics as dyn
from equiaudit.groups import make_rotation_set
from equiaudit.metrics import elementwise_loss, orbit_terms, reduce_per_sample
from helpers import LinearMap, RadialScaling, random_matrix, run_audit, vector_dataset, vector_spec

# ----------------------------------------------------------------------------- fixtures


def orbit_predictions(model, pos, rotations):
    """``P[b, k] = R[b,k]ᵀ f(R[b,k] x[b])``, differentiable: ``(B, K, A, 3)``."""
    b, k = rotations.shape[:2]
    orbit = actions.rotate("vector", pos, rotations).reshape(b * k, *pos.shape[1:])
    return actions.unrotate("vector", model(orbit).reshape(b, k, *pos.shape[1:]), rotations)


def orbit_objective(model, data, rotation_set, *, seed=0, batch=128, loss="mse"):
    """The objective closure from public pieces: per batch, bias-corrected (L_sym, EE) parts."""
    n = len(data["pos"])
    rotations = rotation_set.sample(n, seed)
    blocks = None if rotation_set.exact else rotation_set.blocks

    def objective():
        for start in range(0, n, batch):
            index = slice(start, start + batch)
            pred = orbit_predictions(model, data["pos"][index], rotations[index])
            yield dyn.orbit_contribution(pred, data["target"][index], loss, n_total=n, exact=rotation_set.exact, blocks=blocks)

    return objective, rotations


def linear_known(matrix, data):
    s2 = data["pos"].square().sum(-1).mean().item()
    c = (torch.trace(matrix) / 3).item()
    b = matrix - c * torch.eye(3, dtype=matrix.dtype)
    return s2, c, b


CUBE = make_rotation_set("octahedral", 24)  # whole group: exact
HAAR32 = make_rotation_set("so3", 32, "haar")


class PointMLP(torch.nn.Module):
    """A small non-equivariant MLP on flattened coordinates."""

    def __init__(self, atoms=3, width=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(atoms * 3, width), torch.nn.Tanh(), torch.nn.Linear(width, atoms * 3)
        ).double()

    def forward(self, pos):
        return self.net(pos.flatten(-2)).reshape(pos.shape)


# ----------------------------------------------------------------------------- adapter


def test_orbit_contribution_sums_to_the_engine_figures():
    data = vector_dataset(40, 4)
    model = LinearMap(random_matrix()).double()
    rs = make_rotation_set("so3", 24)  # quasi: blocks
    objective, rotations = orbit_objective(model, data, rs, batch=16)
    parts = [(s.item(), e.item()) for s, e in objective()]
    result = run_audit(model, data, vector_spec(), k=24, elements=rotations, batch_size=16).total
    assert sum(s for s, _ in parts) == pytest.approx(result.loss_sym, rel=1e-12)
    assert sum(e for _, e in parts) == pytest.approx(result.equiv_error, rel=1e-12)


# ----------------------------------------------------------------------------- gradient split


@pytest.mark.parametrize("method", dyn.GRADIENT_METHODS)
def test_gradient_split_linear_map_exact_group(method):
    matrix = random_matrix()
    data = vector_dataset(64, 4)
    s2, c, b = linear_known(matrix, data)
    model = LinearMap(matrix).double()
    objective, _ = orbit_objective(model, data, CUBE, batch=24)
    split = dyn.gradient_split(objective, list(model.parameters()), method=method)
    eye = torch.eye(3, dtype=torch.float64)
    assert split.loss_sym == pytest.approx((c - 1) ** 2 * s2 / 3, rel=1e-10)
    assert split.equiv_error == pytest.approx(b.square().sum().item() * s2 / 9, rel=1e-10)
    torch.testing.assert_close(split.grad_sym[0], 2 * s2 * (c - 1) / 9 * eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(split.grad_equiv[0], 2 * s2 / 9 * b, rtol=0, atol=1e-12)
    assert abs(split.grad_cosine) < 1e-10
    assert split.grad_norm_ratio == pytest.approx(b.norm().item() / (math.sqrt(3) * abs(c - 1)), rel=1e-10)
    assert split.grad_norm_aug == pytest.approx((split.grad_aug[0]).norm().item(), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_split_linear_map_haar_k32(seed):
    matrix = random_matrix()
    data = vector_dataset(256, 4, seed=seed)
    _, c, b = linear_known(matrix, data)
    model = LinearMap(matrix).double()
    objective, _ = orbit_objective(model, data, HAAR32, seed=seed)
    split = dyn.gradient_split(objective, list(model.parameters()))
    truth = b.norm().item() / (math.sqrt(3) * abs(c - 1))
    assert 0.3 < truth < 3  # both gradients matter
    assert split.grad_norm_ratio == pytest.approx(truth, rel=0.05)
    assert abs(split.grad_cosine) < 0.05
    batched = dyn.gradient_split(objective, list(model.parameters()), method="batched")
    torch.testing.assert_close(batched.grad_equiv[0], split.grad_equiv[0], rtol=1e-12, atol=1e-14)


def test_gradient_split_equivariant_model_reads_at_float_floor():
    data = vector_dataset(64, 6)
    model = RadialScaling().double()
    objective, _ = orbit_objective(model, data, make_rotation_set("so3", 16, "haar"))
    split = dyn.gradient_split(objective, list(model.parameters()))
    assert split.grad_norm_sym > 1e-2
    assert split.grad_norm_equiv < 1e-12 * split.grad_norm_sym


def test_gradient_split_rejects_params_without_grad():
    with pytest.raises(ValueError, match="requires_grad"):
        dyn.gradient_split(lambda: iter(()), [torch.zeros(3)])


# ----------------------------------------------------------------------------- finite differences (MLP)


@pytest.fixture(scope="module")
def mlp_problem():
    model = PointMLP()
    data = vector_dataset(6, 3, seed=3)
    objective, _ = orbit_objective(model, data, make_rotation_set("so3", 4, "haar"), batch=4)  # two batches
    return model, list(model.parameters()), objective


def _values(objective):
    s = e = 0.0
    for part_s, part_e in objective():
        s += part_s.item()
        e += part_e.item()
    return {"sym": s, "equiv": e, "aug": s + e}


def _shifted(params, direction, eps):
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)


def test_gradients_and_hvps_match_central_differences(mlp_problem):
    model, params, objective = mlp_problem
    g = torch.Generator().manual_seed(5)
    v = dyn.random_direction(params, g)
    saved = [p.detach().clone() for p in params]
    split = dyn.gradient_split(objective, params)
    eps = 1e-5
    _shifted(params, v, eps)
    plus = _values(objective)
    plus_grad = dyn.gradient_split(objective, params)
    _shifted(params, v, -2 * eps)
    minus = _values(objective)
    minus_grad = dyn.gradient_split(objective, params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    dot = lambda a, b: sum((x.double() * y.double()).sum() for x, y in zip(a, b)).item()
    for term, grad in (("sym", split.grad_sym), ("equiv", split.grad_equiv), ("aug", split.grad_aug)):
        fd = (plus[term] - minus[term]) / (2 * eps)
        assert dot(grad, v) == pytest.approx(fd, rel=1e-6, abs=1e-10)
    for term, pick in (("sym", lambda s: s.grad_sym), ("equiv", lambda s: s.grad_equiv), ("aug", lambda s: s.grad_aug)):
        hv = dyn.hessian_vector_product(objective, params, v, term)
        fd = [(a - b) / (2 * eps) for a, b in zip(pick(plus_grad), pick(minus_grad))]
        for h, f in zip(hv, fd):
            torch.testing.assert_close(h, f, rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def mlp_dense_hessians(mlp_problem):
    """The reference: n HVPs (checked against finite differences above), one per basis vector."""
    _, params, objective = mlp_problem
    n = sum(p.numel() for p in params)
    basis = torch.eye(n, dtype=torch.float64)
    return {term: dyn._hvp_blocks(objective, params, {term: basis})[term] for term in ("sym", "equiv")}


@pytest.mark.parametrize("batched", [False, True])
def test_lanczos_matches_the_dense_hessian_of_an_mlp(mlp_problem, mlp_dense_hessians, batched):
    _, params, objective = mlp_problem
    dense = mlp_dense_hessians
    found = dyn.hessian_eigen(
        objective, params, 3, tol=1e-10, max_iter=60, generator=torch.Generator().manual_seed(0), batched=batched
    )
    for term, h in dense.items():
        h = 0.5 * (h + h.T)
        truth = torch.linalg.eigvalsh(h).flip(0)[:3]
        result = found[term]
        assert result.converged
        torch.testing.assert_close(result.eigenvalues, truth, rtol=1e-8, atol=1e-10)
        for value, vector in zip(result.eigenvalues, result.eigenvectors):
            u = torch.cat([t.reshape(-1) for t in vector])
            assert u.norm().item() == pytest.approx(1, abs=1e-10)
            torch.testing.assert_close(h @ u, value * u, rtol=0, atol=1e-7 * h.abs().max().item())
        assert result.n_hvp == result.n_iterations * 3
        # The terms share their passes over the data: as many as the slowest term's iterations.
        assert result.n_passes == max(r.n_iterations for r in found.values())


class ForceField(torch.nn.Module):
    """Forces ``= −dE/dpos`` by autograd inside the model (a non-invariant energy)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.v = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))

    def forward(self, pos):
        if not pos.requires_grad:
            pos = pos.requires_grad_(True)
        energy = (torch.tanh(pos @ self.w) @ self.v).sum()
        return -torch.autograd.grad(energy, pos, create_graph=True)[0]


def test_model_with_autograd_inside_matches_central_differences():
    model = ForceField()
    params = list(model.parameters())
    data = vector_dataset(5, 3, seed=4)
    objective, _ = orbit_objective(model, data, make_rotation_set("so3", 4, "haar"), batch=3)
    v = dyn.random_direction(params, torch.Generator().manual_seed(0))
    split = dyn.gradient_split(objective, params)
    hv = dyn.hessian_vector_product(objective, params, v, "equiv")
    eps = 1e-5
    saved = [p.detach().clone() for p in params]
    _shifted(params, v, eps)
    plus, plus_grad = _values(objective), dyn.gradient_split(objective, params).grad_equiv
    _shifted(params, v, -2 * eps)
    minus, minus_grad = _values(objective), dyn.gradient_split(objective, params).grad_equiv
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    dot = lambda a, b: sum((x * y).sum() for x, y in zip(a, b)).item()
    assert dot(split.grad_sym, v) == pytest.approx((plus["sym"] - minus["sym"]) / (2 * eps), rel=1e-6)
    assert dot(split.grad_equiv, v) == pytest.approx((plus["equiv"] - minus["equiv"]) / (2 * eps), rel=1e-6)
    for h, a, b in zip(hv, plus_grad, minus_grad):
        torch.testing.assert_close(h, (a - b) / (2 * eps), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- curvature: linear map


def test_hessian_linear_map_exact_group():
    matrix = random_matrix()
    data = vector_dataset(64, 4)
    s2, _, _ = linear_known(matrix, data)
    model = LinearMap(matrix).double()
    objective, _ = orbit_objective(model, data, CUBE, batch=32)
    found = dyn.hessian_eigen(objective, list(model.parameters()), 3, tol=1e-10)
    top = 2 * s2 / 9
    equiv, sym = found["equiv"], found["sym"]
    assert equiv.converged and sym.converged
    torch.testing.assert_close(equiv.eigenvalues, torch.full((3,), top, dtype=torch.float64), rtol=1e-10, atol=0)
    for vector in equiv.eigenvectors:  # traceless directions
        assert abs(torch.trace(vector[0]).item()) < 1e-10
    assert sym.eigenvalues[0].item() == pytest.approx(top, rel=1e-10)
    assert sym.eigenvalues[1:].abs().max().item() < 1e-10 * top
    direction = sym.eigenvectors[0][0]
    identity = torch.eye(3, dtype=torch.float64) / math.sqrt(3)
    assert abs((direction * identity).sum().item()) == pytest.approx(1, abs=1e-10)
    value, vector = sym.smallest_positive()  # the zeros are not positive
    assert value == pytest.approx(top, rel=1e-10) and vector is sym.eigenvectors[0]
    assert sym.condition_proxy() == pytest.approx(1, rel=1e-9)
    assert equiv.condition_proxy() == pytest.approx(1, rel=1e-9)


def test_hessian_linear_map_haar_k32():
    matrix = random_matrix()
    data = vector_dataset(256, 4)
    s2, _, _ = linear_known(matrix, data)
    model = LinearMap(matrix).double()
    objective, _ = orbit_objective(model, data, HAAR32)
    found = dyn.hessian_eigen(objective, list(model.parameters()), 3, tol=1e-8)
    top = 2 * s2 / 9
    torch.testing.assert_close(found["equiv"].eigenvalues, torch.full((3,), top, dtype=torch.float64), rtol=0.05, atol=0)
    assert found["sym"].eigenvalues[0].item() == pytest.approx(top, rel=0.02)
    direction = found["sym"].eigenvectors[0][0]
    assert abs((direction * torch.eye(3, dtype=torch.float64)).sum().item()) / math.sqrt(3) > 0.999


def test_block_lanczos_finds_repeated_eigenvalues_and_exhausts_small_spaces():
    g = torch.Generator().manual_seed(1)
    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.full((3,), 5.0), torch.tensor([4.0, 2.5]), torch.linspace(-3, 1, n - 5)]).double()
    h = q @ torch.diag(spectrum) @ q.T
    result = dyn.block_lanczos(lambda v: v @ h, n, 4, tol=1e-10, max_iter=40, generator=torch.Generator().manual_seed(0))
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 4.0], dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(result.eigenvectors @ result.eigenvectors.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    # Why the block: single-vector Lanczos sees one copy of a repeated eigenvalue (until
    # rounding, long after the top eigenvalues look converged, lets another in).
    single = dyn.block_lanczos(lambda v: v @ h, n, 4, block_size=1, tol=1e-8, max_iter=20)
    torch.testing.assert_close(single.eigenvalues[:2], torch.tensor([5.0, 4.0], dtype=torch.float64), rtol=1e-9, atol=0)
    # A 5-dimensional space is exhausted: exact, whatever the tolerance.
    small = torch.diag(torch.tensor([3.0, 1.0, 1.0, -2.0, 0.0], dtype=torch.float64))
    exact = dyn.block_lanczos(lambda v: v @ small, 5, 3, tol=0.0, max_iter=100)
    assert exact.converged
    torch.testing.assert_close(exact.eigenvalues, torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- landscape


def quadratic_problem():
    """Two parameter tensors; L_sym and EE exact quadratics with known Hessians."""
    g = torch.Generator().manual_seed(2)
    theta = [torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(), torch.randn(2, 1, generator=g, dtype=torch.float64).requires_grad_()]
    m1, m2 = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    h_sym, h_equiv = m1 @ m1.T, 0.1 * m2 @ m2.T
    g_sym, centre = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)

    def values(flat):
        sym = 0.5 * flat @ h_sym @ flat + g_sym @ flat + 1.0
        d = flat - centre
        return sym, 0.5 * d @ h_equiv @ d

    def objective():
        flat = torch.cat([t.reshape(-1) for t in theta])
        sym, equiv = values(flat)
        yield 0.25 * sym, 0.25 * equiv  # two "batches" summing to the dataset values
        yield 0.75 * sym, 0.75 * equiv

    return theta, objective, values, h_sym, h_equiv


def test_landscape_of_a_quadratic_is_its_closed_form():
    theta, objective, values, h_sym, h_equiv = quadratic_problem()
    g = torch.Generator().manual_seed(3)
    a = dyn.random_direction(theta, g)
    b = dyn.random_direction(theta, g, orthogonal_to=[a])
    saved = [t.detach().clone() for t in theta]
    land = dyn.loss_landscape(objective, theta, a, b, n=7, span=0.5)
    assert all(torch.equal(t, s) for t, s in zip(theta, saved))
    assert land.alpha.shape == (7,) and land.loss_sym.shape == (7, 7)
    flat0, fa, fb = (torch.cat([t.detach().reshape(-1) for t in x]) for x in (theta, a, b))
    assert abs(fa @ fb) < 1e-12 and fa.norm().item() == pytest.approx(1)
    for i in (0, 3, 6):
        for j in (0, 2, 6):
            sym, equiv = values(flat0 + land.alpha[i] * fa + land.beta[j] * fb)
            assert land.loss_sym[i, j].item() == pytest.approx(sym.item(), rel=1e-12)
            assert land.equiv_error[i, j].item() == pytest.approx(equiv.item(), rel=1e-12)
    smooth = dyn.landscape_smoothness(land)
    assert smooth.r2_sym == pytest.approx(1, abs=1e-12) and smooth.r2_equiv == pytest.approx(1, abs=1e-12)
    assert smooth.roughness_sym < 1e-10 and smooth.roughness_equiv < 1e-10
    expected = torch.tensor([[fa @ h_sym @ fa, fa @ h_sym @ fb], [fb @ h_sym @ fa, fb @ h_sym @ fb]])
    torch.testing.assert_close(smooth.curvature_sym, expected.double(), rtol=1e-9, atol=1e-9)


def test_landscape_restores_parameters_after_an_exception():
    theta, objective, _, _, _ = quadratic_problem()
    saved = [t.detach().clone() for t in theta]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        yield from objective()

    a = dyn.random_direction(theta, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="boom"):
        dyn.loss_landscape(failing, theta, a, a, n=3, needs_autograd=False)
    assert all(torch.equal(t, s) for t, s in zip(theta, saved))


def test_linear_map_landscape_along_eigenvectors_is_quadratic_with_their_curvature():
    matrix = random_matrix()
    data = vector_dataset(32, 4)
    model = LinearMap(matrix).double()
    params = list(model.parameters())
    objective, _ = orbit_objective(model, data, CUBE, batch=32)
    found = dyn.hessian_eigen(objective, params, 3, tol=1e-10)
    a = found["sym"].eigenvectors[0]
    b = found["equiv"].smallest_positive()[1]
    land = dyn.loss_landscape(objective, params, a, b, n=5, span=0.3, needs_autograd=False)
    smooth = dyn.landscape_smoothness(land, found)
    assert smooth.r2_sym == pytest.approx(1, abs=1e-10) and smooth.r2_equiv == pytest.approx(1, abs=1e-10)
    top = found["equiv"].eigenvalues[0].item()
    assert smooth.curvature_sym[0, 0].item() == pytest.approx(top, rel=1e-8)  # L_sym curves along I only
    assert abs(smooth.curvature_sym[1, 1].item()) < 1e-8 * top
    assert smooth.curvature_equiv[1, 1].item() == pytest.approx(top, rel=1e-8)
    assert abs(smooth.curvature_equiv[0, 0].item()) < 1e-8 * top
    assert smooth.condition_equiv == pytest.approx(1, rel=1e-8)
    assert torch.equal(params[0].detach(), matrix)


def test_quadratic_fit_of_a_constant_surface_is_nan():
    _, r2 = dyn.quadratic_fit(torch.arange(4.0), torch.arange(4.0), torch.ones(4, 4))
    assert math.isnan(r2)


# ----------------------------------------------------------------------------- weights, correlations


def test_weight_statistics():
    w = torch.tensor([[1.0, -1.0], [3.0, -3.0]])
    stats = dyn.weight_statistics({"w": w, "c": torch.full((5,), 2.0), "z": torch.zeros(3)})
    s = stats["w"]
    assert (s.numel, s.mean, s.variance, s.mean_square, s.normalized_variance) == (4, 0.0, 5.0, 5.0, 1.0)
    assert stats["c"].normalized_variance == 0.0 and math.isnan(stats["z"].normalized_variance)
    shifted = dyn.weight_statistics([("w", 7 * (w + 1))])["w"]  # scale-free, not shift-free
    assert shifted.normalized_variance == pytest.approx(5 / 6)
    assert shifted.variance + shifted.mean**2 == pytest.approx(shifted.mean_square)
    model = torch.nn.Linear(3, 2)
    assert set(dyn.weight_statistics(model.named_parameters())) == {"weight", "bias"}


def test_pearson_and_spearman_on_log_values():
    steps = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    assert dyn.pearson(steps, 3 * steps**-0.5) == pytest.approx(-1)  # a power law is a line in logs
    assert dyn.pearson(steps, steps + 50) < 1 - 1e-3  # not in logs
    # Ties: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): r = 4.5 / √(4.5·5).
    assert dyn.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert dyn.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1)
    # Non-positive and non-finite values are dropped from both; < 3 points left is NaN.
    assert dyn.pearson([1, 2, 0, 4, 8], [2, 4, 5, math.nan, 16]) == pytest.approx(1)
    assert math.isnan(dyn.pearson([1, 2, 0], [1, 2, 3]))
    assert math.isnan(dyn.spearman([1, -2, 3], [1, 2, 3]))
    assert math.isnan(dyn.pearson([1, 1, 1], [1, 2, 3]))
    assert dyn.pearson([1, 2, 3], [3, 1, 2], log=False) == pytest.approx(-0.5)


# ----------------------------------------------------------------------------- test-time twirling


def linear_orbit(n, atoms, rotation_set, seed=0, matrix=None):
    matrix = random_matrix() if matrix is None else matrix
    data = vector_dataset(n, atoms, seed=seed)
    rotations = rotation_set.sample(n, seed + 100)
    with torch.no_grad():
        pred = orbit_predictions(LinearMap(matrix).double(), data["pos"], rotations)
    return matrix, data, pred


def test_twirl_mse_follows_the_identity_and_the_known_answer():
    matrix, data, pred = linear_orbit(512, 4, HAAR32)
    s2, c, b = linear_known(matrix, data)
    tw = dyn.twirled_loss(pred, data["target"], "mse")
    assert tw.ks == (1, 2, 4, 8, 16, 32) and tw.loss_twirled.shape == (512, 6) and tw.method == "formula"
    torch.testing.assert_close(tw.loss_twirled[:, 0], tw.loss_aug, rtol=1e-13, atol=0)
    ks = torch.tensor(tw.ks, dtype=torch.float64)
    torch.testing.assert_close(tw.loss_twirled, tw.loss_sym[:, None] + tw.equiv_error[:, None] / ks, rtol=1e-12, atol=1e-15)
    mean = tw.loss_twirled.mean(0)
    truth = (c - 1) ** 2 * s2 / 3 + b.square().sum().item() * s2 / 9 / ks
    torch.testing.assert_close(mean, truth, rtol=0.02, atol=0)
    assert (mean[-1] - tw.loss_sym.mean()).item() < 0.05 * (mean[0] - mean[-1]).item()  # → L_sym
    share = tw.share_of_equiv_error_removed()
    torch.testing.assert_close(share, 1 - 1 / ks, rtol=1e-10, atol=1e-12)
    assert dyn.smallest_k_removing(tw.ks, share, 0.9) == 16
    assert dyn.smallest_k_removing(tw.ks, share, 0.99) is None


def test_twirl_complete_u_statistic_equals_the_mse_formula():
    _, data, pred = linear_orbit(16, 3, make_rotation_set("so3", 8, "haar"))
    formula = dyn.twirled_loss(pred, data["target"], "mse", ks=range(1, 9))
    ustat = dyn.twirled_loss(pred, data["target"], "mse", ks=range(1, 9), method="ustat", max_subsets=100)
    assert all(ustat.exhaustive) and ustat.n_subsets[3] == 70
    torch.testing.assert_close(ustat.loss_twirled, formula.loss_twirled, rtol=1e-12, atol=1e-14)


def test_twirl_exact_group_with_replacement_equals_the_formula():
    _, data, pred = linear_orbit(8, 3, CUBE)
    formula = dyn.twirled_loss(pred, data["target"], "mse", ks=(1, 2), exact=True)
    tuples = dyn.twirled_loss(pred, data["target"], "mse", ks=(1, 2), exact=True, method="ustat", max_subsets=600)
    assert tuples.exhaustive == (True, True) and tuples.n_subsets == (24, 576)
    torch.testing.assert_close(tuples.loss_twirled, formula.loss_twirled, rtol=1e-12, atol=1e-14)


def test_twirl_l1_u_statistic_ends_and_starts_right_and_decreases():
    _, data, pred = linear_orbit(256, 4, HAAR32)
    tw = dyn.twirled_loss(pred, data["target"], "l1", generator=torch.Generator().manual_seed(0))
    # C(32, 1) = 32 and C(32, 32) = 1 subsets are enumerated; C(32, 2) = 496 > 256 are sampled.
    assert tw.method == "ustat" and tw.exhaustive == (True, False, False, False, False, True)
    assert tw.n_subsets == (32, 256, 256, 256, 256, 1)
    torch.testing.assert_close(tw.loss_twirled[:, 0], tw.loss_aug, rtol=1e-12, atol=0)
    plug_in = reduce_per_sample(elementwise_loss("l1", pred.mean(1), data["target"]))
    torch.testing.assert_close(tw.loss_twirled[:, -1], plug_in, rtol=1e-12, atol=0)
    mean = tw.loss_twirled.mean(0)
    assert (mean[1:] <= mean[:-1] * (1 + 1e-3)).all()  # non-increasing (up to sampling noise)
    assert mean[0] - mean[-1] > 0.1 * mean[0]


def test_twirl_l1_matches_brute_force_monte_carlo():
    n, atoms, k_total, ks = 256, 4, 16, (1, 2, 4, 8, 16)
    matrix = random_matrix()
    _, data, pred = linear_orbit(n, atoms, make_rotation_set("so3", k_total, "haar"), matrix=matrix)
    tw = dyn.twirled_loss(pred, data["target"], "l1", ks=ks, max_subsets=64, generator=torch.Generator().manual_seed(1))
    assert not tw.exhaustive[2]  # C(16, 4) = 1820 > 64: sampled subsets
    model = LinearMap(matrix).double()
    draws = 64
    for col, k in enumerate(ks):
        rotations = make_rotation_set("so3", draws * k, "haar").sample(n, 7 + col)
        with torch.no_grad():
            fresh = orbit_predictions(model, data["pos"], rotations)  # (n, draws·k, A, 3)
        twirled = fresh.reshape(n, draws, k, atoms, 3).mean(2)
        reference = elementwise_loss("l1", twirled, data["target"].unsqueeze(1)).mean((2, 3)).mean(1)  # (n,)
        diff = tw.loss_twirled[:, col] - reference
        se = diff.std() / math.sqrt(n)
        assert abs(diff.mean()) < 4 * se + 1e-12, (k, diff.mean().item(), se.item())


def test_twirl_with_a_mask_and_cross_entropy_and_refusals():
    _, data, pred = linear_orbit(8, 5, make_rotation_set("so3", 6, "haar"))
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[:, 3:] = False
    masked = dyn.twirled_loss(pred, data["target"], "huber", weight=mask, ks=(1, 3, 6))
    cut = dyn.twirled_loss(pred[:, :, :3], data["target"][:, :3], "huber", ks=(1, 3, 6))
    torch.testing.assert_close(masked.loss_twirled, cut.loss_twirled, rtol=1e-12, atol=0)
    logits = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1])
    ce = dyn.twirled_loss(logits, labels, "cross_entropy", ks=(1, 6))
    terms = orbit_terms(logits, labels, "cross_entropy")
    torch.testing.assert_close(ce.loss_twirled[:, 0], terms.loss_aug, rtol=1e-12, atol=0)
    torch.testing.assert_close(ce.loss_twirled[:, 1], elementwise_loss("cross_entropy", logits.mean(1), labels), rtol=1e-12, atol=0)
    quasi = make_rotation_set("so3", 24)
    _, data, pred = linear_orbit(4, 2, quasi)
    with pytest.raises(ValueError, match="i.i.d."):
        dyn.twirled_loss(pred, data["target"], "l1", blocks=quasi.blocks)
    blocked = dyn.twirled_loss(pred, data["target"], "mse", blocks=quasi.blocks)  # the formula is fine
    torch.testing.assert_close(blocked.loss_twirled[:, 0], blocked.loss_aug, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="between 1"):
        dyn.twirled_loss(pred, data["target"], ks=(0, 2))
    with pytest.raises(ValueError, match="mse only"):
        dyn.twirled_loss(pred, data["target"], "l1", method="formula")

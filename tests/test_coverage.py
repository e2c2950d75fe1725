"""Calibration of the REE interval and unbiasedness of the rotation sets, by simulation.

Known answer (DESIGN.md §1): for ``f(x) = A x`` on vectors with target ``y = x``,
``REE = ‖B‖²_F / (‖B‖²_F + 3(c−1)²)``, ``c = tr(A)/3``, ``B = A − cI``, for any data.
Many independent audits ("seeds") are simulated at once: the orbit predictions
``P_k = R_kᵀ A R_k x`` are evaluated with one einsum over ``(seeds·N, K)``, and the
shipped :func:`orbit_terms` and :func:`ratio_interval` (the interval of :func:`summarize`)
turn them into estimates and intervals, batched over seeds.
Per-sample sizes vary (a scale factor U(0, 2) per sample) so that samples weigh unequally
in the ratio of means, and K is small so that the rotation noise is large and skewed.
"""

from __future__ import annotations

import math

import pytest
import torch

from equiaudit.groups import make_rotation_set
from equiaudit.metrics import orbit_terms, ratio_interval, reduce_per_sample, summarize
from helpers import linear_map_ree


def matrix_with_ree(ree: float, seed: int = 3) -> torch.Tensor:
    """``A = cI + B`` (c = 0.8, B traceless) with the given known REE."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(3, 3, generator=g, dtype=torch.float64)
    b = b - torch.trace(b) / 3 * torch.eye(3, dtype=torch.float64)
    c = 0.8
    b = b / b.norm() * math.sqrt(3 * (c - 1) ** 2 * ree / (1 - ree))
    return c * torch.eye(3, dtype=torch.float64) + b


def simulate(matrix, n_seeds, n_samples, n_atoms, rotation_set, seed=0):
    """Per-sample ``(loss_aug, equiv_error)`` of ``n_seeds`` independent audits: ``(S, N)`` each."""
    g = torch.Generator().manual_seed(seed)
    total = n_seeds * n_samples
    scale = 2 * torch.rand(total, 1, 1, generator=g, dtype=torch.float64)
    x = scale * torch.randn(total, n_atoms, 3, generator=g, dtype=torch.float64)
    rotations = rotation_set.sample(total, seed)  # (S·N, K, 3, 3)
    maps = rotations.transpose(-1, -2) @ matrix @ rotations  # P_k = R_kᵀ A R_k x
    pred = torch.einsum("bkij,bnj->bkni", maps, x)
    terms = orbit_terms(pred, x, "mse", exact=rotation_set.exact, blocks=rotation_set.blocks)
    aug = reduce_per_sample(terms.loss_aug).view(n_seeds, n_samples)
    error = reduce_per_sample(terms.equiv_error).view(n_seeds, n_samples)
    return aug, error


def coverage(aug, error, truth, n_bootstrap=1000):
    """Share of the ``S`` audits whose interval holds the truth, and the estimates ``(S,)``.

    All audits at once through :func:`ratio_interval` (what :func:`summarize` calls); the
    first one is checked against :func:`summarize` itself.
    """
    low, high = ratio_interval(aug, error, n_bootstrap=n_bootstrap, generator=torch.Generator().manual_seed(0))
    assert ((low >= 0) & (high <= 1) & (low <= high)).all(), "a share's interval must stay in [0, 1]"
    first = summarize(aug[0], error[0], n_bootstrap=n_bootstrap, generator=torch.Generator().manual_seed(0))
    assert (first.ci_low, first.ci_high) == pytest.approx((low[0].item(), high[0].item()), rel=1e-9)
    covered = ((low <= truth) & (truth <= high)).double().mean().item()
    return covered, error.sum(1) / aug.sum(1)


SCENARIOS = [
    # (REE, N samples, K, sampling): near zero, middling and large REE; tiny N; K = 4 and 8.
    (0.01, 20, 4, "haar"),
    (0.3, 20, 8, "haar"),
    (0.95, 20, 4, "haar"),
    (0.3, 200, 4, "haar"),
    (0.95, 200, 8, "haar"),
    (0.3, 50, 8, "fibonacci"),  # stratified blocks: the bias correction over blocks is exercised
]


@pytest.mark.parametrize("ree,n_samples,k,sampling", SCENARIOS)
def test_interval_covers_the_known_answer(ree, n_samples, k, sampling):
    matrix = matrix_with_ree(ree)
    truth = linear_map_ree(matrix)
    n_seeds = 500
    aug, error = simulate(matrix, n_seeds, n_samples, 1, make_rotation_set("so3", k, sampling), seed=k * n_samples)
    covered, estimates = coverage(aug, error, truth)
    # Near REE 1 the interval is shifted inside [0, 1] (docs/uncertainty.md): conservative there.
    assert 0.88 <= covered <= (0.999 if ree > 0.9 else 0.99), f"coverage {covered:.3f}"
    # The estimate itself is unbiased up to the O(1/N) bias of a ratio: within 4 standard errors.
    assert abs(estimates.mean().item() - truth) < 4 * estimates.std().item() / math.sqrt(n_seeds) + 1e-3 * truth


def test_quasi_set_is_exact_for_the_linear_map():
    """Randomised tetrahedral blocks are a 2-design: each sample's orbit average is exact."""
    matrix = matrix_with_ree(0.3)
    rotation_set = make_rotation_set("so3", 24)
    assert rotation_set.sampling == "quasi" and rotation_set.blocks == 2
    aug, error = simulate(matrix, 1, 64, 3, rotation_set)
    per_sample = error / aug
    assert torch.allclose(per_sample, torch.full_like(per_sample, linear_map_ree(matrix)), atol=1e-12)


@pytest.mark.parametrize("sampling,k", [("fibonacci", 8), ("fibonacci", 16), ("quasi", 24), ("haar", 8)])
def test_blocked_correction_is_unbiased(sampling, k):
    """Per-sample EE averaged over many randomisations equals the truth; the plug-in does not."""
    matrix = matrix_with_ree(0.5)
    truth = linear_map_ree(matrix)
    rotation_set = make_rotation_set("so3", k, sampling)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, dtype=torch.float64, generator=g).expand(20_000, -1, -1)  # one sample, many draws
    rotations = rotation_set.sample(len(x), 1)
    pred = torch.einsum("bkij,bnj->bkni", rotations.transpose(-1, -2) @ matrix @ rotations, x)
    corrected = orbit_terms(pred, x, "mse", blocks=rotation_set.blocks)
    plug_in = orbit_terms(pred, x, "mse", exact=True)
    aug = reduce_per_sample(corrected.loss_aug).mean()
    ree = reduce_per_sample(corrected.equiv_error).mean() / aug
    assert ree.item() == pytest.approx(truth, rel=5e-3)
    if sampling != "quasi":  # the quasi set's plug-in is already exact here (2-design)
        assert reduce_per_sample(plug_in.equiv_error).mean().item() / aug.item() < truth * 0.97


def test_quasi_agrees_with_haar_on_a_nonlinear_model():
    """A model with components beyond degree 2 in R: quasi (blocks) and Haar estimates agree."""

    def predict(rotations, x):
        y = torch.einsum("bkij,bnj->bkni", rotations, x)  # R x
        out = torch.tanh(2 * y) + 0.3 * y * y[..., [1, 2, 0]]  # not equivariant, not polynomial
        return torch.einsum("bkji,bknj->bkni", rotations, out)  # Rᵀ f(R x)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 3, 3, generator=g, dtype=torch.float64)
    results = {}
    for seed, (sampling, k) in enumerate((("quasi", 24), ("haar", 32), ("fibonacci", 32))):
        rotation_set = make_rotation_set("so3", k, sampling)
        terms = orbit_terms(predict(rotation_set.sample(len(x), seed), x), x, "mse", blocks=rotation_set.blocks)
        results[sampling] = summarize(reduce_per_sample(terms.loss_aug), reduce_per_sample(terms.equiv_error), n_bootstrap=500)
    for sampling in ("haar", "fibonacci"):
        a, b = results["quasi"], results[sampling]
        # Same data, independent rotations: the difference is rotation noise only, well inside both intervals.
        assert abs(a.rel_equiv_error - b.rel_equiv_error) < (b.ci_high - b.ci_low) / 2


@pytest.mark.slow
@pytest.mark.parametrize("ree", [0.01, 0.3, 0.95])
@pytest.mark.parametrize("n_samples", [10, 50, 500])
@pytest.mark.parametrize("k,sampling", [(4, "haar"), (8, "haar"), (8, "fibonacci")])
def test_interval_coverage_thorough(ree, n_samples, k, sampling):
    matrix = matrix_with_ree(ree)
    truth = linear_map_ree(matrix)
    aug, error = simulate(matrix, 1000, n_samples, 1, make_rotation_set("so3", k, sampling), seed=7 * n_samples + k)
    covered, _ = coverage(aug, error, truth)
    # ≥ 0.93 at the nominal 0.95 everywhere; near REE 1 the interval kept inside [0, 1] is conservative.
    assert 0.93 <= covered <= (0.999 if ree > 0.9 else 0.98), f"coverage {covered:.3f}"


def test_config_sampling_option():
    from equiaudit.errors import ConfigError
    from equiaudit.io.config import parse_config

    raw = {"model": {"factory": "m:f"}, "data": {"path": "d.npz"}, "group": {"name": "so3", "rotations": 48, "sampling": "quasi"}}
    config = parse_config(raw)
    assert (config.group, config.rotations, config.sampling) == ("so3", 48, "quasi")
    assert parse_config({**raw, "group": {"name": "so3"}}).sampling is None
    with pytest.raises(ConfigError, match="group.sampling"):
        parse_config({**raw, "group": {"name": "so3", "sampling": "sobol"}})

"""The diffusion preset (EDM): prepared fields, per-sample λ(σ) weights, known answers, σ breakdown."""

import math
from pathlib import Path

import pytest
import torch

import equiaudit
from equiaudit.api import settings
from equiaudit.errors import ConfigError
from equiaudit.io.config import read_yaml
from equiaudit.metrics import summarize
from equiaudit.plan import resolve
from equiaudit.tasks.diffusion import edm_weight
from helpers import molecule_clouds

SAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "sample_configs" / "diffusion.yaml"
LEVELS = [0.05, 0.2, 1.0, 5.0]




class Denoiser(torch.nn.Module):
    """``D(x, σ) = x·c(σ)`` with ``c = σ_data²/(σ² + σ_data²)`` (equivariant), plus a constant vector ``bias``."""

    def __init__(self, bias=(0.0, 0.0, 0.0), sigma_data=1.0):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(bias, dtype=torch.float64))
        self.sigma_data = sigma_data

    def forward(self, x_sigma, sigma, z, mask):
        c = self.sigma_data**2 / (sigma.square() + self.sigma_data**2)
        return (x_sigma * c[:, None, None] + self.bias) * mask[..., None]


def _options(k=8, **diffusion):
    return dict(task="diffusion", rotations=k, sampling="haar", seed=0, batch_size=32, bootstrap=100, diffusion=diffusion)


def _plan(dataset, **options):
    return resolve(settings(**options), dataset, device="cpu")


def _closed_form(prepared, bias, sigma_data=1.0):
    """REE of ``Denoiser(bias)``: per sample λ·(L_eq + |b|²/3) and λ·|b|²/3, ratio of sums."""
    mask = prepared["mask"][..., None].double().expand(-1, -1, 3)
    c = sigma_data**2 / (prepared["sigma"].double().square() + sigma_data**2)
    eq = prepared["x_sigma"] * c[:, None, None]
    sym = ((eq - prepared["x1"]) ** 2 * mask).sum((1, 2)) / mask.sum((1, 2))
    ee = torch.tensor(bias).square().sum() / 3
    weight = prepared["loss_weight"]
    return float((weight * ee).sum() / (weight * (sym + ee)).sum()), float((weight * sym).mean())


def test_prepared_fields_are_consistent_and_seeded_per_sample():
    dataset = molecule_clouds(n=2000, atoms=4)
    plan = _plan(dataset, **_options())
    whole = plan.prepare(dataset)
    prepared = whole.data
    mask, x1, noise, sigma = prepared["mask"], prepared["x1"], prepared["noise"], prepared["sigma"]
    valid = mask[..., None].double()
    assert torch.allclose(prepared["x_sigma"], x1 + sigma[:, None, None] * noise)
    for name in ("x1", "noise", "x_sigma"):
        assert prepared[name][~mask].abs().max() == 0  # padded atoms stay at 0
        assert ((prepared[name] * valid).sum(1) / valid.sum(1)).abs().max() < 1e-12  # centred on valid atoms
    assert torch.allclose(prepared["loss_weight"], (sigma**2 + 1) / sigma**2)
    # ln σ ~ N(P_mean, P_std²): moments within 4 standard errors of 2000 draws.
    log_sigma = sigma.log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=4 * 1.2 / 2000**0.5)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=4 * 1.2 / 4000**0.5)
    # ε ~ N(0, I) before centring: each component of a valid atom has variance 1 − 1/A.
    atoms = valid.sum(1, keepdim=True)
    assert ((noise**2 * valid / (1 - 1 / atoms)).sum() / (3 * valid.sum())).item() == pytest.approx(1.0, abs=0.02)
    # Seeded per sample: a batch of samples 100..149 gives the same rows as the whole dataset.
    part = plan.prepare({k: v[100:150] for k, v in dataset.items()}, torch.arange(100, 150))
    assert all(torch.equal(part.data[k], whole.data[k][100:150]) for k in whole.data)
    assert torch.equal(part.elements, whole.elements[100:150])
    # Other EDM parameters.
    other = _plan(dataset, **_options(P_mean=0.5, P_std=0.5, sigma_data=0.5, weighting="edm")).prepare(dataset).data
    assert other["sigma"].log().mean().item() == pytest.approx(0.5, abs=4 * 0.5 / 2000**0.5)
    assert torch.allclose(other["loss_weight"], edm_weight(other["sigma"], 0.5))
    assert torch.equal(other["noise"], noise)  # ε does not depend on the σ distribution
    flat = _plan(dataset, **_options(weighting="none")).prepare(dataset).data
    assert torch.equal(flat["loss_weight"], torch.ones(2000, dtype=torch.float64))


def test_fixed_levels_share_the_noise_of_their_sample():
    dataset = molecule_clouds(n=10)
    plan = _plan(dataset, **_options(sigma=LEVELS))
    whole = plan.prepare(dataset)
    t = len(LEVELS)
    assert len(whole) == 10 * t and whole.data["cluster"].tolist() == [i for i in range(10) for _ in range(t)]
    assert whole.ids.tolist() == [i * t + j for i in range(10) for j in range(t)]
    assert torch.allclose(whole.data["sigma"], torch.tensor(LEVELS, dtype=torch.float64).repeat(10))
    noise = whole.data["noise"].reshape(10, t, 7, 3)
    assert (noise == noise[:, :1]).all()
    drawn = _plan(dataset, **_options()).prepare(dataset)
    assert torch.equal(noise[:, 0], drawn.data["noise"])  # the same ε as with drawn σ
    part = plan.prepare({k: v[3:7] for k, v in dataset.items()}, torch.arange(3, 7))
    rows = slice(3 * t, 7 * t)
    assert all(torch.equal(part.data[k], whole.data[k][rows]) for k in whole.data)
    assert torch.equal(part.elements, whole.elements[rows])


@pytest.mark.parametrize("diffusion", [{}, {"weighting": "none"}, {"sigma": LEVELS}, {"sigma_data": 0.5}])
def test_equivariant_denoiser_reads_at_the_float_floor(diffusion):
    result = equiaudit.audit(Denoiser(sigma_data=diffusion.get("sigma_data", 1.0)), molecule_clouds(), device="cpu",
                             **_options(**diffusion))
    assert result.heads["x1"].loss_aug > 0.01
    # The fixed denoiser is no better than the identity map with σ_data = 0.5 on this data: then
    # not_learned (skill < 0.1) replaces at_float_floor, its REE being at the floor all the same.
    total = result.total
    assert abs(total.rel_equiv_error) < 1e-5 and abs(total.rel_equiv_error) <= 10 * total.float_floor
    assert total.flag == ("not_learned" if total.skill < 0.1 else "at_float_floor")


@pytest.mark.parametrize("diffusion", [{}, {"weighting": "none"}, {"sigma": LEVELS}, {"sigma_data": 0.5, "P_mean": 0.0}])
def test_constant_bias_has_closed_form_ree_with_edm_weights(diffusion):
    """``D = D_eq + b``: per sample EE = λ(σ)·|b|²/3 and L_sym = λ(σ)·L_eq; REE is their ratio of sums."""
    bias = (0.4, -0.3, 0.2)
    sigma_data = diffusion.get("sigma_data", 1.0)
    dataset = molecule_clouds(n=512)
    options = _options(k=16, **diffusion)
    prepared = _plan(dataset, **options).prepare(dataset).data
    result = equiaudit.audit(Denoiser(bias, sigma_data), dataset, device="cpu", **options)
    ree, sym = _closed_form(prepared, bias, sigma_data)
    assert result.total.rel_equiv_error == pytest.approx(ree, rel=0.05)
    # L_sym carries the rotation noise of the cross term 2λ⟨D_eq − x1, R̄ᵀb⟩ (mean 0), which the
    # few samples of smallest σ dominate (λ ≈ 1/σ², σ down to ~0.01): a looser check.
    assert result.total.loss_sym == pytest.approx(sym, rel=0.1)
    if diffusion.get("weighting") != "none":
        # The weights matter: unweighted, the same model has another REE.
        unweighted, _ = _closed_form({**prepared, "loss_weight": torch.ones_like(prepared["loss_weight"])}, bias, sigma_data)
        assert abs(unweighted - ree) > 0.05 * ree


def test_end_to_end_audit_with_a_sigma_breakdown():
    bias = (0.4, -0.3, 0.2)
    dataset = molecule_clouds(n=128)
    options = _options(sigma=LEVELS)
    plan = _plan(dataset, by=["sigma"], **options)
    prepared = plan.prepare(dataset)
    stats = plan.evaluate(Denoiser(bias), prepared)
    result = plan.summarize(stats)
    one_call = equiaudit.audit(Denoiser(bias), dataset, device="cpu", by=["sigma"], **options)
    assert result.total == one_call.total and result.heads == one_call.heads
    rows = [r for r in result.breakdown if r["by"] == "sigma" and r["head"] == "total"]
    assert [r["bin"] for r in rows] == ["0.05", "0.2", "1", "5"]
    assert sum(r["weight"] * r["equiv_error"] for r in rows) == pytest.approx(result.total.equiv_error, rel=1e-12)
    # λ(σ) scales the element terms: the per-atom and per-rotation splits reproduce the weighted totals too.
    for by in ("element", "angle", "n_atoms"):
        split = [r for r in result.breakdown if r["by"] == by and r["head"] == "x1"]
        assert sum(r["weight"] * r["equiv_error"] for r in split) == pytest.approx(result.total.equiv_error, rel=1e-9)
        assert sum(r["weight"] * r["loss_aug"] for r in split) == pytest.approx(result.total.loss_aug, rel=1e-9)
    # Per level: EE = λ(σ)·|b|²/3, largest at the smallest σ (λ ~ 1/σ²).
    ee = sum(b * b for b in bias) / 3
    for row, level in zip(rows, LEVELS):
        assert row["equiv_error"] == pytest.approx(float(edm_weight(torch.tensor(level), 1.0)) * ee, rel=0.05)
    assert result.total.n_samples == 128
    # The interval resamples samples: by hand from the per-sample sums.
    samples = stats.finalized().tables["samples"].columns()
    cluster = samples["cluster"]
    sums = [torch.zeros(128, dtype=torch.float64).index_add_(0, cluster, samples[f"{k}/x1"]) for k in ("loss_aug", "equiv_error")]
    by_hand = summarize(*sums, n_bootstrap=plan.bootstrap, generator=torch.Generator().manual_seed(plan.seed))
    assert result.total.rel_equiv_error_ci_low == pytest.approx(by_hand.ci_low, rel=1e-9)
    assert result.total.rel_equiv_error_ci_high == pytest.approx(by_hand.ci_high, rel=1e-9)
    # Drawn σ: quantile bins.
    drawn = equiaudit.audit(Denoiser(bias), dataset, device="cpu", by=["sigma"], **_options())
    bins = [r["bin"] for r in drawn.breakdown if r["by"] == "sigma" and r["head"] == "total"]
    assert len(bins) == 5 and all(b.startswith("[") for b in bins)


def test_the_metric_stream_equals_the_one_call_audit():
    dataset = molecule_clouds(n=40)
    options = _options(sigma=[0.1, 1.0])
    one_call = equiaudit.audit(Denoiser((0.1, 0.0, 0.0)), dataset, device="cpu", **options)
    metric = equiaudit.EquivarianceMetric(device="cpu", **options)
    for start in range(0, 40, 16):
        metric.update(Denoiser((0.1, 0.0, 0.0)), {k: v[start:start + 16] for k, v in dataset.items()})
    assert metric.compute().total == one_call.total


@pytest.mark.parametrize("diffusion,message", [
    ({"weighting": "karras"}, "diffusion.weighting='karras' is not allowed; allowed: edm, none"),
    ({"sigma": [0.0, 1.0]}, "every level must be > 0"),
    ({"sigma_data": 0}, "diffusion.sigma_data=0 must be a finite number > 0"),
    ({"P_std": -1}, "diffusion.P_std=-1.0 must be ≥ 0"),
    ({"P_mean": math.nan}, "must be a finite number"),
    ({"noise": 1}, "unknown key 'diffusion.noise'"),
])
def test_bad_diffusion_options_are_config_errors(diffusion, message):
    with pytest.raises(ConfigError) as info:
        equiaudit.audit(Denoiser(), molecule_clouds(n=4), device="cpu", **_options(**diffusion))
    assert message in str(info.value)


def test_the_sample_config_is_valid():
    raw = read_yaml(SAMPLE_CONFIG)
    assert raw["task"] == "diffusion"
    options = {k: v for k, v in raw.items() if k not in ("model", "checkpoints", "data")}
    result = equiaudit.audit(Denoiser((0.1, 0.0, 0.0)), molecule_clouds(n=16), device="cpu", config={**options, "bootstrap": 50})
    assert result.heads["x1"].rel_equiv_error > 0 and any(r["by"] == "sigma" for r in result.breakdown)

"""The flow-matching preset: consistent rotation of input and target, and known answers."""

import pytest
import torch

import equiaudit
from equiaudit.api import settings
from equiaudit.breakdown import field_bins
from equiaudit.errors import ConfigError
from equiaudit.metrics import summarize
from equiaudit.plan import resolve
from helpers import molecule_clouds




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
    prepared, _ = _audit(Velocity(), molecule_clouds())
    mask = prepared["mask"]
    x0, x1, t = prepared["x0"], prepared["x1"], prepared["t"]
    assert torch.allclose(prepared["x_t"], (1 - t[:, None, None]) * x0 + t[:, None, None] * x1)
    assert torch.allclose(prepared["velocity"], x1 - x0)
    assert ((0 <= t) & (t <= 1)).all() and t.shape == (64,)
    assert x0[~mask].abs().max() == 0 and x1[~mask].abs().max() == 0
    valid = mask[..., None].double()
    assert ((x0 * valid).sum(1) / valid.sum(1)).abs().max() < 1e-12  # centred on valid atoms
    again, _ = _audit(Velocity(), molecule_clouds())
    assert torch.equal(again["x_t"], prepared["x_t"])  # seeded: identical for every checkpoint


def test_equivariant_velocity_reads_at_float_floor():
    _, summary = _audit(Velocity(), molecule_clouds())
    assert summary["velocity"].loss_aug > 0.1
    assert abs(summary["velocity"].rel_equiv_error) < 1e-5


def test_constant_bias_has_closed_form_ree():
    """``v = v_eq + b``: P(g) = v_eq + Rᵀb, so EE = |b|²/3 per component and L_sym is v_eq's loss."""
    bias = torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64)
    dataset = molecule_clouds(n=512)
    prepared, summary = _audit(Velocity(bias=bias.tolist()), dataset, k=16)
    mask = prepared["mask"][..., None].double().expand(-1, -1, 3)
    v_eq = 0.5 * prepared["x_t"] * (1 + prepared["t"][:, None, None])
    sym_loss = (((v_eq - prepared["velocity"]) ** 2 * mask).sum((1, 2)) / mask.sum((1, 2))).mean()
    ee = bias.square().sum() / 3
    expected = float(ee / (sym_loss + ee))
    assert summary["velocity"].rel_equiv_error == pytest.approx(expected, rel=0.03)
    assert summary["velocity"].loss_sym == pytest.approx(float(sym_loss), rel=0.03)


# ---------------------------------------------------------------------- conventions (flow.time, flow.target)

CONVENTIONS = [(time, target) for time in ("noise_at_0", "noise_at_1") for target in ("velocity", "x1", "x0")]


def _audit_with(model, dataset, k=8, seed=0, **flow):
    options = dict(task="flow_matching", rotations=k, sampling="haar", seed=seed, batch_size=32, bootstrap=100, flow=flow)
    plan = resolve(settings(**options), dataset, device="cpu")
    return plan, plan.prepare(dataset).data, equiaudit.audit(model, dataset, device="cpu", **options)


@pytest.mark.parametrize("time,target", CONVENTIONS)
def test_each_convention_prepares_its_path_and_head(time, target):
    plan, prepared, _ = _audit_with(Velocity(), molecule_clouds(n=16), time=time, target=target)
    x0, x1, s = prepared["x0"], prepared["x1"], prepared["t"][:, None, None]
    if time == "noise_at_0":
        assert torch.allclose(prepared["x_t"], (1 - s) * x0 + s * x1)
        assert torch.allclose(prepared["velocity"], x1 - x0)  # dx_t/dt
    else:
        assert torch.allclose(prepared["x_t"], s * x0 + (1 - s) * x1)
        assert torch.allclose(prepared["velocity"], x0 - x1)
    (head,) = plan.spec.heads
    assert (head.name, head.target, head.rep) == (target, target, "vector" if target == "velocity" else "point")
    # The noise and the time of a sample do not depend on the conventions (common random numbers).
    _, default, _ = _audit_with(Velocity(), molecule_clouds(n=16))
    assert torch.equal(default["x0"], x0) and torch.equal(default["t"], prepared["t"])


@pytest.mark.parametrize("time,target", CONVENTIONS)
def test_each_convention_has_the_known_answers(time, target):
    """Equivariant ``f = a·x_t·(1 + t)`` reads at the floor; ``f + b`` has EE = |b|²/3 per component."""
    _, _, exact = _audit_with(Velocity(), molecule_clouds(), time=time, target=target)
    assert exact[target].loss_aug > 0.1 and abs(exact[target].rel_equiv_error) < 1e-5
    bias = torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64)
    _, prepared, summary = _audit_with(Velocity(bias=bias.tolist()), molecule_clouds(n=512), k=16, time=time, target=target)
    mask = prepared["mask"][..., None].double().expand(-1, -1, 3)
    f_eq = 0.5 * prepared["x_t"] * (1 + prepared["t"][:, None, None])
    sym_loss = (((f_eq - prepared[target]) ** 2 * mask).sum((1, 2)) / mask.sum((1, 2))).mean()
    ee = bias.square().sum() / 3
    assert summary[target].rel_equiv_error == pytest.approx(float(ee / (sym_loss + ee)), rel=0.03)
    assert summary[target].loss_sym == pytest.approx(float(sym_loss), rel=0.03)


def test_default_conventions_are_todays():
    dataset = molecule_clouds(n=32)
    _, explicit, a = _audit_with(Velocity(bias=(0.1, 0.0, 0.0)), dataset, time="noise_at_0", target="velocity", noise_scale=1.0)
    _, default, b = _audit_with(Velocity(bias=(0.1, 0.0, 0.0)), dataset)
    assert default.keys() == explicit.keys() and all(torch.equal(default[k], explicit[k]) for k in default)
    assert "cluster" not in default and a.total == b.total


@pytest.mark.parametrize("flow,message", [
    ({"time": "noise_at_2"}, "flow.time='noise_at_2' is not allowed; allowed: noise_at_0, noise_at_1"),
    ({"target": "score"}, "flow.target='score' is not allowed; allowed: velocity, x1, x0"),
    ({"t": [0.5, 1.5]}, "flow.t=[0.5, 1.5]: every value must be a number in [0, 1]"),
    ({"t": []}, "flow.t=[] must be a non-empty list of numbers"),
    ({"t": [0.5, 0.5]}, "lists a value twice"),
    ({"noise_scale": "big"}, "flow.noise_scale='big' must be a finite number"),
])
def test_bad_flow_options_are_config_errors(flow, message):
    with pytest.raises(ConfigError) as info:
        equiaudit.audit(Velocity(), molecule_clouds(n=4), task="flow_matching", rotations=4, device="cpu", flow=flow)
    assert message in str(info.value)


# ---------------------------------------------------------------------- fixed times (flow.t)

TIMES = [0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99]


class GrowingBias(torch.nn.Module):
    """``v = a·x_t + t·b`` on valid atoms: the non-equivariant part grows with t (EE_t = t²|b|²/3)."""

    def __init__(self, bias=(0.4, -0.3, 0.2), scale=0.5):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(bias, dtype=torch.float64))
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def forward(self, x_t, t, z, mask):
        return (self.scale * x_t + t[:, None, None] * self.bias) * mask[..., None]


def _fixed_plan(dataset, times=TIMES, k=8, **extra):
    options = dict(task="flow_matching", rotations=k, sampling="haar", seed=0, batch_size=40, bootstrap=200,
                   flow={"t": times}, **extra)
    return resolve(settings(**options), dataset, device="cpu"), options


def test_fixed_times_repeat_each_sample_with_its_own_noise():
    dataset = molecule_clouds(n=12)
    plan, _ = _fixed_plan(dataset)
    whole = plan.prepare(dataset)
    t_count = len(TIMES)
    assert len(whole) == 12 * t_count and whole.data["x_t"].shape == (12 * t_count, 7, 3)
    assert whole.ids.tolist() == [i * t_count + j for i in range(12) for j in range(t_count)]
    assert whole.data["cluster"].tolist() == [i for i in range(12) for _ in range(t_count)]
    assert torch.allclose(whole.data["t"], torch.tensor(TIMES, dtype=torch.float64).repeat(12))
    # The T rows of a sample share x0 and x1: the noise of the sample's id (as with random t).
    x0 = whole.data["x0"].reshape(12, t_count, 7, 3)
    assert (x0 == x0[:, :1]).all()
    random_t = resolve(settings(task="flow_matching", rotations=8, sampling="haar", seed=0), dataset, device="cpu").prepare(dataset)
    assert torch.equal(x0[:, 0], random_t.data["x0"])
    assert torch.allclose(whole.data["x_t"], (1 - whole.data["t"][:, None, None]) * whole.data["x0"]
                          + whole.data["t"][:, None, None] * whole.data["x1"])
    # Every row has its own rotations; the batch of samples 5..9 (ids 5..9) gives the whole dataset's rows.
    assert not torch.allclose(whole.elements[0], whole.elements[1])
    part = plan.prepare({k: v[5:10] for k, v in dataset.items()}, torch.arange(5, 10), index=torch.arange(5, 10))
    rows = slice(5 * t_count, 10 * t_count)
    assert torch.equal(part.ids, whole.ids[rows]) and torch.equal(part.elements, whole.elements[rows])
    assert all(torch.equal(part.data[k], whole.data[k][rows]) for k in whole.data)
    assert part.index.tolist() == [i for i in range(5, 10) for _ in range(t_count)]


def _closed_form_per_t(prepared, bias, scale=0.5):
    """Per listed t: (L_sym, EE) of ``GrowingBias`` in closed form (EE = t²|b|²/3 per component)."""
    mask = prepared["mask"][..., None].double().expand(-1, -1, 3)
    sym = (((scale * prepared["x_t"] - prepared["velocity"]) ** 2 * mask).sum((1, 2)) / mask.sum((1, 2)))
    out = {}
    for t in TIMES:
        rows = prepared["t"] == torch.tensor(t, dtype=prepared["t"].dtype)
        out[t] = (sym[rows].mean().item(), t**2 * float(torch.tensor(bias).square().sum()) / 3)
    return out


def test_fixed_times_summary_breakdown_and_growth_with_t():
    bias = (0.4, -0.3, 0.2)
    dataset = molecule_clouds(n=256)
    plan, options = _fixed_plan(dataset, k=16)
    prepared = plan.prepare(dataset)
    stats = plan.evaluate(GrowingBias(bias), prepared)
    result = plan.summarize(stats)
    rows = [r for r in result.breakdown if r["by"] == "t" and r["head"] == "velocity"]
    assert [r["bin"] for r in rows] == ["0", "0.2", "0.4", "0.6", "0.8", "0.9", "0.95", "0.99"]
    assert all(r["n"] == 256 and r["weight"] == pytest.approx(1 / len(TIMES)) for r in rows)
    head = result.heads["velocity"]
    # The summary is the mean over every (sample, t) row; the per-t rows reproduce it.
    samples = stats.finalized().tables["samples"].columns()
    assert head.loss_aug == pytest.approx(samples["loss_aug/velocity"].mean().item(), rel=1e-12)
    assert head.equiv_error == pytest.approx(samples["equiv_error/velocity"].mean().item(), rel=1e-12)
    assert sum(r["weight"] * r["equiv_error"] for r in rows) == pytest.approx(head.equiv_error, rel=1e-12)
    assert sum(r["weight"] * r["loss_aug"] for r in rows) == pytest.approx(head.loss_aug, rel=1e-12)
    assert head.n_samples == 256  # samples, not rows
    # REE grows with t, as the closed form says.
    expected = _closed_form_per_t(prepared.data, bias)
    ree = [r["rel_equiv_error"] for r in rows]
    assert ree == sorted(ree) and ree[0] < 1e-20
    for r, t in zip(rows[1:], TIMES[1:]):
        sym, ee = expected[t]
        assert r["equiv_error"] == pytest.approx(ee, rel=0.05)
        assert r["rel_equiv_error"] == pytest.approx(ee / (sym + ee), rel=0.05)
    # The same through the one-call API.
    assert equiaudit.audit(GrowingBias(bias), dataset, device="cpu", **options).total == result.total


class SampleBias(torch.nn.Module):
    """``v = a·x_t + (z₀/6)·b``: the non-equivariant part is a property of the sample (its first
    atom's type), the same at every t, so the T rows of a sample are strongly correlated."""

    def __init__(self, bias=(0.4, -0.3, 0.2), scale=0.5):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(bias, dtype=torch.float64))
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def forward(self, x_t, t, z, mask):
        return (self.scale * x_t + (z[:, :1, None] / 6) * self.bias) * mask[..., None]


def test_fixed_times_interval_resamples_samples():
    dataset = molecule_clouds(n=128)
    dataset["z"] = torch.randint(1, 10, (128, 1), generator=torch.Generator().manual_seed(1)) * dataset["mask"]
    plan, _ = _fixed_plan(dataset)
    stats = plan.evaluate(SampleBias(), plan.prepare(dataset))
    head = plan.summarize(stats).heads["velocity"]
    samples = stats.finalized().tables["samples"].columns()
    aug, err, cluster = samples["loss_aug/velocity"], samples["equiv_error/velocity"], samples["cluster"]
    # By hand: sum the rows of each sample, then the ordinary interval over samples.
    sums_aug = torch.zeros(128, dtype=torch.float64).index_add_(0, cluster, aug)
    sums_err = torch.zeros(128, dtype=torch.float64).index_add_(0, cluster, err)
    by_hand = summarize(sums_aug, sums_err, n_bootstrap=plan.bootstrap, generator=torch.Generator().manual_seed(plan.seed))
    assert head.rel_equiv_error == pytest.approx(by_hand.rel_equiv_error, rel=1e-12)
    assert head.rel_equiv_error_ci_low == pytest.approx(by_hand.ci_low, rel=1e-9)
    assert head.rel_equiv_error_ci_high == pytest.approx(by_hand.ci_high, rel=1e-9)
    # Treating the 8 correlated rows of a sample as independent samples would understate the
    # interval. (Not a law: where the rows of a sample differ mostly by design — EE growing
    # with t — the cluster interval is the narrower one, and still the right one, because the
    # listed times are the same in every cluster.)
    rows = summarize(aug, err, n_bootstrap=plan.bootstrap, generator=torch.Generator().manual_seed(plan.seed))
    assert rows.rel_equiv_error == pytest.approx(head.rel_equiv_error, rel=1e-12)
    assert head.rel_equiv_error_ci_high - head.rel_equiv_error_ci_low >= rows.ci_high - rows.ci_low
    # --target-ci stops on that same interval (one head: the total is the head), counted in samples.
    total = plan.summarize(stats).total
    assert plan.total_interval(stats) == pytest.approx((total.rel_equiv_error_ci_low, total.rel_equiv_error_ci_high), rel=1e-12)
    assert plan.total_interval(stats, min_samples=129) is None and plan.total_interval(stats, min_samples=128) is not None


def test_fixed_times_in_the_metric_stream_equal_the_one_call_audit():
    dataset = molecule_clouds(n=40)
    _, options = _fixed_plan(dataset, times=[0.1, 0.5, 0.9], by=["n_atoms"])
    one_call = equiaudit.audit(GrowingBias(), dataset, device="cpu", **options)
    metric = equiaudit.EquivarianceMetric(device="cpu", **options)
    for start in range(0, 40, 16):
        metric.update(GrowingBias(), {k: v[start:start + 16] for k, v in dataset.items()})
    streamed = metric.compute()
    assert streamed.total == one_call.total and streamed.heads == one_call.heads
    assert streamed.breakdown == one_call.breakdown
    assert streamed.total.n_samples == 40


def test_field_bins_of_a_fixed_grid_are_exact_values():
    t = torch.tensor(TIMES, dtype=torch.float32).repeat(3)
    ids, names = field_bins(t, 5)
    assert names == {0: "0", 1: "0.2", 2: "0.4", 3: "0.6", 4: "0.8", 5: "0.9", 6: "0.95", 7: "0.99"}
    assert ids.tolist() == list(range(8)) * 3
    # Continuous t, even a few samples, keeps its uniform bins.
    ids, names = field_bins(torch.tensor([0.05, 0.15, 0.5, 0.99]), 5)
    assert names[0] == "[0, 0.2)" and ids.tolist() == [0, 0, 2, 4]

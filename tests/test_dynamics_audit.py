"""--dynamics through the audit (API and CLI): known answers of the linear map, the exact
model's floor, twirling, the landscape, dynamics.csv / twirl.csv / correlations and the cache."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import equiaudit
from equiaudit.cli.main import app
from equiaudit import dynamics
from helpers import LinearMap, RadialScaling, random_matrix
from run_helpers import make_run, write_config
from test_api import SETTINGS, vectors

HAAR = {**SETTINGS, "rotations": 32, "sampling": "haar", "float_floor": False}


def known(matrix: torch.Tensor, pos: torch.Tensor) -> dict[str, float]:
    """f(x) = A x, y = x, MSE over components, s² = mean |x|², c = tr A / 3, B = A − cI:
    ∇_A L_sym = (2s²(c−1)/9) I and ∇_A EE = (2s²/9) B, so the ratio is ‖B‖_F / (√3 |c−1|) and
    the cosine 0; the Hessian of EE is (2s²/9) on the 8 traceless directions, that of L_sym
    2s²/9 along I/√3 and 0 elsewhere."""
    c = torch.trace(matrix) / 3
    b = matrix - c * torch.eye(3, dtype=matrix.dtype)
    s2 = pos.square().sum(-1).mean().item()
    return {"ratio": (b.norm() / (math.sqrt(3) * abs(c - 1))).item(), "curvature": 2 * s2 / 9}


def test_linear_map_gradient_split_and_curvature_match_the_closed_forms():
    matrix, data = random_matrix(), vectors(256)
    result = equiaudit.audit(LinearMap(matrix).double(), data, hessian=3, **HAAR)
    total = result.dynamics[0]
    assert total["head"] == "total"
    answer = known(matrix, data["pos"])
    assert total["grad_norm_ratio"] == pytest.approx(answer["ratio"], rel=0.05)
    assert abs(total["grad_cosine"]) < 0.05
    for name in ("hessian_top_equiv", "hessian_equiv_2", "hessian_equiv_3"):  # multiplicity 8
        assert total[name] == pytest.approx(answer["curvature"], rel=0.05), name
    assert total["hessian_top_sym"] == pytest.approx(answer["curvature"], rel=0.05)
    assert abs(total["hessian_sym_2"]) < 0.01 * answer["curvature"]  # one direction only
    assert total["rel_equiv_error"] == pytest.approx(result.total.rel_equiv_error, rel=1e-9)  # the same objective


def test_an_exactly_equivariant_model_has_no_equivariance_gradient():
    fields = {"fields": {"pos": "point"}, "heads": {"out": {"rep": "point", "target": "y"}}}
    total = equiaudit.audit(RadialScaling().double(), vectors(64), dynamics=True, **{**HAAR, **fields}).dynamics[0]
    assert total["grad_norm_sym"] > 1e-3
    assert total["grad_norm_equiv"] < 1e-12 * total["grad_norm_sym"]


def test_twirling_follows_l_sym_plus_ee_over_k():
    result = equiaudit.audit(LinearMap(random_matrix()).double(), vectors(128), dynamics=True, **HAAR)
    rows = [r for r in result.twirl if r["head"] == "total"]
    assert [r["k"] for r in rows] == [1, 2, 4, 8, 16, 32]
    t = result.total
    assert rows[0]["loss_twirled"] == pytest.approx(t.loss_aug, rel=1e-12)  # k = 1 is L_aug
    for r in rows:
        assert r["loss_twirled"] == pytest.approx(t.loss_sym + t.equiv_error / r["k"], rel=1e-9)
        assert r["share_of_equiv_error_removed"] == pytest.approx(1 - 1 / r["k"], abs=1e-9)
    assert rows[0]["smallest_k"] == 16 and rows[0]["twirl_target"] == 0.9  # 1 − 1/k ≥ 0.9 first at k = 16 (of 1, 2, 4, …)


@pytest.mark.parametrize("target, k", [(0.45, 2), (0.7, 4), (0.95, 32), (0.99, None)])
def test_twirl_target_names_the_smallest_k_removing_that_share(target, k):
    """For MSE the k-average removes 1 − 1/k of EE exactly: the first k (of 1, 2, 4, …, 32) with 1 − 1/k ≥ target."""
    result = equiaudit.audit(LinearMap(random_matrix()).double(), vectors(64), dynamics={"twirl_target": target}, **HAAR)
    rows = [r for r in result.twirl if r["head"] == "total"]
    assert {r["smallest_k"] for r in rows} == {k} and {r["twirl_target"] for r in rows} == {target}


def test_twirl_target_out_of_range_is_refused():
    with pytest.raises(equiaudit.ConfigError, match="twirl_target"):
        equiaudit.audit(LinearMap(random_matrix()).double(), vectors(8), dynamics={"twirl_target": 1.0}, **HAAR)


def test_the_landscape_of_a_quadratic_problem_is_quadratic_and_parameters_are_restored():
    model = LinearMap(random_matrix()).double()
    before = model.matrix.detach().clone()
    result = equiaudit.audit(model, vectors(64), landscape=True, **{**HAAR, "dynamics": {"grid": 5, "landscape": True}})
    grid = result.landscape
    assert grid["loss_sym"].shape == (5, 5) and grid["directions"][0] == "hessian_top"
    assert grid["r2_sym"] == pytest.approx(1.0, abs=1e-9) and grid["r2_equiv"] == pytest.approx(1.0, abs=1e-9)
    centre = grid["loss_sym"][2, 2] + grid["equiv_error"][2, 2]
    assert centre == pytest.approx(result.total.loss_aug, rel=1e-9)  # the grid's centre is the checkpoint
    assert torch.equal(model.matrix.detach(), before) and model.matrix.grad is None


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_writes_dynamics_twirl_correlations_and_a_landscape_and_caches_them(tmp_path):
    config = write_config(tmp_path, samples=32, rotations=24, bootstrap=20)
    run = make_run(tmp_path, "aug")
    out = tmp_path / "out"
    args = ["audit", str(config), str(run), "--out", str(out), "--dynamics", "--hessian", "2", "--landscape", "1000",
            "--landscape-grid", "5"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    dynamics = _csv(out / "dynamics.csv")
    assert {(r["checkpoint"], r["head"]) for r in dynamics} == {(f"step_{s:06d}.pt", h) for s in (0, 10, 100, 1000, 10000)
                                                              for h in ("total", "out")}
    assert list(dynamics[0])[:8] == ["run", "checkpoint", "step", "head", "grad_norm_sym", "grad_norm_equiv",
                                     "grad_norm_ratio", "grad_cosine"]
    ratios = [float(r["grad_norm_ratio"]) for r in dynamics if r["head"] == "total"]
    assert ratios == sorted(ratios, reverse=True)  # REE falls along the run, and so does the ratio
    correlations = {r["y"]: r for r in _csv(out / "correlations.csv") if r["head"] == "total"}
    assert float(correlations["log grad_norm_ratio"]["spearman"]) == pytest.approx(1.0)
    assert {r["k"] for r in _csv(out / "twirl.csv")} == {"1", "2", "4", "8", "16", "24"}
    meta = json.loads((out / "landscape" / "aug--step_001000.pt.json").read_text())
    assert meta["step"] == 1000 and len(_csv(out / "landscape" / "aug--step_001000.pt.csv")) == 25
    for name in ("dynamics.png", "twirl.png", "report.html", "landscape/aug--step_001000.pt.png"):
        assert (out / name).stat().st_size > 1000, name
    # A rerun reuses everything, dynamics included; no flags: the summary alone is reused too.
    before = (out / "dynamics.csv").read_text()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "5 checkpoint(s) already audited" in again.output
    assert (out / "dynamics.csv").read_text() == before


class GradientForces(torch.nn.Module):
    """E = Σ_a x_aᵀ W x_a with a learned symmetric W (invariant only for W ∝ I); F = −∇E by autograd."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.1], [0.0, 0.1, 1.5]], dtype=torch.float64))

    def forward(self, pos):
        energy = torch.einsum("bai,ij,baj->b", pos, self.w, pos)
        return energy, -torch.autograd.grad(energy.sum(), pos, create_graph=True)[0]


def _separate_split(auditor, model, samples):
    """The split from a pass of its own (plan.objective), as before the audit shared its forward."""
    from equiaudit import dynamics as dyn
    from equiaudit.plan import evaluation_mode

    plan = auditor.plan(model)
    weights = {h.name: h.weight for h in plan.spec.heads}
    with evaluation_mode(model):
        return dyn.gradient_splits(plan.objective(model, auditor.prepared(plan), samples=samples),
                                   list(model.parameters()), weights)


@pytest.mark.parametrize("case", ["linear", "autograd_forces"])
def test_the_split_shared_with_the_audit_forward_equals_a_pass_of_its_own(case, monkeypatch):
    # 100 samples in batches of 32 and a split over the first 50: the cut falls inside batch 1.
    if case == "linear":
        model, data, extra = LinearMap(random_matrix()).double(), vectors(100), {}
    else:
        model, data = GradientForces(), vectors(100)
        data["energy"] = torch.zeros(100, dtype=torch.float64)
        extra = {"fields": {"pos": "point"}, "outputs": ["energy", "forces"], "grad": True,
                 "heads": {"energy": {"rep": "scalar", "target": "energy"}, "forces": {"rep": "vector", "target": "y"}}}
    auditor = equiaudit.Auditor(data, **{**HAAR, **extra, "batch_size": 32, "dynamics": {"samples": 50}})
    with monkeypatch.context() as patch:  # the audit must not make a pass of its own for the split
        patch.setattr(dynamics, "gradient_splits", lambda *a, **k: pytest.fail("a separate gradient pass"))
        shared = {row["head"]: row for row in auditor(model).dynamics}
    separate = _separate_split(auditor, model, 50)
    assert set(shared) == set(separate) and len(shared) > 1
    for head, split in separate.items():
        assert split.grad_norm_equiv > 1e-6  # not trivially zero: the model is not equivariant
        for name in ("grad_norm_sym", "grad_norm_equiv", "grad_norm_ratio", "grad_cosine"):
            assert shared[head][name] == pytest.approx(getattr(split, name), rel=1e-10, abs=1e-14), (head, name)
    assert all(p.grad is None for p in model.parameters())


def test_an_audit_stopped_early_computes_the_split_on_all_its_samples():
    # --target-ci ends the evaluation after a few batches; the split must still cover every sample asked.
    model, data = LinearMap(random_matrix()).double(), vectors(256)
    auditor = equiaudit.Auditor(data, **{**HAAR, "batch_size": 16, "target_ci": 0.5, "dynamics": True})
    result = auditor(model)
    assert result.total.n_samples < 256  # it did stop early
    total = next(row for row in result.dynamics if row["head"] == "total")
    assert total["grad_norm_sym"] == pytest.approx(_separate_split(auditor, model, None)["total"].grad_norm_sym, rel=1e-10)


class GradientForcesProbe(GradientForces):
    """GradientForces recording, per forward, whether any weight required grad; can fail once."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.seen: list[bool] = []
        self.fail = fail

    def forward(self, pos):
        self.seen.append(any(p.requires_grad for p in self.parameters()))
        if self.fail:
            raise ValueError("boom")
        return super().forward(pos)


def test_plain_audit_of_a_grad_model_records_no_graph_to_its_weights():
    # The forces are detached after a plain audit's forward, so the weights are frozen during it
    # (no second-order graph: SevenNet-0 needs 3.7x less memory); the split needs them live.
    data = vectors(40)
    data["energy"] = torch.zeros(40, dtype=torch.float64)
    extra = {"fields": {"pos": "point"}, "outputs": ["energy", "forces"], "grad": True,
             "heads": {"energy": {"rep": "scalar", "target": "energy"}, "forces": {"rep": "vector", "target": "y"}}}
    model = GradientForcesProbe()
    plain = equiaudit.audit(model, data, **{**HAAR, **extra})
    assert model.seen and not any(model.seen) and model.w.requires_grad
    model.seen.clear()
    with_split = equiaudit.audit(model, data, dynamics={"twirl": False}, **{**HAAR, **extra})
    assert all(model.seen) and model.w.requires_grad and model.w.grad is None
    assert with_split.total.rel_equiv_error == pytest.approx(plain.total.rel_equiv_error, rel=1e-12)
    assert next(r for r in with_split.dynamics if r["head"] == "forces")["grad_norm_equiv"] > 1e-6
    failing = GradientForcesProbe(fail=True)  # a forward that raises still gets its weights back
    with pytest.raises(Exception, match="boom"):
        equiaudit.audit(failing, data, **{**HAAR, **extra})
    assert failing.w.requires_grad

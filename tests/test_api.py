"""The Python API: equiaudit.audit and EquivarianceMetric, against known answers and the CLI."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import equiaudit
from equiaudit.cli.main import app
from equiaudit.report.summary import read_rows
from helpers import LinearMap, RadialScaling, linear_map_ree, random_matrix

SETTINGS = dict(task="custom", fields={"pos": "vector"}, heads={"out": {"rep": "vector", "target": "y", "loss": "mse"}},
                inputs=["pos"], outputs=["out"], group="so3", rotations=24, seed=0, device="cpu")


def vectors(n=128, atoms=6, seed=0):
    pos = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, atoms, 3)))
    return {"pos": pos, "y": pos.clone()}


def test_linear_map_known_answer_and_the_float_floor_in_process():
    matrix = random_matrix()
    truth = linear_map_ree(matrix)  # ‖B‖²/(‖B‖² + 3(c−1)²)
    result = equiaudit.audit(LinearMap(matrix).double(), vectors(), samples=128, **SETTINGS)
    assert result.total.rel_equiv_error == pytest.approx(truth, rel=0.02)
    assert result.total.rel_equiv_error_ci_low <= result.total.rel_equiv_error <= result.total.rel_equiv_error_ci_high
    assert result.heads["out"].loss_aug == pytest.approx(result.total.loss_aug)  # one head of weight 1
    assert result.total.loss_aug == pytest.approx(result.total.loss_sym + result.total.equiv_error, rel=1e-12)
    # i.i.d. Haar rotations, not the quasi design that integrates a linear map exactly: still the answer.
    haar = equiaudit.audit(LinearMap(matrix).double(), vectors(512), **{**SETTINGS, "rotations": 32, "sampling": "haar"})
    assert haar.total.rel_equiv_error == pytest.approx(truth, rel=0.03)
    exact = equiaudit.audit(RadialScaling().double(), vectors(), **{**SETTINGS, "fields": {"pos": "point"},
                                                                   "heads": {"out": {"rep": "point", "target": "y"}}})
    assert exact.total.float_floor > 0 and exact.total.rel_equiv_error <= 10 * exact.total.float_floor
    assert exact.total.rel_equiv_error < 1e-25


def test_a_non_equivariant_model_is_caught_and_the_mode_and_weights_are_given_back():
    model = LinearMap(random_matrix()).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = equiaudit.audit(model, vectors(32), **SETTINGS)
    assert result.total.rel_equiv_error > 0.1 and result.total.flag == ""
    assert model.training  # back in the mode it was in
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class Linear(torch.nn.Module):
    """A factory-built LinearMap (float32, as a checkpoint would hold it)."""

    def __init__(self):
        super().__init__()
        self.matrix = torch.nn.Parameter(torch.eye(3))

    def forward(self, pos):
        return pos @ self.matrix.T


def _project(tmp_path: Path):
    data = vectors(40)
    np.savez(tmp_path / "data.npz", pos=data["pos"].numpy(), y=data["y"].numpy())
    model = Linear()
    with torch.no_grad():
        model.matrix.copy_(random_matrix().float())
    (tmp_path / "run").mkdir()
    torch.save(model.state_dict(), tmp_path / "run" / "step_000100.pt")
    (tmp_path / "config.yaml").write_text(textwrap.dedent(f"""\
        task: custom
        model: {{factory: "{__file__}:Linear", inputs: [pos], outputs: [out]}}
        data: {{path: {tmp_path / 'data.npz'}}}
        fields: {{pos: vector}}
        heads: {{out: {{rep: vector, target: y, loss: mse}}}}
        group: {{name: so3, rotations: 24}}
        bootstrap: 200
        seed: 3
        """))
    return model, data


# Identity and timing columns differ by construction (an in-memory model has no file, a
# config hash covers the factory); every figure must be equal, value for value.
IDENTITY = {"run", "checkpoint", "step", "seconds", "config_hash", "epoch", "checkpoint_time", "message", "weights"}


def test_rows_equal_the_summary_csv_the_cli_writes(tmp_path):
    model, data = _project(tmp_path)
    cli = CliRunner().invoke(app, ["audit", str(tmp_path / "config.yaml"), str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                                   "--no-plot", "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    written = read_rows(tmp_path / "out" / "summary.csv")
    result = equiaudit.audit(model, data, config=tmp_path / "config.yaml", device="cpu")
    rows = result.rows()
    assert [r["head"] for r in rows] == [r["head"] for r in written] == ["total", "out"]
    for ours, theirs in zip(rows, written):
        compared = {k for k in theirs if k not in IDENTITY}
        assert {k for k in ours if k not in IDENTITY} == compared
        for key in compared:
            value = ours[key]
            shown = "" if value is None or (isinstance(value, float) and math.isnan(value)) else (repr(value) if isinstance(value, float) else str(value))
            assert shown == theirs[key], key
    # The same with the data as a path, and as an iterable of batches.
    from_file = equiaudit.audit(model, tmp_path / "data.npz", config=tmp_path / "config.yaml", device="cpu")
    batches = [{k: v[i:i + 16] for k, v in data.items()} for i in range(0, 40, 16)]
    from_batches = equiaudit.audit(model, batches, config=tmp_path / "config.yaml", device="cpu")
    assert from_file.total == result.total == from_batches.total


def test_metric_fed_in_four_batches_equals_the_one_call_audit():
    model, data = LinearMap(random_matrix()).double(), vectors(64)
    settings = {k: v for k, v in SETTINGS.items()}
    one_call = equiaudit.audit(model, data, by=["n_atoms"], **settings)
    metric = equiaudit.EquivarianceMetric(by=["n_atoms"], **settings)
    for start in range(0, 64, 16):
        metric.update(model, {k: v[start:start + 16] for k, v in data.items()})
    streamed = metric.compute()
    assert streamed.total == one_call.total and streamed.heads == one_call.heads
    assert streamed.breakdown == one_call.breakdown
    # Out of order, with the ids given: the same samples get the same rotations (common random numbers).
    metric.reset()
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    for part in order.split(10):
        metric.update(model, {k: v[part] for k, v in data.items()}, sample_ids=part)
    assert metric.compute().total == one_call.total
    # A sample id seen twice (a DistributedSampler's padding) counts once.
    metric.update(model, {k: v[:5] for k, v in data.items()}, sample_ids=torch.arange(5))
    assert metric.compute().total == one_call.total


def test_metric_target_ci_stops_where_the_audit_does():
    # The same rule as --target-ci: fed batches of 16, the loop breaks at the batch the audit
    # (batch_size 16) stops at, and compute() then equals that audit.
    model, data = LinearMap(random_matrix()).double(), vectors(512)
    data["y"] = data["y"] + 0.5 * torch.from_numpy(np.random.default_rng(1).normal(size=data["y"].shape))
    width = 0.01
    audited = equiaudit.audit(model, data, target_ci=width, batch_size=16, **SETTINGS)
    assert 48 <= audited.total.n_samples < 512, audited.total.n_samples  # it stopped early, not at the minimum
    metric = equiaudit.EquivarianceMetric(target_ci=width, **SETTINGS)
    assert not metric.target_reached  # nothing seen yet
    fed = 0
    for start in range(0, 512, 16):
        metric.update(model, {k: v[start:start + 16] for k, v in data.items()})
        fed += 16
        if metric.target_reached:
            break
    assert fed == audited.total.n_samples
    unlike = {"config_hash", "seconds"}  # batch_size is one of the audit's settings, not the metric's
    assert [{k: v for k, v in r.items() if k not in unlike} for r in metric.compute().rows()] == \
        [{k: v for k, v in r.items() if k not in unlike} for r in audited.rows()]
    with pytest.raises(equiaudit.ConfigError, match="target_reached needs target_ci"):
        equiaudit.EquivarianceMetric(**SETTINGS).target_reached


def test_target_ci_screen_never_changes_the_decision():
    # target_reached skips the bootstrap while 1.5·se (delta method) exceeds W; the bootstrap-t
    # half-width q·se has q ≈ 1.96+ at 95 %, so on every prefix and width the screened decision
    # must equal the bare rule "half-width of the interval summarize reports <= W".
    from equiaudit.plan import TARGET_MIN_SAMPLES

    model, data = LinearMap(random_matrix()).double(), vectors(256)
    data["y"] = data["y"] + 0.5 * torch.from_numpy(np.random.default_rng(2).normal(size=data["y"].shape))
    auditor = equiaudit.Auditor(data, **SETTINGS)
    plan = auditor.plan(model)
    stats = plan.evaluate(model, auditor.prepared(plan))
    decisions = []
    for n in range(TARGET_MIN_SAMPLES, 257, 8):
        prefix = stats.select_ids(lambda ids: ids < n)
        low, high = plan.total_interval(prefix)
        for width in np.geomspace(0.2, 0.002, 15):
            screened = dataclasses.replace(plan, target_ci=float(width)).target_reached(prefix)
            assert screened == ((high - low) / 2 <= width), (n, width, (high - low) / 2)
            decisions.append(screened)
    assert any(decisions) and not all(decisions)  # both sides of the rule were exercised


def test_metric_under_torch_distributed_gloo_equals_one_process(tmp_path):
    """Two CPU processes, a DistributedSampler-style split: every rank returns the one-process result."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""\
        import os, sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import equiaudit
        from test_api import SETTINGS, vectors
        from helpers import LinearMap, random_matrix
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        model, data = LinearMap(random_matrix()).double(), vectors(50)
        metric = equiaudit.EquivarianceMetric(**SETTINGS)
        mine = torch.arange(rank, 50, world)  # DistributedSampler(shuffle=False) order
        for part in mine.split(7):
            metric.update(model, {{k: v[part] for k, v in data.items()}})
        result = metric.compute()
        torch.save({{"ree": result.total.rel_equiv_error, "low": result.total.rel_equiv_error_ci_low,
                    "n": result.total.n_samples, "floor": result.total.float_floor}}, {str(tmp_path)!r} + f"/rank{{rank}}.pt")
        dist.destroy_process_group()
        """))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    one = equiaudit.audit(LinearMap(random_matrix()).double(), vectors(50), **SETTINGS).total
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["n"] == 50
        assert got["ree"] == pytest.approx(one.rel_equiv_error, rel=1e-12)
        assert got["low"] == pytest.approx(one.rel_equiv_error_ci_low, rel=1e-12)
        assert got["floor"] == pytest.approx(one.float_floor, rel=1e-9)


@pytest.mark.parametrize("keywords, message", [
    ({"rotations": 1}, "config: group.rotations=1 must be an integer ≥ 2"),
    ({"group": "so4"}, "config: group.name='so4' is not allowed"),
    ({"heads": {"out": {"rep": "spinor", "target": "y"}}}, "config: heads.out.rep='spinor' is not allowed"),
    ({"heads": {"out": {"rep": "vector", "target": "nope"}}}, "heads.out.target='nope' is not a field of the data"),
    ({"inputs": ["missing"]}, "model.inputs names 'missing', not a field of the data"),
    ({"rotatoins": 8}, "unknown keyword rotatoins="),
    ({"by": ["forces"]}, "breakdown by 'forces'"),
])
def test_bad_input_raises_the_cli_errors(keywords, message):
    with pytest.raises(equiaudit.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        equiaudit.audit(LinearMap(random_matrix()).double(), vectors(8), **{**SETTINGS, **keywords})


def test_bad_data_through_the_api_is_a_data_error():
    with pytest.raises(equiaudit.DataError, match="data must be a mapping"):
        equiaudit.audit(LinearMap(random_matrix()).double(), 42, **SETTINGS)
    with pytest.raises(equiaudit.DataError, match="'pos' must have shape"):
        equiaudit.audit(LinearMap(random_matrix()).double(), {"pos": torch.zeros(4, 3), "y": torch.zeros(4, 3)}, **SETTINGS)


def test_the_package_exports_and_imports_lazily():
    assert {"audit", "EquivarianceMetric", "AuditResult", "EquiauditError"} <= set(equiaudit.__all__)
    probe = "import sys, equiaudit; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"

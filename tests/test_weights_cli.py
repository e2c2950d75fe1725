"""Which weights, end to end: an EMA sibling per step is one row per step, --weights raw/ema give
the two trajectories, summary.csv says which set each row used, the terminal says what was chosen."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from equiaudit.cli.main import app
from run_helpers import matrix_for, write_config

# Raw iterates are noisier than their average: REE per step (raw, ema), far apart.
STEPS = {100: (0.30, 0.10), 200: (0.20, 0.05), 400: (0.12, 0.02)}


def _lightning(matrix: torch.Tensor, step: int) -> dict:
    return {"state_dict": {"model.matrix": matrix.float()}, "global_step": step, "epoch": 0,
            "pytorch-lightning_version": "2.6.0", "optimizer_states": [], "callbacks": {}}


def nemo_run(root: Path) -> Path:
    """NeMo/Proteina layout: ``epoch=0-step=N.ckpt`` (raw) beside ``epoch=0-step=N-EMA.ckpt`` (EMA)."""
    run = root / "runs" / "nemo" / "checkpoints"
    run.mkdir(parents=True)
    for step, (raw, ema) in STEPS.items():
        torch.save(_lightning(matrix_for(raw), step), run / f"epoch=0-step={step}.ckpt")
        torch.save(_lightning(matrix_for(ema), step), run / f"epoch=0-step={step}-EMA.ckpt")
    return run.parent


def rows(out: Path) -> list[dict]:
    with (out / "summary.csv").open(newline="") as handle:
        return [r for r in csv.DictReader(handle) if r["head"] == "total"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return write_config(root, samples=32, rotations=24, bootstrap=50), nemo_run(root)


@pytest.mark.parametrize("weights, column", [(None, 1), ("ema", 1), ("raw", 0)])
def test_one_row_per_step_and_the_chosen_trajectory(project, tmp_path, weights, column):
    config, run = project
    args = ["audit", str(config), str(run), "--out", str(tmp_path), "--no-plot"] + (["--weights", weights] if weights else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    got = rows(tmp_path)
    assert [int(r["step"]) for r in got] == sorted(STEPS)  # one row per step, in step order
    assert [r["checkpoint"] for r in got] == [f"epoch=0-step={s}.ckpt" for s in sorted(STEPS)]
    expected = "raw" if weights == "raw" else "ema"
    assert {r["weights"] for r in got} == {expected}
    for r in got:  # the known answer of the set that was asked for
        assert float(r["rel_equiv_error"]) == pytest.approx(STEPS[int(r["step"])][column], rel=0.05)
    assert f"weights: {weights or 'auto'}" in result.output
    assert "EMA weights in epoch=0-step=100-EMA.ckpt" in result.output
    meta = json.loads((tmp_path / "run.json").read_text())
    assert {c["weights"] for c in meta["checkpoints"]} == {expected}
    assert all("EMA" in c["weights_source"] or expected == "raw" for c in meta["checkpoints"])


def test_asking_for_ema_where_there_is_none_fails_that_checkpoint_clearly(tmp_path):
    config = write_config(tmp_path, samples=16, rotations=24, bootstrap=20)
    run = tmp_path / "plain"
    run.mkdir()
    torch.save({"matrix": matrix_for(0.1).float()}, run / "step_000010.pt")
    torch.save({"state_dict": {"matrix": matrix_for(0.2).float()}, "state_dict_ema": {"matrix": matrix_for(0.05).float()},
                "step": 20}, run / "step_000020.pt")
    result = CliRunner().invoke(app, ["audit", str(config), str(run), "--out", str(tmp_path / "out"), "--no-plot", "--weights", "ema"])
    assert result.exit_code == 1, result.output
    got = {r["checkpoint"]: r for r in rows(tmp_path / "out")}
    assert got["step_000010.pt"]["status"] == "no_ema" and "no EMA weights found" in got["step_000010.pt"]["message"]
    assert got["step_000020.pt"]["status"] == "ok" and got["step_000020.pt"]["weights"] == "ema"
    assert float(got["step_000020.pt"]["rel_equiv_error"]) == pytest.approx(0.05, rel=0.05)


def test_weights_and_prefix_settings_change_the_cache_key(project, tmp_path):
    config, run = project
    base = ["audit", str(config), str(run), "--out", str(tmp_path), "--no-plot"]
    assert CliRunner().invoke(app, base).exit_code == 0
    second = CliRunner().invoke(app, [*base, "--weights", "raw"])
    assert second.exit_code == 0 and "already audited" not in second.output  # other weights: audited again
    hashes = {r["config_hash"] for r in rows(tmp_path)}
    assert len(hashes) == 2  # both trajectories kept side by side, told apart by their settings

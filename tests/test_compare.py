"""`equiaudit compare`: steps-to-threshold from known REE trajectories, and the pure helpers."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.report.compare import compare_rows, sparkline, trajectories, unique_names
from run_helpers import T0, TRAJECTORIES, make_run, save_checkpoint, write_config

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def totals(path: Path) -> dict[str, dict]:
    return {row["run"]: row for row in read_csv(path) if row["head"] == "total"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two runs with known trajectories, a config, and each run audited into its own output."""
    root = tmp_path_factory.mktemp("compare")
    config = write_config(root)
    runs = {name: make_run(root, name) for name in TRAJECTORIES}
    for name, run_dir in runs.items():
        result = invoke("audit", config, run_dir, "--out", root / f"out_{name}", "--no-plot")
        assert result.exit_code == 0, result.output
    return root, config, runs


# ------------------------------------------------------------------ acceptance: known trajectories

@pytest.mark.parametrize(
    "threshold, expected",
    [(None, {"aug": "1000", "noaug": ""}), ("0.05", {"aug": "100", "noaug": "1000"})],
)
def test_first_step_below_from_audit_outputs(project, tmp_path, threshold, expected):
    root, _, _ = project
    extra = [] if threshold is None else ["--threshold", threshold]
    result = invoke("compare", root / "out_aug", root / "out_noaug", "--out", tmp_path, *extra)
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "compare.csv")
    assert list(rows[0])[:7] == [
        "run", "head", "threshold", "first_step_below", "final_step", "final_rel_equiv_error", "min_rel_equiv_error",
    ]
    assert {(r["run"], r["head"]) for r in rows} == {("aug", "total"), ("aug", "out"), ("noaug", "total"), ("noaug", "out")}
    by_run = totals(tmp_path / "compare.csv")
    assert {run: row["first_step_below"] for run, row in by_run.items()} == expected
    for run, row in by_run.items():
        known = TRAJECTORIES[run]
        assert float(row["threshold"]) == (0.02 if threshold is None else 0.05)
        assert row["final_step"] == str(max(known))
        assert float(row["final_rel_equiv_error"]) == pytest.approx(known[max(known)], rel=0.1)
        assert float(row["min_rel_equiv_error"]) == pytest.approx(min(known.values()), rel=0.1)
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert "≤ threshold at step" in result.output and "noaug" in result.output  # the rich table


def test_compare_audits_run_directories_with_config(project, tmp_path):
    root, config, runs = project
    args = ["compare", runs["aug"], runs["noaug"], "--config", config, "--out", tmp_path]
    first = invoke(*args, "--threshold", "0.05")
    assert first.exit_code == 0, first.output
    assert {r: row["first_step_below"] for r, row in totals(tmp_path / "compare.csv").items()} == {"aug": "100", "noaug": "1000"}
    audits = sorted((tmp_path / "audits").iterdir())
    assert len(audits) == 2 and all((a / "summary.csv").is_file() for a in audits)

    # Same runs again, default threshold: the audits come from the cache.
    before = {a: (a / "summary.csv").read_bytes() for a in audits}
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert "already audited" in second.output
    assert {a: (a / "summary.csv").read_bytes() for a in audits} == before
    assert {r: row["first_step_below"] for r, row in totals(tmp_path / "compare.csv").items()} == {"aug": "1000", "noaug": ""}


def test_compare_time_axis_reports_hours(project, tmp_path):
    root, _, _ = project
    result = invoke("compare", root / "out_aug", root / "out_noaug", "--x", "time", "--out", tmp_path, "--no-plot")
    assert result.exit_code == 0, result.output
    rows = totals(tmp_path / "compare.csv")
    # Checkpoint mtimes are T0 + step seconds; hours count from each run's first checkpoint.
    assert float(rows["aug"]["first_hours_below"]) == pytest.approx(1000 / 3600)
    assert rows["noaug"]["first_hours_below"] == ""


def test_compare_epoch_axis(project, tmp_path):
    root, config, _ = project
    run_dir = root / "runs" / "epochs"
    for epoch, (step, ree) in enumerate(sorted(TRAJECTORIES["aug"].items())):
        save_checkpoint(run_dir, step, ree, epoch=epoch)
    result = invoke("compare", run_dir, "--config", config, "--x", "epoch", "--out", tmp_path, "--no-plot")
    assert result.exit_code == 0, result.output
    row = totals(tmp_path / "compare.csv")["epochs"]
    assert (row["first_step_below"], row["first_epoch_below"]) == ("1000", "3")


def test_colliding_run_names_are_made_unique(project, tmp_path):
    root, _, _ = project
    copy = tmp_path / "again"
    shutil.copytree(root / "out_aug", copy)
    result = invoke("compare", root / "out_aug", copy, "--out", tmp_path / "cmp", "--no-plot")
    assert result.exit_code == 0, result.output
    assert sorted(totals(tmp_path / "cmp" / "compare.csv")) == ["again/aug", "out_aug/aug"]


def test_compare_user_errors_exit_2(project, tmp_path):
    root, _, runs = project
    no_config = invoke("compare", runs["aug"], "--out", tmp_path)
    assert no_config.exit_code == 2 and "--config" in no_config.output
    bad = invoke("compare", root / "out_aug", "--threshold", "2", "--out", tmp_path)
    assert bad.exit_code == 2 and "--threshold" in bad.output
    missing = invoke("compare", tmp_path / "nowhere", "--out", tmp_path)
    assert missing.exit_code == 2 and "nowhere" in missing.output


# ------------------------------------------------------------------ pure helpers

def _rows(run: str, points: dict[int, float | None], status: str = "ok") -> list[dict]:
    return [
        {"run": run, "checkpoint": f"c{step}", "step": str(step), "head": "total", "status": status,
         "rel_equiv_error": "" if ree is None else repr(ree), "checkpoint_time": str(T0 + step)}
        for step, ree in points.items()
    ]


def test_compare_rows_first_final_min_and_stays_below():
    rows = _rows("r", {300: 0.01, 100: 0.5, 200: 0.019, 400: 0.03, 500: 0.015})
    rows += _rows("r", {150: None}, status="corrupt")  # failures take no part
    (row,) = compare_rows(trajectories(rows), threshold=0.02)
    assert row["first_step_below"] == 200
    assert row["first_step_stays_below"] == 500
    assert (row["final_step"], row["final_rel_equiv_error"]) == (500, 0.015)
    assert row["min_rel_equiv_error"] == 0.01
    assert row["n_checkpoints"] == 5
    (never,) = compare_rows(trajectories(_rows("r", {1: 0.5, 2: 0.03})), threshold=0.02)
    assert never["first_step_below"] is None and never["first_step_stays_below"] is None


def test_threshold_is_inclusive_and_last_row_of_a_checkpoint_wins():
    rows = _rows("r", {10: 0.5, 20: 0.02})
    rows.append({**rows[-1], "rel_equiv_error": "0.9"})  # audited again under other settings: newest wins
    (row,) = compare_rows(trajectories(rows), threshold=0.02)
    assert row["first_step_below"] is None
    (row,) = compare_rows(trajectories(rows[:2]), threshold=0.02)
    assert row["first_step_below"] == 20


def test_unique_names():
    assert unique_names([("ckpts", Path("/x/exp_a/ckpts")), ("ckpts", Path("/x/exp_b/ckpts")), ("solo", Path("/y/solo"))]) == [
        "exp_a/ckpts", "exp_b/ckpts", "solo",
    ]
    assert unique_names([("run", Path("/o/out_a")), ("run", Path("/o/out_b"))]) == ["out_a/run", "out_b/run"]
    assert unique_names([("run", Path("/o/run")), ("run", Path("/o/run"))]) == ["o/run", "o/run#2"]


def test_sparkline_is_log_scaled():
    assert sparkline([0.5, 0.05, 0.005, math.nan], 0.005, 0.5) == "█▅▁·"


def test_dip_step_and_the_efficiency_view(project, tmp_path):
    """The dip is the step of the lowest REE; the efficiency view times each run to the lowest
    held-out L_aug that both reach (checkpoint times are T0 + step seconds)."""
    root, _, _ = project
    result = invoke("compare", root / "out_aug", root / "out_noaug", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    for run, row in totals(tmp_path / "compare.csv").items():
        known = TRAJECTORIES[run]
        assert int(row["dip_step"]) == min(known, key=known.get)
    summary = {run: sorted(((int(r["step"]), float(r["loss_aug"])) for r in read_csv(root / f"out_{run}" / "summary.csv")
                           if r["head"] == "total"), key=lambda p: p[0]) for run in TRAJECTORIES}
    target = max(min(loss for _, loss in points) for points in summary.values())
    efficiency = {r["run"]: r for r in read_csv(tmp_path / "efficiency.csv")}
    assert float(efficiency["aug"]["loss_target"]) == pytest.approx(target, rel=1e-12)
    for run, points in summary.items():
        hours = float(efficiency[run]["hours_to_target"])
        # Independently: the loss, interpolated in log between the checkpoints around that time, is the target.
        start = points[0][0]
        for (s0, l0), (s1, l1) in zip(points, points[1:]):
            h0, h1 = (s0 - start) / 3600, (s1 - start) / 3600
            if h0 <= hours <= h1 and l0 > target >= l1:
                f = (hours - h0) / (h1 - h0)
                assert math.exp(math.log(l0) + f * (math.log(l1) - math.log(l0))) == pytest.approx(target, rel=1e-9)
                break
        else:
            assert any(loss == target and (s - start) / 3600 == pytest.approx(hours) for s, loss in points), run
    speedups = {run: float(r["speedup_needed"]) for run, r in efficiency.items()}
    assert min(speedups.values()) == pytest.approx(1.0)
    slow, fast = max(speedups, key=speedups.get), min(speedups, key=speedups.get)
    assert speedups[slow] == pytest.approx(float(efficiency[slow]["hours_to_target"]) / float(efficiency[fast]["hours_to_target"]))
    assert (tmp_path / "efficiency.png").stat().st_size > 10_000 and "speed-up needed" in result.output
    assert (tmp_path / "report.html").is_file()

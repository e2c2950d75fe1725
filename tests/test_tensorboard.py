"""``equiaudit audit ... --tensorboard DIR``: scalars read back equal summary.csv, at the checkpoints' steps."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from equiaudit.cli.main import app
from run_helpers import TRAJECTORIES, make_run, write_config
from train_helpers import read_csv_rows

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

NAMES = ("rel_equiv_error", "loss_aug", "loss_sym", "skill")


def read_scalars(folder) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def audit(*args: str):
    return CliRunner().invoke(app, ["audit", *args, "--no-plot"])


def expected(summary, run: str | None = None) -> dict[str, dict[int, float]]:
    """The summary.csv values as TensorBoard stores them (float32), by tag and step."""
    out: dict[str, dict[int, float]] = {}
    for row in read_csv_rows(summary):
        if run is not None and row["run"] != run:
            continue
        base = "equiaudit" if row["head"] == "total" else f"equiaudit/{row['head']}"
        for name in NAMES:
            out.setdefault(f"{base}/{name}", {})[int(row["step"])] = float(np.float32(float(row[name])))
    return out


def test_scalars_equal_summary_at_the_steps_cached_ones_included(tmp_path):
    config = write_config(tmp_path)
    run = make_run(tmp_path, "aug")
    out, board = tmp_path / "out", tmp_path / "board"
    first = sorted(TRAJECTORIES["aug"])[:3]
    # audit three checkpoints, then all five: the first three come from the cache the second time
    result = audit(str(config), *[str(run / f"step_{s:06d}.pt") for s in first], "--out", str(out))
    assert result.exit_code == 0, result.output
    result = audit(str(config), str(run), "--out", str(out), "--tensorboard", str(board))
    assert result.exit_code == 0, result.output
    assert "already audited" in result.output
    scalars = read_scalars(board)
    want = expected(out / "summary.csv")
    assert set(scalars) == {f"equiaudit/{n}" for n in NAMES} | {f"equiaudit/out/{n}" for n in NAMES}
    assert scalars == want
    assert sorted(scalars["equiaudit/rel_equiv_error"]) == sorted(TRAJECTORIES["aug"])
    # the known answer is there too (16 samples, 8 rotations: within a few tens of per cent)
    ree = scalars["equiaudit/rel_equiv_error"]
    assert ree[0] > ree[10] > ree[100] > ree[1000] > ree[10000]
    # again: the earlier event file is replaced, not duplicated
    result = audit(str(config), str(run), "--out", str(out), "--tensorboard", str(board))
    assert result.exit_code == 0, result.output
    assert len(list(board.glob("events.out.tfevents.*"))) == 1
    assert read_scalars(board) == want


def test_several_runs_go_to_one_folder_each(tmp_path):
    config = write_config(tmp_path)
    aug, noaug = make_run(tmp_path, "aug"), make_run(tmp_path, "noaug")
    out, board = tmp_path / "out", tmp_path / "board"
    result = audit(str(config), str(aug), str(noaug), "--out", str(out), "--tensorboard", str(board))
    assert result.exit_code == 0, result.output
    for name in ("aug", "noaug"):
        assert read_scalars(board / name) == expected(out / "summary.csv", run=name)
        assert sorted(read_scalars(board / name)["equiaudit/rel_equiv_error"]) == sorted(TRAJECTORIES[name])


def test_missing_tensorboard_is_a_one_line_config_error_before_the_audit(tmp_path, monkeypatch):
    config = write_config(tmp_path)
    run = make_run(tmp_path, "aug")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    result = audit(str(config), str(run), "--out", str(tmp_path / "out"), "--tensorboard", str(tmp_path / "board"))
    assert result.exit_code == 2
    assert "pip install 'equiaudit[tensorboard]'" in result.output
    assert not (tmp_path / "out" / "summary.csv").exists()

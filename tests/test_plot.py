"""Trajectory plots: the plotted data match summary.csv, the PNG is real, matplotlib stays lazy."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.report.compare import trajectories
from equiaudit.report.plot import save_figure, trajectory_figure
from equiaudit.report.summary import read_rows
from run_helpers import TRAJECTORIES, make_run, write_config


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Both known runs audited into one output directory by the CLI (which also plots)."""
    root = tmp_path_factory.mktemp("plot")
    config = write_config(root)
    runs = [make_run(root, name) for name in TRAJECTORIES]
    result = CliRunner().invoke(app, ["audit", str(config), *map(str, runs), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root / "out"


def csv_series(summary, run: str, head: str = "total") -> dict[str, np.ndarray]:
    """The columns of one run's head, straight from the CSV (step 0 included: a symlog axis)."""
    with open(summary, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["run"] == run and r["head"] == head]
    rows.sort(key=lambda r: int(r["step"]))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("step", "rel_equiv_error", "loss_aug", "loss_sym", "equiv_error")}


def test_plotted_data_match_the_csv(audited):
    summary = audited / "summary.csv"
    fig = trajectory_figure(trajectories(read_rows(summary)), threshold=0.02, title="custom · so3")
    ree_ax, loss_ax = fig.axes
    for run in TRAJECTORIES:
        expected = csv_series(summary, run)
        (line,) = [ln for ln in ree_ax.get_lines() if ln.get_label() == run]
        np.testing.assert_array_equal(line.get_xdata(), expected["step"])
        np.testing.assert_allclose(line.get_ydata(), 100 * expected["rel_equiv_error"], rtol=1e-12)
        for suffix, column in ((": L_aug", "loss_aug"), (": L_sym", "loss_sym"), (": EE = L_aug − L_sym", "equiv_error")):
            (line,) = [ln for ln in loss_ax.get_lines() if ln.get_label() == run + suffix]
            np.testing.assert_array_equal(line.get_xdata(), expected["step"])
            np.testing.assert_allclose(line.get_ydata(), expected[column], rtol=1e-12)
    (threshold,) = [ln for ln in ree_ax.get_lines() if ln.get_label().startswith("threshold")]
    assert set(threshold.get_ydata()) == {2.0}
    # Readable at a glance: log y, step 0 on a symlog x, labelled axes with units, legend, title.
    assert 0 in csv_series(summary, "aug")["step"]
    for ax in (ree_ax, loss_ax):
        assert (ax.get_xscale(), ax.get_yscale()) == ("symlog", "log")
        assert ax.get_xlabel().startswith("training step") and ax.get_legend() is not None
    assert "(%)" in ree_ax.get_ylabel()
    assert fig._suptitle.get_text() == "custom · so3"


def test_tick_labels_do_not_pile_up(audited):
    """Minor REE labels are drawn only where the axis spans less than a decade (they overlapped before)."""
    fig = trajectory_figure(trajectories(read_rows(audited / "summary.csv")), threshold=0.02)
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    ree_ax = fig.axes[0]
    labels = [t for t in ree_ax.yaxis.get_ticklabels(which="both") if t.get_text() and t.get_visible()]
    lo, hi = ree_ax.get_ylim()
    inside = [t for t in labels if lo <= t.get_position()[1] <= hi]
    boxes = sorted((t.get_window_extent().y0, t.get_window_extent().y1) for t in inside)
    assert len(boxes) >= 2
    assert all(b0 >= a1 - 1 for (_, a1), (b0, _) in zip(boxes, boxes[1:])), "overlapping tick labels"
    assert all("×" not in t.get_text() and "$" not in t.get_text() for t in inside)  # plain numbers


def test_audit_writes_a_non_trivial_png(audited, tmp_path):
    png = audited / "trajectory.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 800
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    path = save_figure(trajectory_figure([]), tmp_path / "empty.png")  # nothing audited yet: still a figure
    assert path.stat().st_size > 0


def test_cli_help_does_not_import_matplotlib():
    code = "import sys, equiaudit.cli.main; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

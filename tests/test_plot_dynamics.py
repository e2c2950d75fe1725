"""Dynamics, landscape, twirling and per-t figures: the plotted data read back from ``fig.axes``
equal the rows they were drawn from, the PNGs are real, matplotlib stays lazy."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from equiaudit.report.plot import save_figure
from equiaudit.report.plot_dynamics import (
    dynamics_figure, landscape_figure, per_t_figure, select_checkpoints, twirl_figure,
)

STEPS = np.array([0, 10, 100, 1000, 10000])
REE = {"a": np.array([0.6, 0.2, 0.05, 0.01, 0.004]), "b": np.array([0.5, 0.3, 0.1, 0.03, 0.02])}
RATIO = {"a": np.array([0.9, 0.4, 0.15, 0.05, 0.02]), "b": np.array([0.8, 0.5, 0.3, 0.08, 0.09])}
COSINE = {"a": np.array([0.1, 0.3, -0.2, 0.05, 0.0]), "b": np.array([0.4, 0.2, 0.1, -0.1, -0.3])}


def dynamics_rows(*, as_strings: bool = True) -> list[dict]:
    rows = []
    for run in REE:
        for i, step in enumerate(STEPS):
            row = {"run": run, "checkpoint": f"ck{step}.pt", "step": int(step), "head": "total", "grad_norm_sym": 2.0,
                   "grad_norm_equiv": 2.0 * RATIO[run][i], "grad_norm_ratio": RATIO[run][i], "grad_cosine": COSINE[run][i],
                   "rel_equiv_error": REE[run][i]}
            row = {k: float(v) if isinstance(v, float) else v for k, v in row.items()}  # numpy scalars → Python floats
            rows.append({k: (repr(v) if isinstance(v, float) else str(v)) if as_strings else v for k, v in row.items()})
    return rows


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def log_ranks(x):
    return np.argsort(np.argsort(x)).astype(float)  # no ties in these arrays


def test_dynamics_figure_plots_the_rows():
    stale = {**dynamics_rows()[3], "grad_norm_ratio": "123.0", "grad_cosine": "0.99"}  # run a, step 1000, audited earlier
    fig = dynamics_figure([stale, *dynamics_rows()])
    ratio_ax, cos_ax, scatter_ax = fig.axes[:3]
    for run in REE:
        np.testing.assert_array_equal(line(ratio_ax, run).get_xdata(), STEPS)
        np.testing.assert_allclose(line(ratio_ax, run).get_ydata(), RATIO[run], rtol=1e-12)  # the later row wins
        np.testing.assert_allclose(line(cos_ax, run).get_ydata(), COSINE[run], rtol=1e-12)
        (points,) = [c for c in scatter_ax.collections if c.get_label().startswith(f"{run}: ")]
        np.testing.assert_allclose(points.get_offsets(), np.column_stack([100 * REE[run], RATIO[run]]), rtol=1e-12)
        np.testing.assert_array_equal(points.get_array(), STEPS)  # coloured by step
        x, y = np.log(REE[run]), np.log(RATIO[run])
        r = np.corrcoef(x, y)[0, 1]
        rho = np.corrcoef(log_ranks(x), log_ranks(y))[0, 1]
        assert points.get_label() == f"{run}: r = {r:.2f}, ρ = {rho:.2f} (n = 5)"
    # readable at a glance: step 0 on symlog, log ratio, labelled axes with units, legend, colorbar
    for ax in (ratio_ax, cos_ax):
        assert ax.get_xscale() == "symlog" and ax.get_xlabel().startswith("training step")
    assert (ratio_ax.get_yscale(), scatter_ax.get_xscale(), scatter_ax.get_yscale()) == ("log", "log", "log")
    assert "(%)" in scatter_ax.get_xlabel() and "‖∇EE‖" in ratio_ax.get_ylabel() and "cos" in cos_ax.get_ylabel()
    assert cos_ax.get_ylim() == (-1.05, 1.05)
    assert fig.legends and {t.get_text() for t in fig.legends[0].get_texts()} == {c.get_label() for c in scatter_ax.collections}
    assert any(ax.get_ylabel() == "training step" for ax in fig.axes[3:])  # the colorbar


def test_dynamics_figure_drops_what_a_log_axis_cannot_show():
    rows = dynamics_rows(as_strings=False)
    rows[1]["grad_norm_ratio"] = 0.0  # ∇EE = 0: not on a log axis
    rows[2]["rel_equiv_error"] = ""  # REE unknown: out of the scatter only
    rows[3]["grad_norm_ratio"] = math.inf
    fig = dynamics_figure(rows)
    ratio_ax, cos_ax, scatter_ax = fig.axes[:3]
    np.testing.assert_array_equal(line(ratio_ax, "a").get_xdata(), STEPS[[0, 2, 4]])
    np.testing.assert_array_equal(line(cos_ax, "a").get_xdata(), STEPS)
    (points,) = [c for c in scatter_ax.collections if c.get_label().startswith("a: ")]
    np.testing.assert_array_equal(points.get_array(), STEPS[[0, 4]])
    assert points.get_label().endswith("r = n/a, ρ = n/a (n = 2)")  # fewer than 3 points: no correlation


GRID = np.linspace(-1, 1, 7)


def landscape(step: int = 500):
    rows = [{"alpha": a, "beta": b, "loss_sym": 1 + 3 * a * a + 0.5 * b * b, "equiv_error": 0.01 * (1 + a * a + b * b + a * b)}
            for a in GRID for b in GRID]
    meta = {"checkpoint": "ck.pt", "step": step, "directions": ["hessian_top", "hessian_smallest_positive"],
            "eigenvalues": {"hessian_top": 6.0, "hessian_smallest_positive": 1.0}, "r2_sym": 0.99871, "r2_equiv": 0.93, "span": 1.0, "n": 7}
    return [{k: str(v) for k, v in r.items()} for r in rows], meta


def test_landscape_figure_plots_the_grid():
    rows, meta = landscape()
    fig = landscape_figure(rows, meta)
    sym_ax, ee_ax = fig.axes[:2]
    aa, bb = np.meshgrid(GRID, GRID)  # [j, i] at (alpha[i], beta[j])
    for ax, column, expected, r2 in ((sym_ax, "loss_sym", 1 + 3 * aa**2 + 0.5 * bb**2, "0.9987"),
                                     (ee_ax, "equiv_error", 0.01 * (1 + aa**2 + bb**2 + aa * bb), "0.93")):
        (mesh,) = [c for c in ax.collections if c.get_gid() == column]
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected, rtol=1e-12)
        assert (mesh.norm.vmin, mesh.norm.vmax) == pytest.approx((expected.min(), expected.max()))  # own min→max scale
        assert f"R² = {r2}" in ax.get_title()
        assert ax.get_xlabel().startswith("α along hessian top, λ = 6") and ax.get_ylabel().startswith("β along hessian smallest positive, λ = 1")
        centre = line(ax, "checkpoint (α = β = 0)")
        assert (list(centre.get_xdata()), list(centre.get_ydata())) == ([0], [0])
    assert fig._suptitle.get_text() == "ck.pt · step 500"


def test_landscape_figure_without_metadata_or_with_holes():
    rows, _ = landscape()
    fig = landscape_figure(rows[:-1])  # one grid point missing: NaN, not a crash
    (mesh,) = [c for c in fig.axes[0].collections if c.get_gid() == "loss_sym"]
    assert np.isnan(np.asarray(mesh.get_array(), dtype=float).reshape(7, 7)[-1, -1])
    assert "R² = n/a" in fig.axes[0].get_title() and fig.axes[0].get_xlabel().startswith("α along direction 1")


KS = [1, 2, 4, 8, 16, 32]


def twirl_rows(steps) -> list[dict]:
    rows = []
    for step in steps:
        aug, ee = 1.0 + 1 / (step + 1), 0.1 / math.sqrt(step + 1)
        for head in ("total", "forces"):
            for k in KS:
                rows.append({"run": "r", "checkpoint": f"ck{step}.pt", "step": str(step), "head": head, "k": str(k),
                             "loss_twirled": repr(aug - ee + ee / k), "share_of_equiv_error_removed": repr(1 - 1 / k),
                             "loss_aug": repr(aug), "loss_sym": repr(aug - ee), "equiv_error": repr(ee), "smallest_k": "16", "twirl_target": "0.9"})
    return rows


def test_twirl_figure_plots_the_curves():
    steps = [0, 10, 30, 100, 300, 1000, 3000, 10000]
    fig = twirl_figure(twirl_rows(steps), most=4)
    loss_ax, share_ax = fig.axes[:2]
    shown = [steps[i] for i in select_checkpoints(steps, 4)]
    assert shown[0] == 0 and shown[-1] == 10000 and len(shown) == 4
    assert [ln.get_label() for ln in loss_ax.get_lines() if ln.get_linestyle() == "-"] == [f"step {s}" for s in shown]
    for step in shown:
        aug, ee = 1.0 + 1 / (step + 1), 0.1 / math.sqrt(step + 1)
        curve = line(loss_ax, f"step {step}")
        np.testing.assert_array_equal(curve.get_xdata(), KS)
        np.testing.assert_allclose(curve.get_ydata(), [aug - ee + ee / k for k in KS], rtol=1e-12)
        np.testing.assert_allclose(line(loss_ax, f"step {step}: L_aug").get_ydata(), [aug, aug], rtol=1e-12)
        np.testing.assert_allclose(line(loss_ax, f"step {step}: L_sym").get_ydata(), [aug - ee, aug - ee], rtol=1e-12)
        star = line(loss_ax, f"step {step}: smallest k")
        assert list(star.get_xdata()) == [16] and star.get_ydata()[0] == pytest.approx(aug - ee + ee / 16)
        np.testing.assert_allclose(line(share_ax, f"step {step}").get_ydata(), [100 * (1 - 1 / k) for k in KS])
    assert loss_ax.get_xscale() == "log" and loss_ax.get_xlabel().startswith("k ")
    assert "(total)" in loss_ax.get_title()  # the total head by default, not forces
    assert "loss units" in loss_ax.get_ylabel() and "(%)" in share_ax.get_ylabel()
    assert loss_ax.get_legend() is not None and share_ax.get_legend() is not None


def test_select_checkpoints():
    assert select_checkpoints(list(range(3)), 6) == [0, 1, 2]
    assert select_checkpoints(list(range(11)), 3) == [0, 5, 10]
    assert select_checkpoints(list(range(5)), 1) == [4]


def test_per_t_figure_plots_one_line_per_t():
    bins = ["0.99", "0", "0.5", "0.2"]  # ordered by value on the plot
    rows = []
    for i, step in enumerate(STEPS):
        for t in bins:
            rows.append({"run": "fm", "checkpoint": f"ck{step}", "step": str(step), "head": "total", "by": "t", "bin": t,
                         "rel_equiv_error": repr(0.3 / (i + 1) * (1 + float(t)))})
        rows.append({"run": "fm", "checkpoint": f"ck{step}", "step": str(step), "head": "total", "by": "n_atoms", "bin": "13",
                     "rel_equiv_error": "0.5"})
    fig = per_t_figure(rows, threshold=0.02)
    ax = fig.axes[0]
    labels = [ln.get_label() for ln in ax.get_lines() if ln.get_label().startswith("t = ")]
    assert labels == ["t = 0", "t = 0.2", "t = 0.5", "t = 0.99"]  # the n_atoms split is not a line
    for t in bins:
        curve = line(ax, f"t = {t}")
        np.testing.assert_array_equal(curve.get_xdata(), STEPS)
        np.testing.assert_allclose(curve.get_ydata(), [100 * 0.3 / (i + 1) * (1 + float(t)) for i in range(len(STEPS))], rtol=1e-12)
    assert set(line(ax, "threshold 2 %").get_ydata()) == {2.0}
    assert (ax.get_xscale(), ax.get_yscale()) == ("symlog", "log") and "(%)" in ax.get_ylabel()


def test_names_are_drawn_literally(tmp_path):
    """A ``$`` in a run name would start mathtext (and can crash the drawing); it is escaped."""
    rows = [{**r, "run": "$\\frac$ run"} for r in dynamics_rows()]
    fig = dynamics_figure(rows + [{**r, "run": "other"} for r in dynamics_rows()])
    assert line(fig.axes[0], r"\$\frac\$ run").get_xdata().size == 5
    save_figure(fig, tmp_path / "d.png")


def test_pngs_are_real_and_empty_inputs_still_draw(tmp_path):
    import matplotlib.image

    rows, meta = landscape()
    figures = {"dynamics": dynamics_figure(dynamics_rows()), "landscape": landscape_figure(rows, meta),
               "twirl": twirl_figure(twirl_rows([0, 100, 1000])),
               "per_t": per_t_figure([{"run": "r", "checkpoint": "c", "step": "5", "head": "total", "by": "t", "bin": "0.5", "rel_equiv_error": "0.1"}])}
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000, name
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels[..., :3].std() > 0.05, name
    for fig in (dynamics_figure([]), landscape_figure([]), twirl_figure([]), per_t_figure([])):
        assert save_figure(fig, tmp_path / "empty.png").stat().st_size > 0


def test_importing_the_modules_does_not_import_matplotlib():
    code = "import sys, equiaudit.report.plot_dynamics, equiaudit.report.html; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_trajectory_plot_gains_a_per_t_panel_from_the_breakdown(tmp_path, monkeypatch):
    # The folder's breakdown.csv has by = t rows (a flow audited at fixed times): trajectory.png
    # gets a third panel with one line per t per run, the same REE values; without them, two panels.
    import report_fixtures as fx
    from equiaudit.report import plot as plot_module
    from equiaudit.report.products import save_trajectory_plot

    out = fx.make_out(tmp_path, compare=False)
    figures = []
    original = plot_module.trajectory_figure
    monkeypatch.setattr(plot_module, "trajectory_figure", lambda *a, **k: figures.append(original(*a, **k)) or figures[-1])
    assert save_trajectory_plot(out, title=None, threshold=0.02).stat().st_size > 0
    panel = figures[-1].axes[2]
    for i, t in enumerate(fx.T_BINS):
        curve = line(panel, f"{fx.RUN} · t = {t}")  # two runs in the folder: the run prefixes the label
        steps = sorted(fx.REE[fx.RUN])
        np.testing.assert_array_equal(curve.get_xdata(), steps)
        np.testing.assert_allclose(curve.get_ydata(), [100 * fx.REE[fx.RUN][s] * (1 + i) for s in steps], rtol=1e-12)
    (out / "breakdown.csv").unlink()
    save_trajectory_plot(out, title=None, threshold=0.02)
    assert len(figures[-1].axes) == 2

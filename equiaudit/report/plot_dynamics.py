"""PNG figures of the training-dynamics outputs: gradients, landscapes, twirling, REE per t.

What each figure answers at a glance (Shen et al., TMLR 2025: symmetry is learnt fast because
``EE`` is the easy part of ``L_aug = L_sym + EE``):

* :func:`dynamics_figure` (``dynamics.csv``): is ``∇EE`` small next to ``∇L_sym``
  (``grad_norm_ratio`` against step, log–log), do the two gradients point the same way
  (``grad_cosine``), and does REE fall together with the gradient ratio (scatter of REE
  against the ratio on log axes, coloured by step, with Pearson and Spearman of the logs);
* :func:`landscape_figure` (``landscape/<checkpoint>.csv`` + ``.json``): ``L_sym`` and
  ``EE`` over a 2-D slice of parameter space through the checkpoint, along Hessian
  eigen-directions; the quadratic fit's R² in the titles says how bowl-shaped each is;
* :func:`twirl_figure` (``twirl.csv``): the held-out loss of the model averaged over k
  rotations, from ``L_aug`` (k = 1) towards ``L_sym`` (k → ∞), and the smallest k that
  removes 90 % of the equivariance error;
* :func:`per_t_figure` (``breakdown.csv``, ``by = t``): flow matching's REE over training at
  each fixed time t (re-exported from :mod:`equiaudit.report.figures`, the shared helpers).

Rows are CSV rows as read back (strings; empty = missing) or dicts of numbers; for the same
checkpoint seen twice (audited under two settings) the last row wins, as in
:func:`~equiaudit.report.compare.trajectories`. Values that cannot be drawn on a log axis
(non-positive, non-finite) are left out of that panel. Step 0 (an untrained model) is kept:
step axes are then symlog — linear from 0 to the first positive step, log beyond — as in
:mod:`equiaudit.report.plot`. Every line and scatter carries a label naming its run, head
and checkpoint, so tests and callers can read the plotted data back from ``fig.axes``.

matplotlib is imported inside the functions and only through ``matplotlib.figure.Figure``
(no pyplot, no GUI backend, no global state); the correlations import
:mod:`equiaudit.dynamics` (torch) on first use too. Save with
:func:`equiaudit.report.plot.save_figure` (atomic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# The shared helpers live in figures; plot_text, series_label, per_t_figure and draw_per_t are re-exported.
from equiaudit.report.figures import (
    draw_per_t, group_rows, latest_rows, per_t_figure, plain_log_formatter, plain_log_x, plain_log_y, plot_text,
    series_label, step_axis, step_norm, step_value,
)
from equiaudit.result import as_float

__all__ = [
    "dynamics_figure", "landscape_figure", "twirl_figure", "per_t_figure", "draw_per_t", "plot_text", "series_label",
    "select_checkpoints", "landscape_grid",
]

# ----------------------------------------------------------------------------- dynamics


def dynamics_figure(rows: Sequence[Mapping], *, title: str | None = None):
    """Three panels from ``dynamics.csv`` rows, one series per run × head.

    Left: ``grad_norm_ratio = ‖∇EE‖ / ‖∇L_sym‖`` against step (log–log; symlog x with step 0).
    Middle: ``grad_cosine`` against step (linear y in [−1, 1]). Right: REE (%) against the
    gradient ratio on log axes, one marker shape per series, coloured by step (colorbar);
    one legend below the panels names each series (line colour, marker) with Pearson ``r``
    and Spearman ``ρ`` of (log REE, log ratio) over its points
    (:func:`equiaudit.dynamics.pearson`/``spearman``), ``n`` the points; the scatter carries
    the same label. Rows without ``rel_equiv_error`` are left out of the scatter only.
    """
    from matplotlib.figure import Figure

    from equiaudit.dynamics import pearson, spearman

    shown = latest_rows(rows, ("run", "checkpoint", "head"), plotted=True)
    groups = group_rows(shown, ("run", "head"))
    groups = dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "total")))
    runs, heads = len({r for r, _ in groups}), len({h for _, h in groups})
    fig = Figure(figsize=(15, 5.2), layout="constrained")
    ratio_ax, cos_ax, scatter_ax = fig.subplots(1, 3)
    norm = step_norm([step_value(r) for r in shown])
    markers = "osD^vP*Xh<>"
    mappable, handles, labels = None, [], []
    for i, ((run, head), group) in enumerate(groups.items()):
        color, label = f"C{i % 10}", series_label(run, head, runs=runs, heads=heads)
        steps = [step_value(r) for r in group]
        ratio = [as_float(r.get("grad_norm_ratio")) for r in group]
        cosine = [as_float(r.get("grad_cosine")) for r in group]
        ree = [as_float(r.get("rel_equiv_error")) for r in group]
        points = [(s, v) for s, v in zip(steps, ratio) if s >= 0 and math.isfinite(v) and v > 0]
        (line,) = ratio_ax.plot([s for s, _ in points], [v for _, v in points], "o-", color=color, label=label, markersize=4)
        points = [(s, v) for s, v in zip(steps, cosine) if s >= 0 and math.isfinite(v)]
        cos_ax.plot([s for s, _ in points], [v for _, v in points], "o-", color=color, label=label, markersize=4)
        handles.append(line)
        labels.append(label)
        pairs = [(s, e, g) for s, e, g in zip(steps, ree, ratio) if s >= 0 and all(math.isfinite(v) and v > 0 for v in (e, g))]
        if not pairs:
            continue
        r, rho = pearson([e for _, e, _ in pairs], [g for _, _, g in pairs]), spearman([e for _, e, _ in pairs], [g for _, _, g in pairs])
        labels[-1] = f"{label}: r = {_corr(r)}, ρ = {_corr(rho)} (n = {len(pairs)})"
        mappable = scatter_ax.scatter(
            [100 * e for _, e, _ in pairs], [g for _, _, g in pairs], c=[s for s, _, _ in pairs], norm=norm, cmap="viridis",
            marker=markers[i % len(markers)], edgecolors=color, linewidths=1.2, s=42, zorder=3, label=labels[-1],
        )
        handles[-1] = (line, mappable)
    all_steps = [step_value(r) for r in shown]
    for ax in (ratio_ax, cos_ax):
        step_axis(ax, all_steps)
        ax.grid(True, which="major", alpha=0.3)
    ratio_ax.set_yscale("log")
    ratio_ax.set_ylabel("‖∇EE‖ / ‖∇L_sym‖ (ratio of gradient norms)")
    ratio_ax.set_title("gradient of the equivariance error vs of L_sym")
    cos_ax.set_ylim(-1.05, 1.05)
    cos_ax.axhline(0, color="0.5", linewidth=0.8)
    cos_ax.set_ylabel("cos(∇L_sym, ∇EE) (cosine similarity)")
    cos_ax.set_title("alignment of the two gradients")
    scatter_ax.set_xscale("log")
    scatter_ax.set_yscale("log")
    plain_log_y(ratio_ax)
    plain_log_y(scatter_ax)
    plain_log_x(scatter_ax)
    scatter_ax.set_xlabel("REE = equivariance error / L_aug (%)")
    scatter_ax.set_ylabel("‖∇EE‖ / ‖∇L_sym‖")
    scatter_ax.set_title("REE vs gradient ratio (log–log), colour = step")
    scatter_ax.grid(True, which="major", alpha=0.3)
    if mappable is not None:
        fig.colorbar(mappable, ax=scatter_ax, label="training step")
    if handles:  # one legend for the three panels, below them: line colour and marker name the series
        from matplotlib.legend_handler import HandlerTuple

        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(handles)), fontsize="small",
                   handler_map={tuple: HandlerTuple(ndivide=None)})
    if title:
        fig.suptitle(plot_text(title))
    return fig


def _corr(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}"


# ----------------------------------------------------------------------------- landscape


def landscape_grid(rows: Sequence[Mapping], column: str):
    """``(alpha (N,), beta (M,), Z (M, N))`` from long-format rows: ``Z[j, i]`` at
    ``(alpha[i], beta[j])``, NaN where the grid has no row (numpy arrays)."""
    import numpy as np

    alphas = sorted({a for a in (as_float(r.get("alpha")) for r in rows) if math.isfinite(a)})
    betas = sorted({b for b in (as_float(r.get("beta")) for r in rows) if math.isfinite(b)})
    ia, ib = {a: i for i, a in enumerate(alphas)}, {b: j for j, b in enumerate(betas)}
    z = np.full((len(betas), len(alphas)), np.nan)
    for r in rows:
        a, b = as_float(r.get("alpha")), as_float(r.get("beta"))
        if a in ia and b in ib:
            z[ib[b], ia[a]] = as_float(r.get(column))
    return np.array(alphas), np.array(betas), z


def _direction_label(meta: Mapping, index: int, axis: str) -> str:
    directions = list(meta.get("directions") or [])
    name = str(directions[index]) if index < len(directions) else f"direction {index + 1}"
    value = (meta.get("eigenvalues") or {}).get(name) if isinstance(meta.get("eigenvalues"), Mapping) else None
    eigen = f", λ = {as_float(value):.4g}" if isinstance(value, (int, float, str)) and math.isfinite(as_float(value)) else ""
    return f"{axis} along {plot_text(name.replace('_', ' '))}{eigen} (unit-norm steps)"


def landscape_figure(rows: Sequence[Mapping], meta: Mapping | None = None):
    """Two side-by-side panels of ``L_sym`` and ``EE`` over the (α, β) grid through a checkpoint.

    Each panel: the grid as a colour mesh (the data, ``shading="nearest"``) with 10 contour
    lines over it, its own linear colour scale from its min to its max (the same colormap and
    style on both, so one compares shapes, not levels; colorbars give the values), the
    checkpoint (α = β = 0) marked with a white ``+``. Axes name the eigen-directions of
    ``meta["directions"]`` (with their eigenvalue when ``meta["eigenvalues"]`` has it);
    titles give the quadratic fit's R² (``meta["r2_sym"]``, ``meta["r2_equiv"]``).
    """
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    meta = meta or {}
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (("loss_sym", "L_sym (symmetrized loss)", "r2_sym"), ("equiv_error", "EE = L_aug − L_sym (equivariance error)", "r2_equiv"))
    for ax, (column, name, r2_key) in zip(axes, panels):
        alpha, beta, z = landscape_grid(rows, column)
        r2 = as_float(meta.get(r2_key))
        ax.set_title(f"{name}\nquadratic fit R² = {r2:.4g}" if math.isfinite(r2) else f"{name}\nquadratic fit R² = n/a")
        ax.set_xlabel(_direction_label(meta, 0, "α"))
        ax.set_ylabel(_direction_label(meta, 1, "β"))
        finite = z[np.isfinite(z)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            norm = Normalize(low, high if high > low else low + 1e-12)
            mesh = ax.pcolormesh(alpha, beta, z, shading="nearest", cmap="viridis", norm=norm)
            mesh.set_gid(column)  # the data, found again by tests
            if high > low and min(z.shape) >= 2:
                ax.contour(alpha, beta, np.ma.masked_invalid(z), levels=10, colors="0.1", linewidths=0.6, alpha=0.45)
            fig.colorbar(mesh, ax=ax, label=f"{column} (loss units)")
        ax.plot([0], [0], "+", color="white", markersize=14, markeredgewidth=2.5, label="checkpoint (α = β = 0)")
        ax.plot([0], [0], "+", color="black", markersize=10, markeredgewidth=1)
        ax.legend(fontsize="x-small", loc="upper right")
        ax.set_aspect("equal", adjustable="box")
    checkpoint, step = meta.get("checkpoint"), meta.get("step")
    if checkpoint is not None or step not in (None, ""):
        fig.suptitle(" · ".join(p for p in (plot_text(checkpoint) if checkpoint is not None else "", f"step {step}" if step not in (None, "") else "") if p))
    return fig


# ----------------------------------------------------------------------------- twirling


def select_checkpoints(steps: Sequence[float], most: int) -> list[int]:
    """Indices of at most ``most`` of the sorted ``steps``, evenly spread, first and last kept."""
    n = len(steps)
    if n <= most:
        return list(range(n))
    if most <= 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def twirl_figure(rows: Sequence[Mapping], *, head: str | None = None, most: int = 6, threshold: float | None = None):
    """Test-time twirling from ``twirl.csv`` rows: left, ``loss_twirled`` against k (log x);
    right, the share of the equivariance error removed against k.

    One line per checkpoint of ``head`` (default ``total``, else the first head), at most
    ``most`` checkpoints (evenly spread over training, first and last kept), coloured by step
    (colorbar). Reference lines in the line's colour: ``L_aug`` (dotted, the k = 1 value) and
    ``L_sym`` (dashed, the k → ∞ limit); a star marks ``smallest_k``, the smallest k whose
    average removes ``twirl_target`` (``threshold``; default: the rows' own, else 90 %) of the
    error. The right panel has the target line and MSE's
    ``1 − 1/k`` for reference. Lines are labelled ``<series>``, ``<series>: L_aug``,
    ``<series>: L_sym``, ``<series>: smallest k`` (:func:`series_label` with the step).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    if threshold is None:
        threshold = twirl_target(rows)
    from matplotlib.lines import Line2D

    heads = list(dict.fromkeys(str(r.get("head", "")) for r in rows))
    head = head if head is not None else ("total" if "total" in heads else (heads[0] if heads else "total"))
    picked = [r for r in rows if str(r.get("head", "")) == head]
    latest = {}
    for row in picked:  # last row per checkpoint and k
        latest[(str(row.get("run", "")), str(row.get("checkpoint", "")), as_float(row.get("k")))] = row
    curves = group_rows(list(latest.values()), ("run", "checkpoint"))
    ordered = sorted(curves.items(), key=lambda kv: (kv[0][0], step_value(kv[1][0])))
    keep = select_checkpoints([step_value(g[0]) for _, g in ordered], most)
    ordered = [ordered[i] for i in keep]
    runs = len({run for (run, _), _ in ordered})
    norm = step_norm([step_value(g[0]) for _, g in ordered])
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    loss_ax, share_ax = fig.subplots(1, 2)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    all_k: list[float] = []
    for (run, checkpoint), group in ordered:
        group = sorted(group, key=lambda r: as_float(r.get("k")))
        step = step_value(group[0])
        color = cmap(norm(step)) if math.isfinite(step) else "0.4"
        label = series_label(run, head, runs=runs, suffix=f"step {int(step)}" if math.isfinite(step) else plot_text(checkpoint))
        ks = [as_float(r.get("k")) for r in group]
        all_k += ks
        loss = [as_float(r.get("loss_twirled")) for r in group]
        share = [as_float(r.get("share_of_equiv_error_removed")) for r in group]
        loss_ax.plot(ks, loss, "o-", color=color, label=label, markersize=4)
        share_ax.plot(ks, [100 * s for s in share], "o-", color=color, label=label, markersize=4)
        aug, sym = as_float(group[0].get("loss_aug")), as_float(group[0].get("loss_sym"))
        if math.isfinite(aug):
            loss_ax.axhline(aug, color=color, linestyle=":", linewidth=1, label=f"{label}: L_aug")
        if math.isfinite(sym):
            loss_ax.axhline(sym, color=color, linestyle="--", linewidth=1, label=f"{label}: L_sym")
        k90 = as_float(smallest_k(group[0]))
        if math.isfinite(k90) and k90 in ks:
            at = loss[ks.index(k90)]
            loss_ax.plot([k90], [at], "*", color=color, markersize=15, markeredgecolor="black", zorder=4, label=f"{label}: smallest k")
    for ax in (loss_ax, share_ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plain_log_formatter()(base=2, labelOnlyBase=False))
        ax.set_xlabel("k (rotations averaged at test time, log scale)")
        ax.grid(True, which="major", alpha=0.3)
    if all_k:
        import numpy as np

        kk = np.geomspace(1, max(all_k), 64)
        share_ax.plot(kk, 100 * (1 - 1 / kk), color="0.5", linewidth=1, linestyle="-.", label="MSE: 1 − 1/k")
    share_ax.axhline(100 * threshold, color="0.3", linestyle="--", linewidth=1, label=f"{100 * threshold:g} % of EE removed")
    share_ax.set_ylim(-5, 105)
    share_ax.set_ylabel("share of the equivariance error removed (%)")
    share_ax.set_title("how much of EE the k-average removes")
    share_ax.legend(fontsize="x-small")
    loss_ax.set_ylabel("held-out loss of the k-rotation average (loss units)")
    loss_ax.set_title(f"test-time twirling ({plot_text(head)}): from L_aug (k = 1) to L_sym (k → ∞)")
    handles = [ln for ln in loss_ax.get_lines() if ln.get_linestyle() == "-"]
    handles += [Line2D([], [], color="0.3", linestyle=":", label="L_aug (k = 1)"),
                Line2D([], [], color="0.3", linestyle="--", label="L_sym (k → ∞)"),
                Line2D([], [], color="0.3", marker="*", linestyle="", markersize=12, label=f"smallest k removing {100 * threshold:g} % of EE")]
    loss_ax.legend(handles=handles, fontsize="x-small")
    if ordered:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=share_ax, label="training step")
    return fig


def smallest_k(row: Mapping) -> object:
    """A twirl row's recommended k (``smallest_k``; ``smallest_k_90`` in files written before 0.3)."""
    return row.get("smallest_k", row.get("smallest_k_90"))


def twirl_target(rows: Sequence[Mapping]) -> float:
    """The share of EE the rows' ``smallest_k`` removes (``twirl_target``; 0.9 in older files)."""
    values = [as_float(r.get("twirl_target")) for r in rows]
    return next((v for v in values if math.isfinite(v)), 0.9)

"""Why symmetry is learned fast: the dynamics of one checkpoint and of a trajectory. Pure.

For one checkpoint (:func:`checkpoint_dynamics`), through the plan's own differentiable
orbit objective (:meth:`equiaudit.plan.AuditPlan.objective`, the audit's samples, rotations
and task noise, bias-corrected EE):

* the gradient split per head and for the total: ``‖∇θ L_sym‖``, ``‖∇θ EE‖``, their ratio
  and cosine (:func:`equiaudit.dynamics.gradient_splits`: one forward pass per batch and two
  backward passes per head);
* optionally the top-k Hessian eigenvalues of ``L_sym`` and of ``EE`` (block Lanczos on
  Hessian-vector products; never a dense Hessian), on the total;
* optionally a loss landscape of ``L_sym`` and ``EE`` on an N×N grid along two eigen-
  directions of the Hessian of the trained loss ``L_aug`` (the top one and the smallest
  positive one found), with the R² of a quadratic fit of each surface;
* the variance of chosen parameter tensors (``track_params``).

Across a trajectory (:func:`trajectory_correlations`): Pearson and Spearman correlations
of ``log REE`` with ``log grad_norm_ratio`` and with each tracked ``log var``.

Parameters are named by ``fnmatch`` globs on ``model.named_parameters()``; by default every
floating parameter that requires grad. Nothing here touches files.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from equiaudit import dynamics as dyn
from equiaudit.model_state import evaluation_mode
from equiaudit.result import as_float
from equiaudit.schema import DYNAMICS_COLUMNS  # (re-exported: the column list lives in the schema)

__all__ = ["DynamicsOptions", "CheckpointDynamics", "select_params", "checkpoint_dynamics", "trajectory_correlations",
           "DYNAMICS_COLUMNS"]



@dataclass(frozen=True)
class DynamicsOptions:
    """What ``--dynamics`` measures (the config's ``dynamics:`` section).

    Attributes:
        gradients: the gradient split (``dynamics.csv``).
        twirl: test-time twirling from the audit's orbits (``twirl.csv``).
        hessian: top-k eigenvalues of the Hessians of L_sym and EE (0: none).
        params: globs of the parameters the gradients and Hessians are taken over (empty: all).
        track_params: globs of parameters whose variance is recorded per checkpoint.
        landscape: ``True`` (every checkpoint), or the steps to draw a landscape at.
        grid: N of the N×N landscape grid.
        samples: evaluate the dynamics on the audit's first ``samples`` rows (None: all); a
            row is a sample, or one sample at one fixed time for ``flow.t`` / ``diffusion.sigma``.
        tol, max_iter: Lanczos tolerance (relative residual) and iteration cap.
        twirl_target: the share of the equivariance error the recommended k-rotation average
            removes (``twirl.csv``'s ``smallest_k``: the smallest measured k reaching it).
    """

    gradients: bool = True
    twirl: bool = True
    hessian: int = 0
    params: tuple[str, ...] = ()
    track_params: tuple[str, ...] = ()
    landscape: bool | tuple[int, ...] = ()
    grid: int = 20
    samples: int | None = None
    tol: float = 1e-3
    max_iter: int = 40
    twirl_target: float = 0.9

    def landscape_at(self, step: int | None) -> bool:
        if self.landscape is True:
            return True
        return bool(self.landscape) and step is not None and step in self.landscape


@dataclass
class CheckpointDynamics:
    """The dynamics of one checkpoint: ``dynamics.csv`` rows (total first, then each head)
    and, when drawn, the landscape (``alpha``, ``beta`` ``(N,)``, ``loss_sym``,
    ``equiv_error`` ``(N, N)``) with its metadata."""

    rows: list[dict] = field(default_factory=list)
    landscape: dict[str, Any] | None = None


def select_params(model: torch.nn.Module, globs: Sequence[str] = ()) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the model's floating, trainable parameters matching any glob."""
    chosen = [(name, p) for name, p in model.named_parameters()
              if p.requires_grad and p.is_floating_point() and (not globs or any(fnmatch.fnmatchcase(name, g) for g in globs))]
    if not chosen:
        what = f" matching {', '.join(globs)}" if globs else ""
        names = ", ".join(n for n, _ in list(model.named_parameters())[:6])
        raise ValueError(f"no trainable floating parameters{what}; the model has: {names or 'none'}")
    return chosen


def _weight_columns(model: torch.nn.Module, globs: Sequence[str]) -> dict[str, float]:
    if not globs:
        return {}
    named = [(name, p.detach()) for name, p in model.named_parameters() if any(fnmatch.fnmatchcase(name, g) for g in globs)]
    if not named:
        raise ValueError(f"--track-params {', '.join(globs)} matches no parameter")
    out = {}
    for name, stats in dyn.weight_statistics(named).items():
        out[f"var/{name}"] = stats.variance
        out[f"normvar/{name}"] = stats.normalized_variance
    return out


def checkpoint_dynamics(plan, model: torch.nn.Module, prepared, options: DynamicsOptions, *, step: int | None = None,
                        splits: Mapping[str, dyn.GradientSplit] | None = None) -> CheckpointDynamics:
    """The dynamics of ``model`` (loaded with one checkpoint) on the plan's prepared data.

    ``splits``: the gradient split when it was accumulated during the audit's own evaluation
    (:meth:`equiaudit.plan.AuditPlan.gradient_accumulator`); computed here otherwise.

    The model runs in eval mode with gradients enabled; its parameters are left exactly as
    they were (the landscape restores them bitwise) and no ``.grad`` is written.
    """
    out = CheckpointDynamics()
    weights = {h.name: h.weight for h in plan.spec.heads}
    with evaluation_mode(model):
        named = select_params(model, options.params)
        params = [p for _, p in named]
        heads_objective = plan.objective(model, prepared, samples=options.samples)

        def total_objective():
            for parts in heads_objective():
                yield (sum(weights[h] * parts[h][0] for h in weights), sum(weights[h] * parts[h][1] for h in weights))

        tracked = _weight_columns(model, options.track_params)
        if splits is None:
            splits = dyn.gradient_splits(heads_objective, params, weights) if options.gradients else {}
        total_extra: dict[str, Any] = {}
        eigen = {}
        terms = (["sym", "equiv"] if options.hessian else []) + (["aug"] if options.landscape_at(step) else [])
        if terms:
            k = max(options.hessian, 2 if options.landscape_at(step) else 0)
            eigen = dyn.hessian_eigen(total_objective, params, k, terms=terms, tol=options.tol, max_iter=options.max_iter,
                                      generator=torch.Generator().manual_seed(plan.seed))
        if options.hessian:
            for term, name in (("sym", "sym"), ("equiv", "equiv")):
                values = eigen[term].eigenvalues.tolist()
                total_extra[f"hessian_top_{name}"] = values[0]
                for i, value in enumerate(values[1:], start=2):
                    total_extra[f"hessian_{name}_{i}"] = value
                total_extra[f"hessian_converged_{name}"] = bool(eigen[term].converged)
            total_extra["hessian_tol"] = options.tol
        for head in ("total", *weights):
            row: dict[str, Any] = {"head": head}
            split = splits.get(head)
            if split is not None:
                row.update(grad_norm_sym=split.grad_norm_sym, grad_norm_equiv=split.grad_norm_equiv,
                           grad_norm_ratio=split.grad_norm_ratio, grad_cosine=split.grad_cosine,
                           grad_norm_aug=split.grad_norm_aug, loss_sym=split.loss_sym, equiv_error=split.equiv_error,
                           rel_equiv_error=split.equiv_error / split.loss_aug if split.loss_aug > 0 else math.nan)
            if head == "total":
                row.update(total_extra)
            row.update(tracked)
            row["n_parameters"] = sum(p.numel() for p in params)
            out.rows.append(row)
        if options.landscape_at(step):
            out.landscape = _landscape(total_objective, params, eigen, options, spec_grad=plan.spec.grad)
    return out


def _landscape(objective, params, eigens: Mapping[str, dyn.HessianEigen], options: DynamicsOptions, *, spec_grad: bool) -> dict[str, Any]:
    """L_sym and EE on the grid ``θ + α·v_top + β·v_min`` (unit eigenvectors of the Hessian of
    L_aug: the top one and the smallest positive one found; the second-largest when no other
    is positive). Both axes span ``±s`` with ``s = √(2·L_aug/λ_top)``: where the quadratic model
    of L_aug along the top direction doubles the loss, so the grid shows the basin."""
    eigen = eigens["aug"]
    values = eigen.eigenvalues.tolist()
    top, top_vector = values[0], eigen.eigenvectors[0]
    smallest = eigen.smallest_positive()
    # The second direction: the smallest positive eigenvalue found, named for what it is (with
    # only two eigenpairs computed it is simply the second largest).
    if smallest is not None and smallest[0] != top and smallest[0] != values[1]:
        low, low_vector, second = smallest[0], smallest[1], "hessian_smallest_positive"
    else:
        low, low_vector, second = values[1], eigen.eigenvectors[1], "hessian_second"
    loss_aug = 0.0
    for part_sym, part_equiv in objective():
        loss_aug += float(part_sym.detach()) + float(part_equiv.detach())
    span = math.sqrt(2 * loss_aug / top) if top > 0 and loss_aug > 0 else 1.0
    grid = dyn.loss_landscape(objective, params, top_vector, low_vector, n=options.grid, span=span, needs_autograd=spec_grad)
    smooth = dyn.landscape_smoothness(grid, eigens)
    return {
        "alpha": grid.alpha, "beta": grid.beta, "loss_sym": grid.loss_sym, "equiv_error": grid.equiv_error,
        "directions": ["hessian_top", second], "eigenvalues": {"hessian_top": top, second: low},
        "span": span, "n": options.grid, "r2_sym": smooth.r2_sym, "r2_equiv": smooth.r2_equiv,
        "roughness_sym": smooth.roughness_sym, "roughness_equiv": smooth.roughness_equiv,
        "condition_sym": smooth.condition_sym, "condition_equiv": smooth.condition_equiv,
        "condition": top / low if low > 0 else math.inf,
    }



def trajectory_correlations(dynamics_rows: Iterable[Mapping[str, Any]], summary_rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Across each run's checkpoints and per head: Pearson and Spearman correlations of
    ``log REE`` (from ``summary.csv``) with ``log grad_norm_ratio`` and with every tracked
    ``log var/<param>`` (from ``dynamics.csv``); NaN below 3 usable points."""
    ree = {(r["run"], r["checkpoint"], r["head"]): as_float(r.get("rel_equiv_error"))
           for r in summary_rows if r.get("status", "ok") == "ok"}
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in dynamics_rows:
        grouped.setdefault((row["run"], row["head"]), []).append(row)
    out = []
    for (run, head), rows in grouped.items():
        xs = [ree.get((run, r["checkpoint"], head), math.nan) for r in rows]
        columns = ["grad_norm_ratio"] + sorted({k for r in rows for k in r if str(k).startswith("var/")})
        for column in columns:
            ys = [as_float(r.get(column)) for r in rows]
            pairs = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
            out.append({"run": run, "head": head, "x": "log rel_equiv_error", "y": f"log {column}",
                        "pearson": dyn.pearson(xs, ys), "spearman": dyn.spearman(xs, ys), "n": len(pairs)})
    return out

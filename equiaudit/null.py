"""The null reference of every head: the loss of the best exactly equivariant predictor that
ignores the input's geometry, and the audit's ``skill`` against it. Pure.

REE is a share of the loss. When the loss is all "has not learnt the task" (a model predicting
the mean force), the share due to symmetry is tiny and says nothing; ``skill = 1 − L_sym /
loss_null`` says how much of the task the model has learnt (0: nothing beyond the null
predictor; 1: all of it). Definitions per representation: ``docs/metric.md`` (Skill).

The null predictor is fitted in closed form on the audited samples themselves, from per-sample
sufficient statistics recorded beside the audit's own (:func:`null_columns`, columns of the
``samples`` table of :class:`~equiaudit.stats.SampleStats`): pieces made by batches, ranks
or shards merge, and :func:`loss_null` reduces them, exactly as one process would. No model
is called.

Per sample ``i`` and head (element values ``y`` of its target, the loss's element weights
``w`` and normaliser ``W_i = Σ w``, the task's per-sample weight ``λ_i``):

* ``null_s2/<h>`` ``(N,)``: ``λ_i Σ w y² / W_i`` (after centring for ``point`` targets);
  for losses other than MSE, the per-sample loss of the fit-free predictor (zero, centroid);
* ``null_s1/<h>``, ``null_sw/<h>`` ``(N, G)``: ``λ_i Σ_{e∈g} w y / W_i`` and
  ``λ_i Σ_{e∈g} w / W_i`` per group ``g`` of elements sharing one fitted constant (MSE only);
  the loss of constants ``μ_g`` is ``mean_i (s2 − 2 μ·s1 + μ²·sw)``, least at
  ``μ_g = Σ_i s1_ig / Σ_i sw_ig``, where it is ``mean_i s2 − Σ_g (Σ_i s1_ig)² / Σ_i sw_ig / N``;
* ``null_x/<h>`` ``(N, V + 1)``, ``null_y/<h>`` ``(N, C)`` (per-structure scalars, MSE): the
  element counts (and a 1) and the targets, times ``√λ_i``: least squares on composition;
* ``null_id/<h>`` ``(N,)`` (denoising tasks): the per-sample loss of the identity map
  (predicting the noisy input itself).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from equiaudit import actions
from equiaudit.metrics import elementwise_loss

__all__ = ["NOT_LEARNED", "MIN_SKILL", "TYPE_BINS", "TYPES_FIELD", "null_columns", "loss_null", "skill",
           "skill_flag", "not_learned_reason"]

NOT_LEARNED = "not_learned"  # the `flag` of a result whose skill is below the threshold
MIN_SKILL = 0.1  # --min-skill's default
# Atom types are binned modulo this (atomic numbers are < 119): a fixed width, so the per-sample
# columns of every batch, rank and shard concatenate. Types beyond it share bins, which only
# coarsens the null predictor (it stays a valid geometry-free one).
TYPE_BINS = 128
TYPES_FIELD = "z"  # the canonical per-atom type field (ARCHITECTURE.md)
MAX_GROUPS = 4096  # per-atom scalar channels × types beyond this: fit per channel only


def _element_weight(target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The loss's element weight broadcast to ``target`` ``(B, *E)`` (as ``reduce_per_sample`` does)."""
    if weight is None:
        return torch.ones_like(target, dtype=torch.float64)
    weight = weight.to(torch.float64)
    while weight.dim() < target.dim():
        weight = weight.unsqueeze(-1)
    return weight.expand_as(target)


def _groups(rep: str, target: torch.Tensor, types: torch.Tensor | None, per_atom: bool) -> tuple[torch.Tensor, int] | None:
    """Each element's group ``(B, *E)`` int64 (−1: predicted zero) and the number of groups;
    None when the head is fitted by least squares instead (per-structure scalars)."""
    b, shape = target.shape[0], target.shape[1:]
    if rep in ("vector", "pseudovector", "point"):
        return torch.full(target.shape, -1, dtype=torch.int64, device=target.device), 0
    atom_group = None
    if per_atom and types is not None and types.shape == target.shape[:2]:
        atom_group = types.long().remainder(TYPE_BINS)  # (B, A)
    if rep == "scalar":
        if not per_atom:
            return None
        channels = math.prod(shape[1:])
        if atom_group is None or channels * TYPE_BINS > MAX_GROUPS:
            atom_group, bins = torch.zeros(target.shape[:2], dtype=torch.int64, device=target.device), 1
        else:
            bins = TYPE_BINS
        channel = torch.arange(channels, device=target.device).reshape(shape[1:]) if shape[1:] else torch.tensor(0)
        atom = atom_group.reshape(*atom_group.shape, *[1] * (len(shape) - 1))
        return (atom * channels + channel).expand(target.shape), bins * channels
    if rep == "tensor2":
        # c·I (one constant per atom type for per-atom tensors): the isotropic part is invariant.
        diagonal = torch.eye(3, dtype=torch.bool, device=target.device)
        group = atom_group if atom_group is not None else torch.zeros(target.shape[:-2], dtype=torch.int64,
                                                                      device=target.device)
        group = group.reshape(*group.shape, *[1] * (target.dim() - 2 - group.dim()), 1, 1).expand(target.shape)
        return torch.where(diagonal, group, -1), TYPE_BINS if atom_group is not None else 1
    if rep == "voxel":
        # One constant per channel: a uniform grid is invariant under every rotation of the grid.
        channels = shape[0]
        channel = torch.arange(channels, device=target.device).reshape(1, channels, *[1] * (len(shape) - 1))
        return channel.expand(target.shape), channels
    return None


def null_columns(head, spec, batch: Mapping[str, torch.Tensor], identity_input: str | None = None) -> dict[str, torch.Tensor]:
    """The per-sample sufficient statistics of ``head``'s null predictor on one batch (see the
    module docstring), ``{column: (B, ...)}`` on the CPU. ``head``: a
    :class:`~equiaudit.engine.HeadSpec`; ``spec``: the :class:`~equiaudit.engine.OrbitSpec`;
    ``batch``: prepared fields ``(B, ...)``; ``identity_input``: the noisy input field a
    denoising head may copy (its identity map), if any."""
    from equiaudit.engine import head_weight

    name = head.name
    mask = batch.get(spec.mask) if spec.mask else None
    target = batch[head.target]
    if not target.is_floating_point() or head.loss == "cross_entropy":
        return {}  # class targets: no null defined here (reported empty)
    target = target.double()
    if head.rep == "point" and spec.group.action.centres_points:
        target = actions.centre(target, mask)
    b = target.shape[0]
    weight = head_weight(head, spec, mask, target)
    w = _element_weight(target, weight)
    norm = w.reshape(b, -1).sum(1).clamp_min(1e-300)  # (B,) W_i
    scale = batch[head.sample_weight].double().reshape(b) if head.sample_weight else torch.ones(b, dtype=torch.float64,
                                                                                               device=target.device)
    out: dict[str, torch.Tensor] = {}
    if identity_input is not None and identity_input in batch:
        noisy = batch[identity_input].double()
        if head.rep == "point" and spec.group.action.centres_points:
            noisy = actions.centre(noisy, mask)
        if noisy.shape == target.shape:
            loss = elementwise_loss(head.loss, noisy, target, head.huber_delta)
            out[f"null_id/{name}"] = (loss * w).reshape(b, -1).sum(1) / norm * scale
    per_atom = mask is not None and target.dim() >= 2 and target.shape[1] == mask.shape[1]
    types = batch.get(TYPES_FIELD)
    grouping = _groups(head.rep, target, types, per_atom)
    if head.loss != "mse":
        if grouping is not None and grouping[1] == 0:  # fit-free predictors: zero, centroid
            loss = elementwise_loss(head.loss, torch.zeros_like(target), target, head.huber_delta)
            out[f"null_s2/{name}"] = (loss * w).reshape(b, -1).sum(1) / norm * scale
        return {k: v.cpu() for k, v in out.items()}
    if grouping is None:  # per-structure scalars: least squares on the element counts
        y = target.reshape(b, -1)
        counts = torch.zeros(b, TYPE_BINS, dtype=torch.float64, device=target.device)
        if types is not None and types.dim() == 2:
            valid = mask.to(torch.float64) if mask is not None and mask.shape == types.shape else torch.ones_like(types, dtype=torch.float64)
            counts.scatter_add_(1, types.long().remainder(TYPE_BINS), valid)
        x = torch.cat([counts, torch.ones(b, 1, dtype=torch.float64, device=target.device)], 1)
        root = scale.sqrt()[:, None]
        out[f"null_x/{name}"], out[f"null_y/{name}"] = x * root, y * root
        return {k: v.cpu() for k, v in out.items()}
    group, n_groups = grouping
    wy = (w * target / norm.reshape(b, *[1] * (target.dim() - 1))).reshape(b, -1)
    wn = (w / norm.reshape(b, *[1] * (target.dim() - 1))).reshape(b, -1)
    out[f"null_s2/{name}"] = (wy * target.reshape(b, -1)).sum(1) * scale
    if n_groups:
        flat = group.reshape(b, -1)
        inside = flat >= 0
        index = flat.clamp_min(0)
        s1 = torch.zeros(b, n_groups, dtype=torch.float64, device=target.device).scatter_add_(1, index, wy * inside)
        sw = torch.zeros(b, n_groups, dtype=torch.float64, device=target.device).scatter_add_(1, index, wn * inside)
        out[f"null_s1/{name}"], out[f"null_sw/{name}"] = s1 * scale[:, None], sw * scale[:, None]
    return {k: v.cpu() for k, v in out.items()}


def loss_null(head: str, samples: Mapping[str, torch.Tensor]) -> float:
    """``loss_null`` of one head from the finalized ``samples`` columns (all rows): the least
    loss of its null predictors (fitted constants or composition, and the identity map of a
    denoising task); NaN when none is defined for the head (e.g. cross-entropy, L1 energies)."""
    candidates = []
    s2 = samples.get(f"null_s2/{head}")
    if s2 is not None and len(s2):
        total = s2.double().sum()
        s1, sw = samples.get(f"null_s1/{head}"), samples.get(f"null_sw/{head}")
        if s1 is not None and sw is not None:
            sum1, sumw = s1.double().sum(0), sw.double().sum(0)
            used = sumw > 0
            total = total - (sum1[used].square() / sumw[used]).sum()
        candidates.append(max(total.item(), 0.0) / len(s2))
    x, y = samples.get(f"null_x/{head}"), samples.get(f"null_y/{head}")
    if x is not None and y is not None and len(x):
        x, y = x.double(), y.double()
        x = x[:, x.abs().sum(0) > 0]  # element types absent from the data
        fit = torch.linalg.lstsq(x, y, driver="gelsd").solution
        residual = y - x @ fit
        candidates.append(residual.square().mean().item())
    identity = samples.get(f"null_id/{head}")
    if identity is not None and len(identity):
        candidates.append(identity.double().mean().item())
    return min(candidates) if candidates else math.nan


def skill(loss_sym: float, null: float) -> float:
    """``1 − L_sym / loss_null`` (NaN when the null loss is not positive or not defined)."""
    if null is None or not null > 0 or math.isnan(loss_sym):
        return math.nan
    return 1.0 - loss_sym / null


def skill_flag(value: float | None, min_skill: float = MIN_SKILL) -> bool:
    """True when ``value`` is a number below ``min_skill``: the checkpoint has not learnt the task."""
    return value is not None and not math.isnan(value) and value < min_skill


def not_learned_reason(value: float, min_skill: float = MIN_SKILL) -> str:
    """The one-line reason shown beside a greyed REE."""
    return (f"not learned: skill {value:.3g} < {min_skill:g} (its loss is near that of a predictor that ignores the "
            "geometry, so its REE says nothing about learned symmetry)")

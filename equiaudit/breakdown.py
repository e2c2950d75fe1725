"""Breakdowns of the audit (``breakdown.csv``): where the equivariance error comes from. Pure.

Every split partitions the units the audit's figure is an average of, and reports each
bin with the audit's own definitions restricted to it:

* ``element``: atoms, binned by atomic number (per-atom heads only);
* ``channel``: voxel-grid channels (axis 1 of ``voxel`` heads);
* ``n_atoms``: samples, by their number of valid atoms;
* ``angle``: (sample, rotation) pairs, by the rotation angle in degrees, ``[0, 180]``
  (the angle of ``det(R)·R`` for improper elements);
* ``t`` (or any per-sample scalar field named in ``by``): samples, in ``bins`` bins,
  uniform over ``[0, 1]`` when the values lie there, else at quantiles (integer fields
  with few values: one bin per value);
* ``sample``: the ``worst`` samples by equivariance error, one row each, ``bin`` = the
  sample's index in the audited dataset;
* ``residue`` (per-atom heads of data with a ``residue`` field: protein structures): atoms
  or residues by residue type (AlphaFold's one-letter code, ``X`` unknown);
* ``position`` (data with a ``position`` field): atoms or residues by their residue's index
  along its chain, in bins ``[0, 5), [5, 10), [10, 25), [25, 50), [50, 100), [100, 200), 200+``;
* ``l`` (heads whose representation is an e3nn irreps string): the components of each
  degree ``l``, so the error's degree shows (a component's weight as in the per-sample mean).

Weights. Each unit carries the weight it has in the audit's total: a sample ``1/N``; a
(sample, rotation) pair ``1/(N·K)``; an atom or channel ``1/N`` times its share of its
sample's per-sample mean (``1/(valid atoms)`` for a per-atom head, components counted).
A bin's ``loss_aug`` and ``equiv_error`` are weighted means over its units, ``weight`` is
its total weight and ``share`` its part of the total error, so over the bins of a split
``Σ weight = 1`` and ``Σ weight·equiv_error`` is the audit's ``equiv_error`` exactly; with
equal unit weights (fixed-size molecules, as in MD17) ``weight = n / Σ n``.

Per-rotation attribution (``angle``): rotation k of a sample contributes its loss
``ℓ(P_k, y)`` and its jackknife pseudo-value (for MSE ``K/(K−1)·‖P_k − P̄‖²``), whose mean
over k is the sample's bias-corrected error (:class:`~equiaudit.metrics.OrbitTerms`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from equiaudit.engine import HeadBatch, OrbitSpec
from equiaudit.representations import get_representation, position_fields
from equiaudit.rotations import rotation_angle
from equiaudit.stats import SampleStats, with_total
from equiaudit.tasks import sample_variables

__all__ = ["BUILTIN_SPLITS", "BreakdownOptions", "bin_rows", "field_bins", "split_fields", "unit_values", "batch_columns", "breakdown_rows"]

BUILTIN_SPLITS = ("element", "n_atoms", "angle", "channel", "sample", "residue", "position", "l")
# Per-unit splits after element/channel (code 0): each unit block carries its split's code,
# and its units are numbered from code·_UNIT_OFFSET so (sample, head, unit) stays unique.
_UNIT_SPLITS = {"residue": 1, "position": 2, "l": 3}
_UNIT_OFFSET = 1 << 24
POSITION_EDGES = (0, 5, 10, 25, 50, 100, 200)
_MAX_DISTINCT = 20
_RESIDUE_LETTERS = "ARNDCQEGHILKMFPSTWYVX"  # the structure reader's tokens 0 … 20 (20 unknown)  # integer fields with at most this many values get one bin per value


@dataclass(frozen=True)
class BreakdownOptions:
    """``by``: per-sample fields to split by besides the built-in splits (``t`` is added
    when the data has it); ``elements``: the atomic-number field; ``worst``: rows of the
    ``sample`` split; ``bins``: bins of a per-sample field; ``angle_bins``: over [0°, 180°]."""

    by: tuple[str, ...] = ()
    elements: str = "z"
    worst: int = 10
    bins: int = 5
    angle_bins: int = 6


def _range_name(lo: float, hi: float, last: bool) -> str:
    return f"[{lo:.4g}, {hi:.4g}" + ("]" if last else ")")


def bin_rows(
    by: str,
    head: str,
    ids: torch.Tensor,
    loss: torch.Tensor,
    error: torch.Tensor,
    weight: torch.Tensor,
    names: Mapping[int, str] | None = None,
    total_error: float | None = None,
) -> list[dict]:
    """One row per bin of a split: units with bin ``ids`` (M,), values and weights (M,).

    Units of zero weight (padded atoms) are left out. ``names`` labels the bin ids (default
    ``str(id)``); ``total_error`` (default ``Σ weight·error``) is what ``share`` divides.
    """
    keep = weight > 0
    ids, loss, error, weight = ids[keep], loss[keep].double(), error[keep].double(), weight[keep].double()
    if total_error is None:
        total_error = float((weight * error).sum())
    distinct, inverse = torch.unique(ids, return_inverse=True)
    size = len(distinct)
    w = torch.zeros(size, dtype=torch.float64).index_add_(0, inverse, weight)
    wl = torch.zeros(size, dtype=torch.float64).index_add_(0, inverse, weight * loss)
    we = torch.zeros(size, dtype=torch.float64).index_add_(0, inverse, weight * error)
    n = torch.bincount(inverse, minlength=size)
    rows = []
    for i, bin_id in enumerate(distinct.tolist()):
        loss_aug, equiv_error = wl[i].item() / w[i].item(), we[i].item() / w[i].item()
        rows.append({
            "head": head,
            "by": by,
            "bin": names[bin_id] if names is not None else str(bin_id),
            "loss_aug": loss_aug,
            "loss_sym": loss_aug - equiv_error,
            "equiv_error": equiv_error,
            "rel_equiv_error": equiv_error / loss_aug if loss_aug > 0 else math.nan,
            "n": int(n[i]),
            "weight": w[i].item(),
            "share": we[i].item() / total_error if total_error != 0 else math.nan,
        })
    return rows


def field_bins(values: torch.Tensor, bins: int = 5) -> tuple[torch.Tensor, dict[int, str]]:
    """Bin a per-sample scalar field ``(N,)``: ``(bin id per sample, {id: label})``.

    Integers with few values: one bin per value. Floats with few values, each taken by
    several samples (fixed ``flow.t`` or ``diffusion.sigma`` lists): one bin per exact
    value, in increasing order, labelled by its shortest distinct form (``"0.2"``). Values
    in ``[0, 1]`` (flow-matching ``t``): ``bins`` uniform bins over ``[0, 1]``. Otherwise
    ``bins`` quantile bins.
    """
    values = values.detach().cpu()
    if not values.is_floating_point():
        distinct = torch.unique(values)
        if len(distinct) <= _MAX_DISTINCT:
            return values.long(), {int(v): str(int(v)) for v in distinct.tolist()}
    else:
        distinct, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
        # Continuous draws never repeat, so "every value repeats" tells a fixed grid apart
        # (even a small audit of continuous t keeps its uniform bins).
        if len(distinct) <= _MAX_DISTINCT and bool((counts >= 2).all()):
            exact = distinct.double().tolist()
            for digits in range(6, 18):  # the fewest digits (≥ 6) that tell them apart: float32 0.2 → "0.2"
                labels = [f"{v:.{digits}g}" for v in exact]
                if len(set(labels)) == len(labels):
                    break
            return inverse, dict(enumerate(labels))
    values = values.double()
    if values.min() >= 0 and values.max() <= 1:
        edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    else:
        edges = torch.unique(torch.quantile(values, torch.linspace(0, 1, bins + 1, dtype=torch.float64)))
    inner = edges[1:-1]
    ids = torch.bucketize(values, inner, right=True)  # bin i is [edges[i], edges[i+1]), the last one closed
    last = len(edges) - 2
    return ids, {i: _range_name(edges[i].item(), edges[i + 1].item(), i == last) for i in range(last + 1)}


def unit_values(terms: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a head's per-sample mean over axis 1 of ``terms`` ``(B, U, ...)``: per unit the
    weighted mean ``(B, U)`` and the unit's share of the sample's weight ``(B, U)``."""
    w = torch.ones_like(terms) if weight is None else weight.to(terms.dtype)
    while w.dim() < terms.dim():
        w = w.unsqueeze(-1)
    w = w.expand_as(terms)
    b, u = terms.shape[:2]
    w_unit = w.reshape(b, u, -1).sum(-1)
    value = (terms * w).reshape(b, u, -1).sum(-1) / w_unit.clamp_min(1e-300)
    return value, w_unit / w_unit.sum(1, keepdim=True).clamp_min(1e-300)


def atom_count(batch: Mapping[str, torch.Tensor], spec: OrbitSpec, elements_field: str = "z") -> int | None:
    """Length of the atom axis, from the mask, the elements or a ``point`` field ``(B, A, 3)``; None without atoms."""
    mask = batch.get(spec.mask) if spec.mask else None
    if mask is not None:
        return mask.shape[1]
    z = batch.get(elements_field)
    if z is not None and z.dim() == 2:
        return z.shape[1]
    points = position_fields(spec.fields, batch)
    return points[0].shape[1] if points else None


def batch_columns(
    batch: Mapping[str, torch.Tensor],
    elements: torch.Tensor,
    results: Mapping[str, HeadBatch],
    spec: OrbitSpec,
    options: BreakdownOptions,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """What the breakdowns need from one batch of B samples.

    Returns ``(sample columns, unit blocks)``: per-sample columns ``(B, ...)`` (the rotation
    angles ``(B, K)`` when the elements are matrices, ``n_atoms``, the per-sample fields split
    by) and, for every head with an axis 1 (atoms, channels), a block of its units
    flattened to ``(B·U,)``: ``row`` (the sample's row in the batch), ``head``, ``unit``,
    ``label`` (atomic number of a per-atom unit, else the unit index), ``loss``, ``error``,
    ``weight`` (the unit's share of its sample).
    """
    columns: dict[str, torch.Tensor] = {}
    b = elements.shape[0]
    if elements.dim() == 4 and elements.shape[-2:] == (3, 3):
        proper = elements * torch.linalg.det(elements)[..., None, None]  # angle of the rotation part
        columns["angle"] = torch.rad2deg(rotation_angle(proper))
    n_atoms = atom_count(batch, spec, options.elements)
    mask = batch.get(spec.mask) if spec.mask else None
    if n_atoms is not None:
        columns["n_atoms"] = mask.sum(1) if mask is not None else torch.full((b,), n_atoms)
    for name in split_fields(batch, options):
        columns[f"field/{name}"] = batch[name]
    z = batch.get(options.elements)
    blocks = []
    for index, head in enumerate(spec.heads):
        result = results[head.name]
        blocks.extend(_extra_unit_blocks(index, head, result, batch, n_atoms))
        if result.terms.loss_aug.dim() < 2:
            continue
        loss, share = unit_values(result.terms.loss_aug, result.weight)
        error, _ = unit_values(result.terms.equiv_error, result.weight)
        u = loss.shape[1]
        per_atom = not get_representation(head.rep).grid and n_atoms is not None and u == n_atoms
        if get_representation(head.rep).grid:
            label = torch.arange(u).expand(b, u)
        elif per_atom and z is not None and z.dim() == 2 and not z.is_floating_point():
            label = z.long()
        else:
            continue  # per-atom heads without atomic numbers: no element split
        blocks.append({
            "row": torch.arange(b).repeat_interleave(u),
            "head": torch.full((b * u,), index),
            "unit": torch.arange(u).repeat(b),
            "label": label.reshape(-1).cpu(),
            "loss": loss.reshape(-1),
            "error": error.reshape(-1),
            "weight": share.reshape(-1),
            "split": torch.zeros(b * u, dtype=torch.int64),
        })
    return columns, blocks


def _unit_block(index: int, split: str, loss: torch.Tensor, error: torch.Tensor, share: torch.Tensor,
                label: torch.Tensor) -> dict[str, torch.Tensor]:
    b, u = loss.shape
    return {
        "row": torch.arange(b).repeat_interleave(u),
        "head": torch.full((b * u,), index),
        "unit": torch.arange(u).repeat(b) + _UNIT_SPLITS[split] * _UNIT_OFFSET,
        "label": label.reshape(-1).long().cpu(),
        "loss": loss.reshape(-1),
        "error": error.reshape(-1),
        "weight": share.reshape(-1),
        "split": torch.full((b * u,), _UNIT_SPLITS[split], dtype=torch.int64),
    }


def _extra_unit_blocks(index: int, head, result: HeadBatch, batch: Mapping[str, torch.Tensor],
                       n_atoms: int | None) -> list[dict[str, torch.Tensor]]:
    """Blocks of the ``residue``, ``position`` (per-atom heads of structures) and ``l`` (irreps heads) splits."""
    blocks = []
    terms = result.terms
    per_atom = terms.loss_aug.dim() >= 2 and n_atoms is not None and terms.loss_aug.shape[1] == n_atoms
    if per_atom:
        loss, share = unit_values(terms.loss_aug, result.weight)
        error, _ = unit_values(terms.equiv_error, result.weight)
        residue, position = batch.get("residue"), batch.get("position")
        if residue is not None and tuple(residue.shape) == tuple(loss.shape) and not residue.is_floating_point():
            blocks.append(_unit_block(index, "residue", loss, error, share, residue))
        if position is not None and tuple(position.shape) == tuple(loss.shape) and not position.is_floating_point():
            edges = torch.tensor(POSITION_EDGES[1:], dtype=torch.int64)
            bins = torch.bucketize(position.long().cpu(), edges, right=True)
            blocks.append(_unit_block(index, "position", loss, error, share, bins))
    irreps = get_representation(head.rep).irreps
    if irreps is not None:
        degree = irreps.degree_of_component().to(terms.loss_aug.device)
        degrees = torch.unique(degree)
        w = torch.ones_like(terms.loss_aug) if result.weight is None else result.weight.to(terms.loss_aug.dtype)
        while w.dim() < terms.loss_aug.dim():
            w = w.unsqueeze(-1)
        w = w.expand_as(terms.loss_aug)
        onehot = (degree[:, None] == degrees[None, :]).to(w.dtype)  # (dim, n_degrees)
        b = w.shape[0]
        w_l = (w.reshape(b, -1, w.shape[-1]) @ onehot).sum(1)  # (B, n_degrees)
        loss = (((terms.loss_aug * w).reshape(b, -1, w.shape[-1]) @ onehot).sum(1)) / w_l.clamp_min(1e-300)
        error = (((terms.equiv_error * w).reshape(b, -1, w.shape[-1]) @ onehot).sum(1)) / w_l.clamp_min(1e-300)
        share = w_l / w_l.sum(1, keepdim=True).clamp_min(1e-300)
        blocks.append(_unit_block(index, "l", loss, error, share, degrees.cpu().expand(b, -1)))
    return blocks


def breakdown_rows(stats: SampleStats, spec: OrbitSpec, options: BreakdownOptions) -> list[dict]:
    """All rows from finalized statistics (:meth:`SampleStats.finalized`): built-in splits that
    apply, then the per-sample fields; ``total`` first in each."""
    samples = stats.tables["samples"].columns()
    weights = {h.name: h.weight for h in spec.heads}
    heads = ["total", *weights]
    n = len(samples["id"])
    keys = ("loss_aug", "equiv_error", "loss_rot", "error_rot")
    by_key = {key: with_total({h: samples[f"{key}/{h}"].double() for h in weights}, weights) for key in keys}
    values = {head: {key: by_key[key][head] for key in keys} for head in heads}
    total_error = {h: values[h]["equiv_error"].mean().item() for h in heads}
    rows: list[dict] = []

    def per_sample(by: str, ids: torch.Tensor, names=None) -> None:
        weight = torch.full((n,), 1 / n, dtype=torch.float64)
        for head in heads:
            v = values[head]
            rows.extend(bin_rows(by, head, ids, v["loss_aug"], v["equiv_error"], weight, names, total_error[head]))

    units = stats.tables["units"].columns()

    def per_unit(by: str, rep_is_grid: bool | None, split: int = 0, names=None) -> None:
        for index, head in enumerate(spec.heads):
            if not len(units) or (rep_is_grid is not None and get_representation(head.rep).grid != rep_is_grid):
                continue
            mine = (units["head"] == index) & ((units["split"] if "split" in units else torch.zeros_like(units["head"])) == split)
            if not mine.any():
                continue
            rows.extend(bin_rows(by, head.name, units["label"][mine], units["loss"][mine], units["error"][mine],
                                 units["weight"][mine] / n, names, total_error[head.name]))

    per_unit("element", rep_is_grid=False)
    if "n_atoms" in samples:
        per_sample("n_atoms", samples["n_atoms"].long())
    if "angle" in samples:
        k = samples["angle"].shape[1]
        width = 180 / options.angle_bins
        ids = (samples["angle"] / width).floor().long().clamp(0, options.angle_bins - 1).flatten()
        names = {i: _range_name(i * width, (i + 1) * width, i == options.angle_bins - 1) for i in range(options.angle_bins)}
        weight = torch.full((n * k,), 1 / (n * k), dtype=torch.float64)
        for head in heads:
            v = values[head]
            rows.extend(bin_rows("angle", head, ids, v["loss_rot"].flatten(), v["error_rot"].flatten(), weight, names, total_error[head]))
    per_unit("channel", rep_is_grid=True)
    residue_names = {i: letter for i, letter in enumerate(_RESIDUE_LETTERS)}
    per_unit("residue", None, _UNIT_SPLITS["residue"], residue_names)
    position_names = {i: f"[{lo}, {hi})" for i, (lo, hi) in enumerate(zip(POSITION_EDGES, POSITION_EDGES[1:]))}
    position_names[len(POSITION_EDGES) - 1] = f"{POSITION_EDGES[-1]}+"
    per_unit("position", None, _UNIT_SPLITS["position"], position_names)
    per_unit("l", None, _UNIT_SPLITS["l"])
    for column in (c for c in samples if c.startswith("field/")):
        ids, names = field_bins(samples[column], options.bins)
        per_sample(column.removeprefix("field/"), ids, names)
    index = samples.get("index", samples["id"])
    for head in heads:
        v = values[head]
        worst = torch.argsort(v["equiv_error"], descending=True, stable=True)[: options.worst]
        weight = torch.full((len(worst),), 1 / n, dtype=torch.float64)
        names = {i: str(int(index[i])) for i in worst.tolist()}
        rows_head = bin_rows("sample", head, worst, v["loss_aug"][worst], v["equiv_error"][worst], weight, names, total_error[head])
        order = {name: j for j, name in enumerate(names[i] for i in worst.tolist())}
        rows.extend(sorted(rows_head, key=lambda r: order[r["bin"]]))  # worst first
    return rows


def split_fields(dataset: Mapping[str, torch.Tensor], options: BreakdownOptions) -> list[str]:
    """The per-sample fields split by: the tasks' per-sample variables when present (flow time
    ``t``, diffusion noise level ``sigma``: :func:`equiaudit.tasks.sample_variables`), then
    ``options.by`` (built-ins excluded)."""
    names = [n for n in sample_variables() if n in dataset and dataset[n].dim() == 1]
    names += [b for b in options.by if b not in BUILTIN_SPLITS and b not in names]
    for name in names:
        if name not in dataset or dataset[name].dim() != 1:
            raise ValueError(f"breakdown by {name!r}: needs a per-sample scalar field (N,); fields: {', '.join(dataset)}")
    return names

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
  sample's index in the audited dataset.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from equiaudit.engine import HeadBatch, OrbitSpec
from equiaudit.rotations import rotation_angle

__all__ = ["BUILTIN_SPLITS", "BreakdownOptions", "BreakdownCollector", "bin_rows", "field_bins"]

BUILTIN_SPLITS = ("element", "n_atoms", "angle", "channel", "sample")
_MAX_DISTINCT = 20  # integer fields with at most this many values get one bin per value


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

    Integers with few values: one bin per value. Values in ``[0, 1]`` (flow-matching
    ``t``): ``bins`` uniform bins over ``[0, 1]``. Otherwise ``bins`` quantile bins.
    """
    values = values.detach().cpu()
    if not values.is_floating_point():
        distinct = torch.unique(values)
        if len(distinct) <= _MAX_DISTINCT:
            return values.long(), {int(v): str(int(v)) for v in distinct.tolist()}
    values = values.double()
    if values.min() >= 0 and values.max() <= 1:
        edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    else:
        edges = torch.unique(torch.quantile(values, torch.linspace(0, 1, bins + 1, dtype=torch.float64)))
    inner = edges[1:-1]
    ids = torch.bucketize(values, inner, right=True)  # bin i is [edges[i], edges[i+1]), the last one closed
    last = len(edges) - 2
    return ids, {i: _range_name(edges[i].item(), edges[i + 1].item(), i == last) for i in range(last + 1)}


def _unit_values(terms: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
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


def _atom_count(dataset, spec: OrbitSpec, mask, z) -> int | None:
    """Length of the atom axis, from the mask, the elements or a ``point`` field ``(N, A, 3)``; None without atoms."""
    if mask is not None:
        return mask.shape[1]
    if z is not None and z.dim() == 2:
        return z.shape[1]
    points = [v for f, v in dataset.items() if spec.fields.get(f) == "point" and v.dim() == 3]
    return points[0].shape[1] if points else None


class BreakdownCollector:
    """Collects what the breakdowns need from the audit's batches (``on_result`` of
    :func:`equiaudit.engine.audit_model`), then makes the rows (:meth:`rows`).

    Kept per head: per-sample values ``(N,)``, per-rotation values ``(N, K)`` and, for
    heads with an axis 1 (atoms, channels), per-unit values ``(N, U)``: all small.
    """

    def __init__(self, spec: OrbitSpec):
        self.spec = spec
        self.weights = {h.name: h.weight for h in spec.heads}
        self.reps = {h.name: h.rep for h in spec.heads}
        self._parts: dict[str, dict[str, list[torch.Tensor]]] = {h.name: {} for h in spec.heads}

    def update(self, index: slice, batch: Mapping[str, torch.Tensor], results: Mapping[str, HeadBatch]) -> None:
        for head, result in results.items():
            parts = {
                "loss": result.loss_aug,
                "error": result.equiv_error,
                "loss_rot": result.loss_per_rotation,
                "error_rot": result.equiv_error_per_rotation,
            }
            if result.terms.loss_aug.dim() >= 2:
                parts["loss_unit"], parts["unit_weight"] = _unit_values(result.terms.loss_aug, result.weight)
                parts["error_unit"], _ = _unit_values(result.terms.equiv_error, result.weight)
            for key, value in parts.items():
                if value is not None:
                    self._parts[head].setdefault(key, []).append(value.detach().double().cpu())

    def _values(self) -> dict[str, dict[str, torch.Tensor]]:
        values = {head: {k: torch.cat(v) for k, v in parts.items()} for head, parts in self._parts.items()}
        # The weighted total exists wherever every head has the value (per sample, per rotation).
        values["total"] = {
            key: sum(self.weights[h] * values[h][key] for h in self.weights)
            for key in ("loss", "error", "loss_rot", "error_rot")
            if all(key in values[h] for h in self.weights)
        }
        return values

    def rows(
        self,
        dataset: Mapping[str, torch.Tensor],
        elements: torch.Tensor,
        options: BreakdownOptions = BreakdownOptions(),
        sample_index: torch.Tensor | None = None,
    ) -> list[dict]:
        """All rows: built-in splits that apply, then the ``by`` fields; ``total`` first in each.

        ``elements``: the audit's group elements ``(N, K, ...)`` (angles need matrices);
        ``sample_index`` ``(N,)``: the index to report for each sample (default its position).
        """
        values = self._values()
        heads = ["total", *self.weights]
        n = len(values["total"]["loss"])
        total_error = {h: values[h]["error"].mean().item() for h in heads}
        rows: list[dict] = []

        def per_sample(by: str, ids: torch.Tensor, names=None) -> None:
            for head in heads:
                v = values[head]
                weight = torch.full((n,), 1 / n, dtype=torch.float64)
                rows.extend(bin_rows(by, head, ids, v["loss"], v["error"], weight, names, total_error[head]))

        def per_unit(by: str, head: str, labels: torch.Tensor) -> None:
            v = values[head]
            rows.extend(bin_rows(
                by, head, labels.flatten(), v["loss_unit"].flatten(), v["error_unit"].flatten(),
                v["unit_weight"].flatten() / n, None, total_error[head],
            ))

        mask = dataset.get(self.spec.mask) if self.spec.mask else None
        z = dataset.get(options.elements)
        n_atoms = _atom_count(dataset, self.spec, mask, z)
        per_atom = [h for h in self.weights if self.reps[h] != "voxel" and "loss_unit" in values[h]
                    and n_atoms is not None and values[h]["loss_unit"].shape[1] == n_atoms]
        if z is not None and z.dim() == 2 and not z.is_floating_point():
            for head in per_atom:
                per_unit("element", head, z.long())
        if n_atoms is not None:
            counts = mask.sum(1) if mask is not None else torch.full((n,), n_atoms)
            per_sample("n_atoms", counts.long())
        if elements.dim() == 4 and elements.shape[-2:] == (3, 3):
            proper = elements * torch.linalg.det(elements)[..., None, None]  # angle of the rotation part
            degrees = torch.rad2deg(rotation_angle(proper))
            width = 180 / options.angle_bins
            ids = (degrees / width).floor().long().clamp(0, options.angle_bins - 1).flatten()
            names = {i: _range_name(i * width, (i + 1) * width, i == options.angle_bins - 1) for i in range(options.angle_bins)}
            k = elements.shape[1]
            weight = torch.full((n * k,), 1 / (n * k), dtype=torch.float64)
            for head in heads:
                v = values[head]
                rows.extend(bin_rows("angle", head, ids, v["loss_rot"].flatten(), v["error_rot"].flatten(), weight, names, total_error[head]))
        for head in (h for h in self.weights if self.reps[h] == "voxel" and "loss_unit" in values[h]):
            channels = torch.arange(values[head]["loss_unit"].shape[1]).expand(n, -1)
            per_unit("channel", head, channels)
        for name in self.fields(dataset, options):
            ids, names = field_bins(dataset[name], options.bins)
            per_sample(name, ids, names)
        index = torch.arange(n) if sample_index is None else sample_index
        for head in heads:
            v = values[head]
            worst = torch.argsort(v["error"], descending=True, stable=True)[: options.worst]
            weight = torch.full((len(worst),), 1 / n, dtype=torch.float64)
            names = {i: str(int(index[i])) for i in worst.tolist()}
            rows_head = bin_rows("sample", head, worst, v["loss"][worst], v["error"][worst], weight, names, total_error[head])
            order = {name: j for j, name in enumerate(names[i] for i in worst.tolist())}
            rows.extend(sorted(rows_head, key=lambda r: order[r["bin"]]))  # worst first
        return rows

    @staticmethod
    def fields(dataset: Mapping[str, torch.Tensor], options: BreakdownOptions) -> list[str]:
        """The per-sample fields split by: ``t`` when present, then ``options.by`` (built-ins excluded)."""
        names = ["t"] if "t" in dataset and dataset["t"].dim() == 1 else []
        names += [b for b in options.by if b not in BUILTIN_SPLITS and b not in names]
        for name in names:
            if name not in dataset or dataset[name].dim() != 1:
                raise ValueError(f"breakdown by {name!r}: needs a per-sample scalar field (N,); fields: {', '.join(dataset)}")
        return names

"""The equivariance-error metric (DESIGN.md §1). Pure math, no I/O.

For one sample, K orbit predictions mapped back to the sample's frame, ``P_k = g_k⁻¹·f(g_k·x)``,
and a loss ℓ convex in the prediction:

* ``loss_aug = mean_k ℓ(P_k, y)``                 (the augmented loss, unbiased)
* ``loss_sym = ℓ(mean_k P_k, y)``                  (the symmetrised model's loss)
* ``equiv_error = loss_aug − loss_sym ≥ 0``        (Jensen)

The plug-in ``equiv_error`` is biased low (by ``(K−1)/K`` when the K rotations are i.i.d.);
:func:`orbit_terms` corrects it (exactly for MSE, by the jackknife otherwise) unless the
rotations enumerate a whole finite group. Quasi-uniform rotation sets are randomised in
independent blocks and corrected over blocks (see ``docs/uncertainty.md``). Dataset
figures are ratios of means (:func:`summarize`), with a studentized bootstrap interval
over samples.

Layout follows torchmetrics: pure functions (:func:`orbit_terms`, :func:`reduce_per_sample`,
:func:`summarize`) here; the stateful side is :class:`equiaudit.EquivarianceMetric`, which
keeps per-sample values (:mod:`equiaudit.stats`) and reduces them with these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "LOSS_NAMES",
    "elementwise_loss",
    "OrbitTerms",
    "orbit_terms",
    "reduce_per_sample",
    "Summary",
    "summarize",
    "ratio_interval",
]

LOSS_NAMES = ("mse", "l1", "huber", "cross_entropy", "geodesic")


def elementwise_loss(loss: str, pred: torch.Tensor, target: torch.Tensor, huber_delta: float = 1.0) -> torch.Tensor:
    """Unreduced loss. ``pred`` broadcasts against ``target``.

    ``cross_entropy``: ``pred`` are logits ``(..., C)``; ``target`` holds class indices
    ``(...)`` (integer) or probabilities ``(..., C)``; the class axis is reduced.

    ``geodesic`` (rotation matrices ``(..., 3, 3)``, e.g. ``frame`` heads): the squared angle of
    ``proj(pred)ᵀ target``, ``proj`` the nearest rotation (SVD; an orbit mean of rotations is not
    one); the two matrix axes are reduced. **Not convex**: its equivariance error can be negative
    (``docs/metric.md``).
    """
    if loss == "mse":
        return (pred - target).square()
    if loss == "l1":
        return (pred - target).abs()
    if loss == "huber":
        err = (pred - target).abs()
        return torch.where(err < huber_delta, 0.5 * err.square(), huber_delta * (err - 0.5 * huber_delta))
    if loss == "cross_entropy":
        log_probs = pred - torch.logsumexp(pred, dim=-1, keepdim=True)
        if target.is_floating_point():
            return -(target * log_probs).sum(-1)
        index = target.long().unsqueeze(-1).expand(*log_probs.shape[:-1], 1)
        return -log_probs.gather(-1, index).squeeze(-1)
    if loss == "geodesic":
        from equiaudit.actions.frames import geodesic_angle, nearest_rotation

        if pred.shape[-2:] != (3, 3):
            raise ValueError(f"the geodesic loss compares rotation matrices (..., 3, 3); got {tuple(pred.shape[-2:])}")
        return geodesic_angle(nearest_rotation(pred), target).square()
    raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSS_NAMES)}")


@dataclass(frozen=True)
class OrbitTerms:
    """Per-element terms before the per-sample reduction, each ``(B, *E)``.

    ``E`` is the prediction's element shape (less the class axis for cross-entropy).
    ``equiv_error`` is already bias-corrected.

    The per-rotation fields ``(B, K, *E)`` split each term over the K rotations so that
    their mean over K is the term: ``loss_per_rotation[:, k] = ℓ(P_k, y)`` and
    ``equiv_error_per_rotation[:, k]`` is rotation k's jackknife pseudo-value (for MSE with
    i.i.d. rotations ``K/(K−1)·‖P_k − P̄‖²``; the plug-in ``ℓ(P_k, y) − ℓ(P̄, y)`` for an
    exact group; with blocks, the block's pseudo-value shared among its rotations).
    They let a breakdown attribute the error to rotations (e.g. by angle).
    """

    loss_aug: torch.Tensor
    equiv_error: torch.Tensor
    loss_per_rotation: torch.Tensor | None = None
    equiv_error_per_rotation: torch.Tensor | None = None


def orbit_terms(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss: str = "mse",
    *,
    exact: bool = False,
    blocks: int | None = None,
    huber_delta: float = 1.0,
) -> OrbitTerms:
    """Augmented loss and equivariance error per element.

    Args:
        pred: orbit predictions in the sample's frame, ``(B, K, *E)``.
        target: ``(B, *E)`` (class indices ``(B, *E[:-1])`` for cross-entropy).
        loss: one of :data:`LOSS_NAMES`.
        exact: the K rotations are a whole finite group: the plug-in is exact.
        blocks: M, the number of independently randomised blocks the K rotations form,
            contiguous and of equal size along axis 1 (a quasi-uniform set randomised by
            M independent Haar rotations). ``None`` means ``K``: i.i.d. rotations.

    The plug-in ``ℓ`` of the orbit mean ``P̄`` is biased because ``P̄`` is noisy. The
    block means ``P̄_m`` are i.i.d. with mean ``f_G`` (whatever the rotations inside a
    block), so the bias is removed by a jackknife over blocks:

    * MSE: ``EE = mean_k ‖P_k − P̄‖² + Σ_m ‖P̄_m − P̄‖² / (M(M−1))`` — the orbit variance
      plus an unbiased estimate of ``E‖P̄ − f_G‖²`` (exact; computed without
      cancellation, so an equivariant model reads at the float floor). For i.i.d.
      rotations (``M = K``) this is ``K/(K−1)`` times the orbit variance.
    * other losses: ``M·EE − (M−1)·mean_m EE₍₋ₘ₎``, EE₍₋ₘ₎ the plug-in without block m
      (exact for quadratic losses, removes the 1/M bias term otherwise).
    """
    b, k = pred.shape[:2]
    if k < 2:
        raise ValueError("the equivariance error needs at least 2 rotations per sample")
    m = k if blocks is None else blocks
    if m < 2 or k % m:
        raise ValueError(f"blocks={blocks} must be at least 2 and divide the {k} rotations per sample")
    target = target.unsqueeze(1)
    per_rotation = elementwise_loss(loss, pred, target, huber_delta)  # (B, K, *E)
    loss_aug = per_rotation.mean(1)
    mean_pred = pred.mean(1, keepdim=True)

    def by_block(x: torch.Tensor) -> torch.Tensor:  # (B, K, ...) -> (B, M, K/M, ...)
        return x.reshape(b, m, k // m, *x.shape[2:])

    def per_rotation_of(block_values: torch.Tensor) -> torch.Tensor:  # (B, M, ...) -> (B, K, ...)
        return block_values.unsqueeze(2).expand(b, m, k // m, *block_values.shape[2:]).reshape(b, k, *block_values.shape[2:])

    block_pred = by_block(pred).mean(2)  # (B, M, *E)
    if loss == "mse":
        contribution = (pred - mean_pred).square()
        if not exact:
            # Each rotation carries its block's share of the bias estimate: mean over K = EE.
            spread = (block_pred - mean_pred).square() / (m - 1)
            contribution = contribution + per_rotation_of(spread)
    else:
        contribution = per_rotation - elementwise_loss(loss, mean_pred, target, huber_delta)  # plug-in
        if not exact:
            # Leave-one-block-out: (B, M, *E). Block m's pseudo-value M·EE − (M−1)·EE₍₋ₘ₎
            # is spread over its rotations with their own loss deviations (which average
            # to zero within the block), so the mean over K is the jackknife estimate.
            block_aug = by_block(per_rotation).mean(2)
            loo_pred = (m * mean_pred - block_pred) / (m - 1)
            loo_aug = (m * loss_aug.unsqueeze(1) - block_aug) / (m - 1)
            loo_error = loo_aug - elementwise_loss(loss, loo_pred, target, huber_delta)
            pseudo = m * contribution.mean(1, keepdim=True) - (m - 1) * loo_error
            contribution = per_rotation_of(pseudo - block_aug) + per_rotation
    return OrbitTerms(loss_aug, contribution.mean(1), per_rotation, contribution)


def reduce_per_sample(terms: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all element axes of ``(B, *E)``, counting only ``weight > 0``: → ``(B,)``.

    ``weight`` is a mask ``(B, N)`` (per-atom) or anything broadcastable to ``terms``
    after trailing singleton axes are added (a mask of valid atoms or voxels).
    """
    b = terms.shape[0]
    if weight is None:
        return terms.reshape(b, -1).mean(1)
    weight = weight.to(terms.dtype)
    while weight.dim() < terms.dim():
        weight = weight.unsqueeze(-1)
    weight = weight.expand_as(terms)
    return (terms * weight).reshape(b, -1).sum(1) / weight.reshape(b, -1).sum(1).clamp_min(1e-300)


@dataclass(frozen=True)
class Summary:
    """Dataset-level figures for one head (or the weighted ``total``)."""

    loss_aug: float
    loss_sym: float
    equiv_error: float
    rel_equiv_error: float
    ci_low: float
    ci_high: float
    n_samples: int
    median_rel_equiv_error: float


def summarize(
    loss_aug: torch.Tensor,
    equiv_error: torch.Tensor,
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> Summary:
    """Ratio-of-means REE with a symmetric studentized (bootstrap-t) interval over samples.

    Args:
        loss_aug, equiv_error: per-sample values ``(N,)`` (bias-corrected EE).

    Each sample's rotations are drawn independently, so the pairs ``(L_aug,i, EE_i)`` are
    i.i.d. and carry both the data and the rotation noise; resampling samples resamples
    both. The interval is ``r ± q·se``: ``r = ΣEE/ΣL``, ``se`` the delta-method standard
    error of a ratio of means, and ``q`` the ``confidence`` quantile of ``|r* − r|/se*``
    over bootstrap resamples (see ``docs/uncertainty.md``; it keeps its coverage for
    small N and skewed per-sample errors, where a percentile interval is too short).
    ``loss_sym`` is ``loss_aug − equiv_error`` so the identity holds exactly.
    """
    loss_aug = loss_aug.double().cpu()
    equiv_error = equiv_error.double().cpu()
    n = loss_aug.numel()
    mean_aug = loss_aug.mean().item()
    mean_error = equiv_error.mean().item()
    rel = mean_error / mean_aug if mean_aug > 0 else math.nan
    with torch.no_grad():
        per_sample = equiv_error / loss_aug.where(loss_aug > 0, torch.nan)
        median = per_sample.nanmedian().item() if n else math.nan
    ci_low = ci_high = math.nan
    if mean_aug > 0:
        low, high = ratio_interval(loss_aug, equiv_error, n_bootstrap=n_bootstrap, confidence=confidence, generator=generator)
        ci_low, ci_high = low.item(), high.item()
    return Summary(
        loss_aug=mean_aug,
        loss_sym=mean_aug - mean_error,
        equiv_error=mean_error,
        rel_equiv_error=rel,
        ci_low=ci_low,
        ci_high=ci_high,
        n_samples=n,
        median_rel_equiv_error=median,
    )


def ratio_interval(
    loss_aug: torch.Tensor,
    equiv_error: torch.Tensor,
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric studentized bootstrap interval for ``ΣEE/ΣL`` over the last axis.

    Args:
        loss_aug, equiv_error: per-sample values ``(..., N)``; leading axes are independent
            datasets (they share the resampling draws).

    Returns:
        ``(low, high)``, each ``(...)``: ``r ± q·se`` with ``se`` the delta-method standard
        error of the ratio (influence values ``(EE_i − r·L_i)/mean(L)``) and ``q`` the
        ``confidence`` quantile of ``|r* − r|/se*`` over resamples. A resample is a count
        vector ``c``; with the centred numerators ``d = EE − r·L`` each resample statistic
        is a weighted sum (one matmul, no cancellation): ``r* − r = Σcd/ΣcL`` and
        ``se*² ∝ Σc(d − (r* − r)·L)²``. Resamples are drawn in chunks of about 2²¹ indices.
        Every sample with the same ratio (``se = 0``) gives ``(r, r)``. A resample of one
        distinct sample counts as infinitely extreme, so tiny N (≤ 3 at 95 %) gives NaN.

        The interval stays in [0, 1]: the quantity is a share (``0 ≤ EE ≤ L_aug`` by Jensen),
        so a bound beyond one end says nothing. Such an interval is shifted inside, keeping its
        width ``2·q·se`` (then truncated, if wider than [0, 1]): it contains the plain truncated
        interval, so it covers at least as often (truncation alone loses no coverage; the
        shift recovers what the symmetric interval lost on the far side near REE 0 or 1). The
        point estimate is not truncated (bias-corrected, it may read slightly below 0 at the
        float floor, or above 1).
    """
    aug = loss_aug.double().cpu()
    err = equiv_error.double().cpu()
    batch_shape, n = aug.shape[:-1], aug.shape[-1]
    aug, err = aug.reshape(-1, n), err.reshape(-1, n)  # (S, N)
    nan = torch.full(batch_shape, math.nan, dtype=torch.float64)
    if n < 2 or n_bootstrap <= 0:
        return nan, nan.clone()
    ratio = err.sum(1, keepdim=True) / aug.sum(1, keepdim=True)  # (S, 1)
    d = err - ratio * aug
    columns = torch.stack([aug, d, d * d, d * aug, aug * aug], -1)  # (S, N, 5)
    se = _ratio_se(columns[..., 2].sum(1), aug.sum(1), n)  # (S,)
    chunk = max(1, (1 << 21) // n)
    stats = []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        index = torch.randint(n, (b, n), generator=generator)
        counts = torch.zeros(b, n, dtype=torch.int32).scatter_add_(1, index, torch.ones(1, 1, dtype=torch.int32).expand(b, n))
        s_aug, s_d, s_dd, s_da, s_aa = torch.einsum("bn,snc->csb", counts.double(), columns)  # each (S, b)
        delta = s_d / s_aug  # r* − r
        t = delta.abs() / _ratio_se(s_dd - 2 * delta * s_da + delta.square() * s_aa, s_aug, n)
        stats.append(torch.where(counts.amax(1) == n, math.inf, t.nan_to_num(nan=0.0)))
    q = torch.quantile(torch.cat(stats, 1), confidence, dim=1)  # (S,)
    q = torch.where(q.isfinite(), q, math.nan)
    half = torch.where(se > 0, q * se, 0.0)
    ratio = ratio.squeeze(1)
    low, high = ratio - half, ratio + half
    # A share lies in [0, 1]: a bound beyond one end moves the other bound out by as much (the
    # interval keeps its width 2·q·se inside [0, 1]); a superset of the truncated interval, so
    # its coverage is at least that one's. Near REE 1 with few samples the estimate is often
    # above 1 and plain truncation covered 0.92; this covers 0.98 there (docs/uncertainty.md).
    low, high = torch.where(high > 1, 1 - 2 * half, low), torch.where(low < 0, 2 * half, high)
    low, high = low.clamp(0.0, 1.0), high.clamp(0.0, 1.0)  # NaN stays NaN
    return low.reshape(batch_shape), high.reshape(batch_shape)


def ratio_standard_error(loss_aug: torch.Tensor, equiv_error: torch.Tensor) -> float:
    """The delta-method standard error of ``ΣEE/ΣL`` over the N samples ``(N,)``: the ``se``
    of :func:`ratio_interval`, whose half-width is ``q·se`` (NaN for N < 2 or ``ΣL ≤ 0``)."""
    aug, err = loss_aug.double().cpu(), equiv_error.double().cpu()
    n = aug.numel()
    if n < 2 or not aug.sum() > 0:
        return math.nan
    d = err - err.sum() / aug.sum() * aug
    return float(_ratio_se(d.square().sum(), aug.sum(), n))


def _ratio_se(sum_sq: torch.Tensor, sum_aug: torch.Tensor, n: int) -> torch.Tensor:
    """Delta-method standard error from ``Σ(EE − r·L)²`` and ``ΣL`` over N samples."""
    return sum_sq.clamp_min(0).div(n * (n - 1)).sqrt() / (sum_aug / n)

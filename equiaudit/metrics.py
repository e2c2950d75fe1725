"""The equivariance-error metric (DESIGN.md §1). Pure math, no I/O.

For one sample, K orbit predictions mapped back to the sample's frame, ``P_k = g_k⁻¹·f(g_k·x)``,
and a loss ℓ convex in the prediction:

* ``loss_aug = mean_k ℓ(P_k, y)``                 (the augmented loss, unbiased)
* ``loss_sym = ℓ(mean_k P_k, y)``                  (the symmetrised model's loss)
* ``equiv_error = loss_aug − loss_sym ≥ 0``        (Jensen)

The plug-in ``equiv_error`` is biased low by ``(K−1)/K`` when the K rotations are i.i.d.;
:func:`orbit_terms` corrects it (exactly for MSE, by the jackknife otherwise) unless the
rotations enumerate a whole finite group. Dataset figures are ratios of means
(:func:`summarize`), with a bootstrap interval over samples.

Layout follows torchmetrics: pure functions (:func:`orbit_terms`, :func:`reduce_per_sample`,
:func:`summarize`) and a small stateful :class:`OrbitAccumulator` built on them.
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
    "OrbitAccumulator",
]

LOSS_NAMES = ("mse", "l1", "huber", "cross_entropy")


def elementwise_loss(loss: str, pred: torch.Tensor, target: torch.Tensor, huber_delta: float = 1.0) -> torch.Tensor:
    """Unreduced loss. ``pred`` broadcasts against ``target``.

    ``cross_entropy``: ``pred`` are logits ``(..., C)``; ``target`` holds class indices
    ``(...)`` (integer) or probabilities ``(..., C)``; the class axis is reduced.
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
    raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSS_NAMES)}")


@dataclass(frozen=True)
class OrbitTerms:
    """Per-element terms before the per-sample reduction, each ``(B, *E)``.

    ``E`` is the prediction's element shape (less the class axis for cross-entropy).
    ``equiv_error`` is already bias-corrected.

    The per-rotation fields ``(B, K, *E)`` split each term over the K rotations so that
    their mean over K is the term: ``loss_per_rotation[:, k] = ℓ(P_k, y)`` and
    ``equiv_error_per_rotation[:, k]`` is rotation k's jackknife pseudo-value (for MSE
    ``K/(K−1)·‖P_k − P̄‖²``; the plug-in ``ℓ(P_k, y) − ℓ(P̄, y)`` for an exact group).
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
    huber_delta: float = 1.0,
) -> OrbitTerms:
    """Augmented loss and equivariance error per element.

    Args:
        pred: orbit predictions in the sample's frame, ``(B, K, *E)``.
        target: ``(B, *E)`` (class indices ``(B, *E[:-1])`` for cross-entropy).
        loss: one of :data:`LOSS_NAMES`.
        exact: the K rotations are a whole finite group: the plug-in is exact.

    MSE uses the orbit variance directly (no cancellation, so an equivariant model
    reads at the float floor) times ``K/(K−1)``; other losses use the jackknife
    ``K·EE − (K−1)·mean_j EE₍₋ⱼ₎`` over the K rotations.
    """
    k = pred.shape[1]
    if k < 2:
        raise ValueError("the equivariance error needs at least 2 rotations per sample")
    target = target.unsqueeze(1)
    per_rotation = elementwise_loss(loss, pred, target, huber_delta)  # (B, K, *E)
    loss_aug = per_rotation.mean(1)
    mean_pred = pred.mean(1, keepdim=True)
    if loss == "mse":
        # K/(K−1)·‖P_k − P̄‖² is also rotation k's jackknife pseudo-value.
        contribution = (pred - mean_pred).square()
        if not exact:
            contribution = contribution * (k / (k - 1))
    else:
        contribution = per_rotation - elementwise_loss(loss, mean_pred, target, huber_delta)  # plug-in
        if not exact:
            # Leave-one-out means over rotations, all K at once: (B, K, *E); the pseudo-values
            # K·EE − (K−1)·EE₍₋ₖ₎ average to the jackknife estimate.
            loo_pred = (k * mean_pred - pred) / (k - 1)
            loo_aug = (k * loss_aug.unsqueeze(1) - per_rotation) / (k - 1)
            loo_error = loo_aug - elementwise_loss(loss, loo_pred, target, huber_delta)
            contribution = k * contribution.mean(1, keepdim=True) - (k - 1) * loo_error
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
    """Ratio-of-means REE with a percentile bootstrap interval over samples.

    Args:
        loss_aug, equiv_error: per-sample values ``(N,)`` (bias-corrected EE).

    Rotations are drawn independently per sample, so resampling samples also
    resamples the rotation noise: the interval covers both sources.
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
    if n >= 2 and n_bootstrap > 0 and mean_aug > 0:
        index = torch.randint(n, (n_bootstrap, n), generator=generator)
        ratios = equiv_error[index].sum(1) / loss_aug[index].sum(1)
        alpha = (1 - confidence) / 2
        q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
        ci_low, ci_high = torch.nanquantile(ratios, q).tolist()
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


class OrbitAccumulator:
    """Collects per-sample ``loss_aug`` and ``equiv_error`` per head; computes summaries.

    Per-sample values are kept (they are tiny) so that the bootstrap, the weighted
    total and any breakdown come from one set of numbers.
    """

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)
        self._aug: dict[str, list[torch.Tensor]] = {h: [] for h in weights}
        self._error: dict[str, list[torch.Tensor]] = {h: [] for h in weights}

    def update(self, head: str, loss_aug: torch.Tensor, equiv_error: torch.Tensor) -> None:
        """Add a batch: ``loss_aug`` and ``equiv_error`` of shape ``(B,)``."""
        self._aug[head].append(loss_aug.detach().double().cpu())
        self._error[head].append(equiv_error.detach().double().cpu())

    def per_sample(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{head: (loss_aug (N,), equiv_error (N,))}`` including ``total`` = Σ_h w_h · head."""
        out = {h: (torch.cat(self._aug[h]), torch.cat(self._error[h])) for h in self.weights}
        total_aug = sum(self.weights[h] * out[h][0] for h in self.weights)
        total_error = sum(self.weights[h] * out[h][1] for h in self.weights)
        return {"total": (total_aug, total_error), **out}

    def compute(self, *, n_bootstrap: int = 2000, seed: int = 0) -> dict[str, Summary]:
        """Summaries for ``total`` and each head. Same bootstrap draws for every head."""
        results = {}
        for head, (aug, error) in self.per_sample().items():
            generator = torch.Generator().manual_seed(seed)
            results[head] = summarize(aug, error, n_bootstrap=n_bootstrap, generator=generator)
        return results

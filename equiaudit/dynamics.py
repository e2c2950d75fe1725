"""Why symmetry is learnt fast: gradients, curvature and landscapes of ``L_sym`` and ``EE``. Pure.

The study behind equiaudit (Shen, Nowara, Maser & Cho, TMLR 2025) explains the fast fall of
the equivariance error by the split ``L_aug = L_sym + EE``: learning equivariance is easier
than the task — ``∇θ EE`` is small next to ``∇θ L_sym``, and the ``EE`` landscape is
smoother and better conditioned. This module computes those quantities for any model,
batch by batch, from an *objective closure*; it imports torch only and touches no files
and no terminal.

The objective contract (what a caller, e.g. the engine, provides)
=================================================================

``objective() -> Iterable[tuple[Tensor, Tensor]]`` (the :data:`Objective` type):

* each call iterates over the whole evaluation set, yielding per batch two 0-dim tensors
  ``(loss_sym_part, equiv_error_part)`` that are differentiable w.r.t. ``params``;
* their sums over batches are the dataset's ``L_sym`` and bias-corrected ``EE``, i.e. the
  parts are already weighted as in the dataset mean: ``Σ_{i∈batch} w_h·value_i / N``
  summed over heads h (:func:`orbit_contribution` does this for one head's orbit
  predictions ``(B, K, *E)``);
* every call sees the same samples, rotations and task noise (common random numbers, as
  the audit draws them once): Lanczos and the landscape call it many times and need the
  same function each time; the model is in eval mode (no dropout);
* no ``torch.no_grad``/``inference_mode`` inside; the model may itself use autograd
  (forces ``= −dE/dpos`` with ``create_graph=True``).

Everything here uses ``torch.autograd.grad`` (reverse mode; Hessian-vector products by
double backward with ``create_graph=True``), not ``torch.func``: ``torch.func`` transforms
refuse models that call ``torch.autograd.grad`` inside (force fields), and a closure over
batches would have to be rewritten as a pure function of the parameters. The cost is that
HVPs are reverse-over-reverse (about 2 extra backward passes per vector block) instead of
forward-over-reverse.

Conventions: ``params`` is a list of floating tensors with ``requires_grad`` (a model's
parameters or a subset); *vectors* in parameter space are lists of tensors shaped like
``params``; internally they are flattened to ``(n,)`` float64 on the parameters' device.
Every random draw takes an explicit ``torch.Generator`` (CPU; draws are moved to the
device).

Contents: :func:`gradient_split`, :func:`hessian_vector_product`, :func:`hessian_eigen`
(block Lanczos, :func:`block_lanczos` for any symmetric operator), :func:`loss_landscape`
and :func:`landscape_smoothness`, :func:`weight_statistics`, :func:`pearson`,
:func:`spearman`, and test-time twirling :func:`twirled_loss` with
:func:`share_of_equiv_error_removed` and :func:`smallest_k_removing`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from equiaudit.metrics import elementwise_loss, orbit_terms, reduce_per_sample

__all__ = [
    "Objective",
    "TERMS",
    "orbit_contribution",
    "GradientSplit",
    "gradient_split",
    "gradient_splits",
    "GradientAccumulator",
    "HeadObjective",
    "hessian_vector_product",
    "LanczosResult",
    "block_lanczos",
    "HessianEigen",
    "hessian_eigen",
    "random_direction",
    "Landscape",
    "loss_landscape",
    "quadratic_fit",
    "Smoothness",
    "landscape_smoothness",
    "WeightStats",
    "weight_statistics",
    "pearson",
    "spearman",
    "Twirl",
    "default_ks",
    "twirled_loss",
    "share_of_equiv_error_removed",
    "smallest_k_removing",
]

Objective = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""``objective()`` yields per batch ``(loss_sym_part, equiv_error_part)``, 0-dim, differentiable,
weighted so that their sums over batches are the dataset's ``L_sym`` and bias-corrected ``EE``."""

HeadObjective = Callable[[], Iterable[Mapping[str, tuple[torch.Tensor, torch.Tensor]]]]
"""``objective()`` yields per batch ``{head: (loss_sym_part, equiv_error_part)}``, each part as in
:data:`Objective` for that head alone (unweighted by the head's weight in the total)."""

TERMS = ("sym", "equiv", "aug")
"""Which objective a curvature routine differentiates: ``L_sym``, ``EE`` or ``L_aug = L_sym + EE``."""


# ----------------------------------------------------------------------------- adapter


def orbit_contribution(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss: str = "mse",
    *,
    n_total: int,
    weight: torch.Tensor | None = None,
    exact: bool = False,
    blocks: int | None = None,
    head_weight: float = 1.0,
    huber_delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's ``(loss_sym_part, equiv_error_part)`` from differentiable orbit predictions.

    Args:
        pred: ``P[b, k] = R[b,k]⁻¹·f(R[b,k]·x[b])``, ``(B, K, *E)``, with its autograd graph.
        target: ``(B, *E)`` (class indices ``(B, *E[:-1])`` for cross-entropy).
        n_total: N, the number of samples in the whole dataset (the parts are sums over the
            batch divided by N, so their sums over batches are dataset means).
        weight, exact, blocks, huber_delta: as in :func:`equiaudit.metrics.orbit_terms` and
            :func:`~equiaudit.metrics.reduce_per_sample` (element mask, whole finite group,
            independent blocks of a quasi-uniform set).
        head_weight: the head's weight ``w_h`` in the total; sum the parts of several heads.

    Returns:
        Two 0-dim tensors: ``Σ_b w_h·(L_aug,b − EE_b)/N`` and ``Σ_b w_h·EE_b/N``; ``EE`` is
        the bias-corrected estimate, so (being linear in the per-rotation losses for MSE, a
        jackknife otherwise) its gradient estimates the gradient of the population ``EE``
        without the ``(K−1)/K`` bias of the plug-in.
    """
    terms = orbit_terms(pred, target, loss, exact=exact, blocks=blocks, huber_delta=huber_delta)
    aug = reduce_per_sample(terms.loss_aug, weight)
    error = reduce_per_sample(terms.equiv_error, weight)
    scale = head_weight / n_total
    return (aug - error).sum() * scale, error.sum() * scale


# ----------------------------------------------------------------------------- helpers


def _check_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass the tensors to differentiate (e.g. list(model.parameters()))")
    for i, p in enumerate(params):
        if not (p.is_floating_point() and p.requires_grad):
            raise ValueError(f"params[{i}] must be a floating tensor with requires_grad=True")
    return params


def _flat(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate tensors into one ``(n,)`` float64 vector."""
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])


def _unflat(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``(..., n)`` → tensors ``(..., *p.shape)`` in each parameter's dtype and device."""
    lead = flat.shape[:-1]
    out, start = [], 0
    for p in params:
        piece = flat[..., start : start + p.numel()]
        out.append(piece.reshape(*lead, *p.shape).to(device=p.device, dtype=p.dtype))
        start += p.numel()
    return out


def _numel(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def _grad(output: torch.Tensor, params, *, create_graph=False, retain_graph=None, grad_outputs=None, batched=False):
    """``torch.autograd.grad`` with zeros for unused params and for outputs without a graph."""
    if not (isinstance(output, torch.Tensor) and output.requires_grad):
        shape = (grad_outputs.shape[0],) if batched else ()
        return [torch.zeros(*shape, *p.shape, dtype=p.dtype, device=p.device) for p in params]
    return list(
        torch.autograd.grad(
            output,
            params,
            grad_outputs=grad_outputs,
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
    )


def _term(loss_sym: torch.Tensor, equiv_error: torch.Tensor, term: str) -> torch.Tensor:
    if term == "sym":
        return loss_sym
    if term == "equiv":
        return equiv_error
    if term == "aug":
        return loss_sym + equiv_error
    raise ValueError(f"unknown term {term!r}; allowed: {', '.join(TERMS)}")


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64)


# ----------------------------------------------------------------------------- 1. gradient split


@dataclass(frozen=True)
class GradientSplit:
    """Gradients of ``L_sym`` and of the bias-corrected ``EE`` w.r.t. ``params``.

    Attributes:
        loss_sym, equiv_error: the dataset values (sums of the objective's parts).
        grad_sym, grad_equiv: ``∇θ L_sym`` and ``∇θ EE``, lists shaped like ``params``
            (float64, on the parameters' device); ``∇θ L_aug`` is their sum.
        grad_norm_sym, grad_norm_equiv, grad_norm_aug: Euclidean norms over all of ``params``.
        grad_norm_ratio: ``grad_norm_equiv / grad_norm_sym`` (inf if ``∇L_sym = 0``).
        grad_cosine: ``⟨∇L_sym, ∇EE⟩ / (‖∇L_sym‖‖∇EE‖)`` (NaN if either is 0).

    The gradients are unbiased estimates of the population gradients (rotations i.i.d. or
    in independent blocks); their *norms* are biased upward by the rotation noise,
    ``E‖ĝ‖² = ‖g‖² + tr Cov ĝ``, which shrinks as ``1/(N·K)``.
    """

    loss_sym: float
    equiv_error: float
    grad_sym: list[torch.Tensor]
    grad_equiv: list[torch.Tensor]
    grad_norm_sym: float
    grad_norm_equiv: float
    grad_norm_aug: float
    grad_norm_ratio: float
    grad_cosine: float

    @property
    def loss_aug(self) -> float:
        return self.loss_sym + self.equiv_error

    @property
    def grad_aug(self) -> list[torch.Tensor]:
        return [s + e for s, e in zip(self.grad_sym, self.grad_equiv)]


GRADIENT_METHODS = ("two_pass", "batched")


def gradient_split(objective: Objective, params: Sequence[torch.Tensor], *, method: str = "two_pass") -> GradientSplit:
    """``∇θ L_sym`` and ``∇θ EE`` from one forward pass per batch.

    Args:
        objective: see :data:`Objective` (called once).
        params: tensors with ``requires_grad``.
        method: ``two_pass`` (default): per batch, ``autograd.grad(EE, retain_graph=True)``
            then ``autograd.grad(L_sym)`` — two backward passes through one graph.
            ``batched``: one vmapped backward with the two cotangents ``(1, 0)``, ``(0, 1)``
            on ``stack([L_sym, EE])`` (``is_grads_batched=True``). Both give the same
            numbers; ``two_pass`` was the faster (``benchmarks/bench_dynamics.py``, 2-core
            CPU, 3-layer MLP of width 16/64/256, idle machine: the split costs 3.3/2.8/4.8
            forward passes of the objective, a training step's forward + backward
            2.2/1.7/3.9; under load, width 64/256: 3.2/3.1 against 2.9/2.9). ``batched``
            was 1.1–2.1× slower than ``two_pass`` in every run, and needs every op's
            backward to vmap.

    Returns:
        :class:`GradientSplit`; gradients are accumulated over batches in float64.
    """
    accumulator = GradientAccumulator(params, {"objective": 1.0}, method=method)
    for parts in objective():
        accumulator.add({"objective": parts})
    return accumulator.splits()["objective"]


def _split(total_sym: float, total_equiv: float, acc_sym: list[torch.Tensor], acc_equiv: list[torch.Tensor],
           device: torch.device) -> GradientSplit:
    """A :class:`GradientSplit` from accumulated values and gradients."""
    flat_sym, flat_equiv = _flat(acc_sym, device), _flat(acc_equiv, device)
    norm_sym = flat_sym.norm().item()
    norm_equiv = flat_equiv.norm().item()
    norm_aug = (flat_sym + flat_equiv).norm().item()
    if norm_sym > 0:
        ratio = norm_equiv / norm_sym
    else:
        ratio = math.nan if norm_equiv == 0 else math.inf
    cosine = (flat_sym @ flat_equiv).item() / (norm_sym * norm_equiv) if norm_sym > 0 and norm_equiv > 0 else math.nan
    return GradientSplit(
        loss_sym=total_sym,
        equiv_error=total_equiv,
        grad_sym=acc_sym,
        grad_equiv=acc_equiv,
        grad_norm_sym=norm_sym,
        grad_norm_equiv=norm_equiv,
        grad_norm_aug=norm_aug,
        grad_norm_ratio=ratio,
        grad_cosine=max(-1.0, min(1.0, cosine)) if math.isfinite(cosine) else cosine,
    )


class GradientAccumulator:
    """``∇θ L_sym`` and ``∇θ EE`` per head, accumulated batch by batch from parts with their graph.

    :meth:`add` takes one batch's ``{head: (loss_sym_part, equiv_error_part)}`` (as a
    :data:`HeadObjective` yields) and runs, per head, ``autograd.grad(EE_h)`` then
    ``autograd.grad(L_sym,h)`` through the shared graph (two backward passes per head; the
    graph is freed after the last; ``method="batched"``: one vmapped backward per head, as in
    :func:`gradient_split`). The audit calls it on its own orbit forward pass, so the
    split costs the backward passes only. :meth:`splits` gives every head's
    :class:`GradientSplit` and the weighted ``total`` (``Σ_h w_h ∇(head)``, no pass of its own).
    """

    def __init__(self, params: Sequence[torch.Tensor], weights: Mapping[str, float], *, method: str = "two_pass"):
        if method not in GRADIENT_METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(GRADIENT_METHODS)}")
        self.params = _check_params(params)
        self.weights = dict(weights)
        self.method = method
        self._acc = {h: ([torch.zeros_like(p, dtype=torch.float64) for p in self.params],
                         [torch.zeros_like(p, dtype=torch.float64) for p in self.params]) for h in self.weights}
        self._totals = {h: [0.0, 0.0] for h in self.weights}
        self.rows = 0  # how many samples the parts added so far cover (the caller's count)

    def add(self, parts: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rows: int = 0) -> None:
        """Accumulate one batch's parts (``rows``: how many samples they cover, counted in :attr:`rows`)."""
        self.rows += rows
        heads = list(self.weights)
        for i, head in enumerate(heads):
            loss_sym, equiv_error = (_as_tensor(v) for v in parts[head])
            last = i == len(heads) - 1
            if self.method == "batched" and loss_sym.requires_grad and equiv_error.requires_grad:
                both = torch.stack([loss_sym.reshape(()), equiv_error.reshape(()).to(loss_sym.dtype)])
                cotangents = torch.eye(2, dtype=both.dtype, device=both.device)
                grads = _grad(both, self.params, grad_outputs=cotangents, batched=True, retain_graph=not last)
                g_sym, g_equiv = [g[0] for g in grads], [g[1] for g in grads]
            else:
                g_equiv = _grad(equiv_error, self.params, retain_graph=True)
                g_sym = _grad(loss_sym, self.params, retain_graph=not last)
            for a, g in zip(self._acc[head][0], g_sym):
                a.add_(g.to(torch.float64))
            for a, g in zip(self._acc[head][1], g_equiv):
                a.add_(g.to(torch.float64))
            self._totals[head][0] += float(loss_sym.detach())
            self._totals[head][1] += float(equiv_error.detach())

    def splits(self) -> dict[str, GradientSplit]:
        """``{"total": GradientSplit, head: GradientSplit, ...}``."""
        heads, w, acc, totals = list(self.weights), self.weights, self._acc, self._totals
        device = self.params[0].device
        out = {"total": _split(
            sum(w[h] * totals[h][0] for h in heads), sum(w[h] * totals[h][1] for h in heads),
            [sum(w[h] * acc[h][0][j] for h in heads) for j in range(len(self.params))],
            [sum(w[h] * acc[h][1][j] for h in heads) for j in range(len(self.params))], device)}
        for h in heads:
            out[h] = _split(totals[h][0], totals[h][1], acc[h][0], acc[h][1], device)
        return out


def gradient_splits(objective: HeadObjective, params: Sequence[torch.Tensor], weights: Mapping[str, float]) -> dict[str, GradientSplit]:
    """:func:`gradient_split` for every head and for the weighted ``total`` from ONE forward
    pass per batch of ``objective`` (:class:`GradientAccumulator`: two backward passes per head).

    Returns:
        ``{"total": GradientSplit, head: GradientSplit, ...}``.
    """
    accumulator = GradientAccumulator(params, weights)
    for parts in objective():
        accumulator.add(parts)
    return accumulator.splits()


# ----------------------------------------------------------------------------- 2. curvature


def _hvp_blocks(
    objective: Objective,
    params: list[torch.Tensor],
    blocks: Mapping[str, torch.Tensor],
    *,
    batched: bool = False,
) -> dict[str, torch.Tensor]:
    """One pass over the data: ``{term: H_term @ V}`` for blocks ``V`` ``(p, n)`` float64.

    Per batch: one forward, one ``create_graph`` backward per term, then one double
    backward per term for its whole block (vmapped over the p vectors when ``batched``).
    """
    device = params[0].device
    out = {term: torch.zeros_like(v) for term, v in blocks.items()}
    cotangents = {term: _unflat(v, params) for term, v in blocks.items()}  # (p, *shape) each
    for loss_sym, equiv_error in objective():
        loss_sym, equiv_error = _as_tensor(loss_sym), _as_tensor(equiv_error)
        for term, v in cotangents.items():
            value = _term(loss_sym, equiv_error, term)
            grads = _grad(value, params, create_graph=True, retain_graph=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            if not live:
                continue  # gradient constant in θ: zero curvature
            p = blocks[term].shape[0]
            if batched and p > 1:
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    params,
                    grad_outputs=[v[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                    is_grads_batched=True,
                )
                out[term] += torch.cat([h.reshape(p, -1).to(device=device, dtype=torch.float64) for h in hv], dim=1)
            else:
                rows = []
                for j in range(p):
                    hv = torch.autograd.grad(
                        [grads[i] for i in live],
                        params,
                        grad_outputs=[v[i][j] for i in live],
                        retain_graph=True,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                    rows.append(_flat(hv, device))
                out[term] += torch.stack(rows)
    return out


def hessian_vector_product(
    objective: Objective,
    params: Sequence[torch.Tensor],
    vector: Sequence[torch.Tensor],
    term: str = "equiv",
) -> list[torch.Tensor]:
    """``H v`` for the Hessian of ``term`` (``sym``, ``equiv`` or ``aug``) w.r.t. ``params``.

    Args:
        vector: a direction, tensors shaped like ``params``.

    Returns:
        ``H v`` shaped like ``params`` (float64). One pass over the data: a forward, a
        ``create_graph`` backward and a double backward per batch; no dense Hessian.
    """
    params = _check_params(params)
    if term not in TERMS:
        raise ValueError(f"unknown term {term!r}; allowed: {', '.join(TERMS)}")
    v = _flat(vector, params[0].device).unsqueeze(0)
    hv = _hvp_blocks(objective, params, {term: v})[term][0]
    return [t.to(torch.float64) for t in _unflat(hv, params)]


@dataclass(frozen=True)
class LanczosResult:
    """Top eigenpairs of a symmetric operator from :func:`block_lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64, descending (algebraically largest first).
        eigenvectors: ``(k, n)`` float64, orthonormal rows.
        residuals: ``(k,)``, ``‖H u_i − λ_i u_i‖`` (from the Lanczos relation).
        converged: every residual ≤ ``tol·scale`` (``scale = max |Ritz value|``), or the
            Krylov space exhausted all n dimensions (then the values are exact).
        n_iterations: block iterations (operator calls).
        n_matvecs: total operator-vector products.
        ritz_values: every Ritz value of the final Krylov space, descending (the low end is
            not converged: Lanczos converges from the extremes, here the top).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    n_iterations: int
    n_matvecs: int
    ritz_values: torch.Tensor


class _BlockLanczos:
    """Block Lanczos with full reorthogonalisation, one step per operator call.

    The basis ``Q`` (rows) grows by one block per step; ``T = Qᵀ H Q`` is filled from the
    orthogonalisation coefficients (classical Gram–Schmidt, twice), so it is the exact
    Rayleigh quotient of the Krylov space up to rounding. A block that loses rank
    (an invariant subspace was found: e.g. a repeated eigenvalue) is refilled with seeded
    random vectors orthogonal to ``Q``, so eigenvalues of multiplicity up to the block size
    are all found, and the iteration goes on until the top k converge.
    """

    def __init__(self, n, k, block_size, tol, max_iter, generator, device):
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must be between 1 and the {n} parameters")
        self.n, self.k, self.tol, self.max_iter = n, k, tol, max_iter
        self.generator, self.device = generator, device
        p = min(block_size or k, n)
        self.basis = torch.empty(0, n, dtype=torch.float64, device=device)
        self.current = self._extend(self._random(p))  # rows of the block to multiply next
        self.basis = self.current
        self.t = torch.zeros(0, 0, dtype=torch.float64, device=device)
        self.iterations = self.matvecs = 0
        self.done = False
        self.result: LanczosResult | None = None

    def _random(self, p: int) -> torch.Tensor:
        return torch.randn(p, self.n, generator=self.generator, dtype=torch.float64).to(self.device)

    def _extend(self, candidates: torch.Tensor, accept_tol: float = 1e-10) -> torch.Tensor:
        """Orthonormalise candidate rows against the basis and each other (CGS, 3 passes);
        a row that vanishes (below ``accept_tol`` of its norm) is replaced by a random one;
        rows that cannot be placed (space exhausted) are dropped."""
        accepted: list[torch.Tensor] = []
        for row in candidates:
            for attempt in range(3):
                w = row if attempt == 0 else self._random(1)[0]
                before = w.norm()
                for _ in range(3):
                    if self.basis.shape[0]:
                        w = w - (self.basis @ w) @ self.basis
                    if accepted:
                        stack = torch.stack(accepted)
                        w = w - (stack @ w) @ stack
                norm = w.norm()
                if before > 0 and norm > accept_tol * before:
                    accepted.append(w / norm)
                    break
            if self.basis.shape[0] + len(accepted) >= self.n:
                break
        if not accepted:
            return torch.empty(0, self.n, dtype=torch.float64, device=self.device)
        return torch.stack(accepted)

    def update(self, hv: torch.Tensor) -> None:
        """Take ``H`` applied to the current block (rows, ``(p, n)``); advance one step."""
        p = self.current.shape[0]
        d = self.basis.shape[0]
        self.iterations += 1
        self.matvecs += p
        w = hv.clone()
        coefficients = torch.zeros(d, p, dtype=torch.float64, device=self.device)
        for _ in range(2):
            c = self.basis @ w.T  # (d, p)
            w = w - c.T @ self.basis
            coefficients += c
        t = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        t[: self.t.shape[0], : self.t.shape[0]] = self.t
        t[:, d - p :] = coefficients
        t[d - p :, :] = coefficients.T
        t[d - p :, d - p :] = 0.5 * (coefficients[d - p :] + coefficients[d - p :].T)
        self.t = t
        values, vectors = torch.linalg.eigh(t)
        values, vectors = values.flip(0), vectors.flip(1)  # descending
        # Lanczos relation: H Qᵀ S = Qᵀ S Θ + Wᵀ S_last (only the newest block has a residual
        # outside the basis), so Ritz pair i has residual ‖Wᵀ s_i,last‖.
        exhausted = d >= self.n
        if exhausted:
            residuals = torch.zeros(d, dtype=torch.float64, device=self.device)
            nxt = torch.empty(0, self.n, dtype=torch.float64, device=self.device)
        else:
            residuals = (vectors[d - p :, :].T @ w).norm(dim=1)
            nxt = self._extend(w)
        scale = values.abs().max() if d else torch.tensor(0.0)
        enough = d >= self.k
        converged = bool(enough and (residuals[: self.k] <= self.tol * scale).all())
        if converged or exhausted or self.iterations >= self.max_iter or nxt.shape[0] == 0:
            kk = min(self.k, d)
            self.result = LanczosResult(
                eigenvalues=values[:kk].clone(),
                eigenvectors=(vectors[:, :kk].T @ self.basis).clone(),
                residuals=residuals[:kk].clone(),
                converged=bool((converged or exhausted) and d >= self.k),
                n_iterations=self.iterations,
                n_matvecs=self.matvecs,
                ritz_values=values.clone(),
            )
            self.done = True
            return
        self.current = nxt
        self.basis = torch.cat([self.basis, nxt])


def block_lanczos(
    operator: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    k: int = 3,
    *,
    block_size: int | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> LanczosResult:
    """Top-k eigenpairs of a symmetric ``n × n`` operator known only through products.

    Args:
        operator: ``(p, n)`` float64 rows ``v_j`` → rows ``H v_j`` (same shape).
        k: how many eigenpairs (algebraically largest), small.
        block_size: vectors per step (default ``k``). Single-vector Lanczos finds one copy
            of a repeated eigenvalue; a block of p finds multiplicities up to p.
        tol: relative residual tolerance: stop when every top-k Ritz pair has
            ``‖H u − θ u‖ ≤ tol · max|θ|``. Then each eigenvalue is within
            ``tol·‖H‖`` of a true one (and within ``(tol‖H‖)²/gap`` for an isolated one);
            an eigenvector's angle to the true one is at most ``tol‖H‖/gap``. With float32
            products do not ask for much below 1e-5.
        max_iter: cap on block iterations (``max_iter · p`` products, as many basis vectors
            kept in memory: ``max_iter · p · n`` float64 numbers).
        generator: seeds the start block and any refill (default: seed 0).

    Returns:
        :class:`LanczosResult` (``converged`` False if the cap was reached first).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    state = _BlockLanczos(n, k, block_size, tol, max_iter, generator, torch.device(device))
    while not state.done:
        state.update(operator(state.current))
    return state.result


@dataclass(frozen=True)
class HessianEigen:
    """Top-k Hessian eigenpairs of one term (``sym``, ``equiv`` or ``aug``).

    Attributes:
        term: which objective.
        eigenvalues: ``(k,)`` float64, descending.
        eigenvectors: k unit directions, each a list of tensors shaped like ``params``
            (parameters' dtype); sign arbitrary.
        residuals, converged, n_iterations, ritz_values: see :class:`LanczosResult`.
        n_hvp: Hessian-vector products used; ``n_passes``: passes over the data, shared by
            every term computed in the same call (one pass gives each active term its block).
        tol: the relative tolerance used.
    """

    term: str
    eigenvalues: torch.Tensor
    eigenvectors: list[list[torch.Tensor]]
    residuals: torch.Tensor
    converged: bool
    n_iterations: int
    n_hvp: int
    n_passes: int
    tol: float
    ritz_values: torch.Tensor

    def positive_threshold(self) -> float:
        """Eigenvalues at or below ``tol · max|λ|`` are not told apart from zero."""
        return self.tol * float(self.eigenvalues.abs().max()) if self.eigenvalues.numel() else 0.0

    def smallest_positive(self) -> tuple[float, list[torch.Tensor]] | None:
        """The smallest eigenvalue found (of the top k) that is clearly positive, and its
        eigenvector; None if there is none. Of the top k only: it is not the Hessian's
        smallest positive eigenvalue (that would need the whole spectrum)."""
        threshold = self.positive_threshold()
        for i in range(self.eigenvalues.numel() - 1, -1, -1):
            if float(self.eigenvalues[i]) > threshold:
                return float(self.eigenvalues[i]), self.eigenvectors[i]
        return None

    def condition_proxy(self) -> float:
        """``λ_max / λ_min_pos`` over the eigenvalues found: the spread of the top k
        curvatures (a lower bound on the condition number); NaN without a positive one."""
        found = self.smallest_positive()
        if found is None or float(self.eigenvalues[0]) <= 0:
            return math.nan
        return float(self.eigenvalues[0]) / found[0]


def hessian_eigen(
    objective: Objective,
    params: Sequence[torch.Tensor],
    k: int = 3,
    *,
    terms: Sequence[str] = ("sym", "equiv"),
    block_size: int | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    generator: torch.Generator | None = None,
    batched: bool = False,
) -> dict[str, HessianEigen]:
    """Top-k eigenpairs of the Hessians of ``L_sym`` and ``EE`` (and/or ``L_aug``) w.r.t. ``params``.

    Block Lanczos (:func:`block_lanczos`) on Hessian-vector products by double backward;
    never a dense Hessian. The terms' iterations run in lockstep: each pass over the data
    computes one forward per batch and every active term's block of HVPs from it.

    Args:
        objective: see :data:`Objective`; called once per block iteration, and it must
            give the same function each call (same samples and rotations).
        k: eigenpairs per term (default 3). ``block_size`` (default k), ``tol`` (relative
            residual, default 1e-4), ``max_iter`` (block iterations, default 50): as in
            :func:`block_lanczos`.
        generator: seeds the start blocks (the same start for every term; default seed 0).
        batched: compute a block's HVPs in one vmapped double backward
            (``is_grads_batched``) instead of one double backward per vector (default).
            Measured (``benchmarks/bench_dynamics.py``, 2-core CPU, block of 3) the loop
            was faster in 4 of 5 runs (width 64: 9.5 against 12.8 forward passes; width
            256: 19.8 against 30.3; the exceptions: width 16, 9.0 against 7.3, and width 256
            on a loaded machine, 24.3 against 21.9); the loop also works for models whose
            backward does not vmap.

    Returns:
        ``{term: HessianEigen}``.
    """
    params = _check_params(params)
    terms = list(dict.fromkeys(terms))
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise ValueError(f"unknown term(s) {unknown}; allowed: {', '.join(TERMS)}")
    n, device = _numel(params), params[0].device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    states = {}
    for term in terms:  # the same start block for every term: each gets a copy of the generator's state
        copy = torch.Generator()
        copy.set_state(generator.get_state())
        states[term] = _BlockLanczos(n, k, block_size, tol, max_iter, copy, device)
    passes = 0
    while any(not s.done for s in states.values()):
        active = {term: s.current for term, s in states.items() if not s.done}
        products = _hvp_blocks(objective, params, active, batched=batched)
        passes += 1
        for term, hv in products.items():
            states[term].update(hv)
    out = {}
    for term, state in states.items():
        r = state.result
        out[term] = HessianEigen(
            term=term,
            eigenvalues=r.eigenvalues,
            eigenvectors=[_unflat(v, params) for v in r.eigenvectors],
            residuals=r.residuals,
            converged=r.converged,
            n_iterations=r.n_iterations,
            n_hvp=r.n_matvecs,
            n_passes=passes,
            tol=tol,
            ritz_values=r.ritz_values,
        )
    return out


# ----------------------------------------------------------------------------- 3. landscape


def random_direction(params: Sequence[torch.Tensor], generator: torch.Generator, *, orthogonal_to=()) -> list[torch.Tensor]:
    """A seeded Gaussian direction of unit norm (over all of ``params``), shaped like them,
    optionally orthogonalised against given directions (e.g. the top eigenvector)."""
    params = list(params)
    device = params[0].device
    v = torch.randn(_numel(params), generator=generator, dtype=torch.float64).to(device)
    for u in orthogonal_to:
        u = _flat(u, device)
        v = v - (v @ u) / (u @ u) * u
    return _unflat(v / v.norm(), params)


@dataclass(frozen=True)
class Landscape:
    """``L_sym`` and ``EE`` on the grid ``θ + α·a + β·b``.

    Attributes:
        alpha, beta: ``(N,)`` float64 grid coordinates along ``a`` and ``b``.
        loss_sym, equiv_error: ``(N, N)`` float64; ``[i, j]`` is at ``(alpha[i], beta[j])``.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    loss_sym: torch.Tensor
    equiv_error: torch.Tensor

    @property
    def loss_aug(self) -> torch.Tensor:
        return self.loss_sym + self.equiv_error


def loss_landscape(
    objective: Objective,
    params: Sequence[torch.Tensor],
    direction_a: Sequence[torch.Tensor],
    direction_b: Sequence[torch.Tensor],
    n: int = 20,
    span: float | tuple[float, float] = 1.0,
    *,
    needs_autograd: bool = True,
) -> Landscape:
    """Evaluate ``L_sym`` and ``EE`` at ``θ + α·a + β·b`` on an ``n × n`` grid.

    Args:
        direction_a, direction_b: directions shaped like ``params``, used as given (unit
            eigenvectors from :func:`hessian_eigen`, or :func:`random_direction`).
        n: grid points per axis.
        span: ``α, β ∈ [−span, span]`` (or ``[span[0], span[1]]``), in units of the
            directions' norms.
        needs_autograd: the objective differentiates inside (forces ``= −dE/dpos``), so it
            runs with gradients enabled (results detached); False runs it under
            ``torch.no_grad`` (faster).

    The parameters are changed in place and restored bitwise afterwards, even if the
    objective raises. ``n²`` passes over the data.
    """
    params = _check_params(params)
    low, high = (-float(span), float(span)) if not isinstance(span, tuple) else (float(span[0]), float(span[1]))
    alpha = torch.linspace(low, high, n, dtype=torch.float64)
    beta = alpha.clone()
    a = [d.detach().to(device=p.device, dtype=torch.float64) for d, p in zip(direction_a, params)]
    b = [d.detach().to(device=p.device, dtype=torch.float64) for d, p in zip(direction_b, params)]
    if len(a) != len(params) or len(b) != len(params) or any(x.shape != p.shape for x, p in zip(a + b, params + params)):
        raise ValueError("directions must be lists of tensors shaped like params")
    saved = [p.detach().clone() for p in params]
    loss_sym = torch.empty(n, n, dtype=torch.float64)
    equiv_error = torch.empty(n, n, dtype=torch.float64)
    mode = contextlib.nullcontext() if needs_autograd else torch.no_grad()
    try:
        for i in range(n):
            for j in range(n):
                with torch.no_grad():
                    for p, theta, da, db in zip(params, saved, a, b):
                        p.copy_(theta.double() + alpha[i].item() * da + beta[j].item() * db)
                total_sym = total_equiv = 0.0
                with mode:
                    for part_sym, part_equiv in objective():
                        total_sym += float(_as_tensor(part_sym).detach())
                        total_equiv += float(_as_tensor(part_equiv).detach())
                loss_sym[i, j], equiv_error[i, j] = total_sym, total_equiv
    finally:
        with torch.no_grad():
            for p, theta in zip(params, saved):
                p.copy_(theta)
    return Landscape(alpha, beta, loss_sym, equiv_error)


def quadratic_fit(alpha: torch.Tensor, beta: torch.Tensor, surface: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least-squares ``z ≈ c₀ + c₁α + c₂β + c₃α² + c₄αβ + c₅β²`` over the finite grid points.

    Returns:
        ``(coefficients (6,), R²)``; ``R² = 1 − SS_res/SS_tot`` (NaN if the surface is
        constant, i.e. ``SS_tot = 0``, or fewer than 6 finite points).
    """
    aa, bb = torch.meshgrid(alpha.double(), beta.double(), indexing="ij")
    z = surface.double()
    keep = z.isfinite()
    aa, bb, z = aa[keep], bb[keep], z[keep]
    if z.numel() < 6:
        return torch.full((6,), math.nan, dtype=torch.float64), math.nan
    design = torch.stack([torch.ones_like(aa), aa, bb, aa * aa, aa * bb, bb * bb], 1)
    coefficients = torch.linalg.lstsq(design, z.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residual = z - design @ coefficients
    ss_tot = (z - z.mean()).square().sum().item()
    ss_res = residual.square().sum().item()
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return coefficients, r2


@dataclass(frozen=True)
class Smoothness:
    """How quadratic (smooth) each landscape surface is.

    Attributes:
        r2_sym, r2_equiv: R² of the least-squares quadratic fit of ``L_sym`` and ``EE``.
        curvature_sym, curvature_equiv: ``(2, 2)`` Hessian of the fitted quadratic in
            ``(α, β)``; along unit eigenvector directions its diagonal should match the
            Hessian eigenvalues (a consistency check on the grid's span).
        roughness_sym, roughness_equiv: RMS residual of the fit over the surface's range
            (max − min): 0 for an exact quadratic; NaN for a constant surface.
        condition_sym, condition_equiv: ``λ_max/λ_min_pos`` from :class:`HessianEigen`
            when given (NaN otherwise).
    """

    r2_sym: float
    r2_equiv: float
    curvature_sym: torch.Tensor
    curvature_equiv: torch.Tensor
    roughness_sym: float
    roughness_equiv: float
    condition_sym: float = math.nan
    condition_equiv: float = math.nan


def _surface_summary(landscape: Landscape, surface: torch.Tensor) -> tuple[float, torch.Tensor, float]:
    c, r2 = quadratic_fit(landscape.alpha, landscape.beta, surface)
    curvature = torch.stack([torch.stack([2 * c[3], c[4]]), torch.stack([c[4], 2 * c[5]])])
    aa, bb = torch.meshgrid(landscape.alpha, landscape.beta, indexing="ij")
    fitted = c[0] + c[1] * aa + c[2] * bb + c[3] * aa * aa + c[4] * aa * bb + c[5] * bb * bb
    finite = surface.isfinite()
    spread = (surface[finite].max() - surface[finite].min()).item() if finite.any() else 0.0
    rms = (surface - fitted)[finite].square().mean().sqrt().item() if finite.any() else math.nan
    return r2, curvature, (rms / spread if spread > 0 else math.nan)


def landscape_smoothness(
    landscape: Landscape,
    eigen: Mapping[str, HessianEigen] | None = None,
) -> Smoothness:
    """Quadratic-fit R², fitted curvatures and roughness of both surfaces (and the
    curvature condition proxies when ``eigen`` from :func:`hessian_eigen` is given)."""
    r2_s, curv_s, rough_s = _surface_summary(landscape, landscape.loss_sym)
    r2_e, curv_e, rough_e = _surface_summary(landscape, landscape.equiv_error)
    eigen = eigen or {}
    return Smoothness(
        r2_sym=r2_s,
        r2_equiv=r2_e,
        curvature_sym=curv_s,
        curvature_equiv=curv_e,
        roughness_sym=rough_s,
        roughness_equiv=rough_e,
        condition_sym=eigen["sym"].condition_proxy() if "sym" in eigen else math.nan,
        condition_equiv=eigen["equiv"].condition_proxy() if "equiv" in eigen else math.nan,
    )


# ----------------------------------------------------------------------------- 4. weights, correlations


@dataclass(frozen=True)
class WeightStats:
    """Statistics of one tensor's entries (float64).

    Attributes:
        numel: number of entries.
        mean, variance: mean and population variance (``ddof = 0``, so that
            ``variance + mean² = mean_square`` exactly).
        mean_square: ``mean(w²)``.
        normalized_variance: ``variance / mean_square`` ∈ [0, 1] (NaN for an all-zero tensor).

    Why ``var / mean(w²)`` and not ``var / mean²``: weight matrices are initialised and
    stay near zero mean, so ``var/mean²`` divides by a number that is noise and explodes;
    ``var/mean(w²) = 1 − mean²/mean(w²)`` is scale-free (unchanged by ``w → c·w``), bounded,
    and reads 1 for a zero-mean spread, 0 for a constant tensor.
    """

    numel: int
    mean: float
    variance: float
    mean_square: float
    normalized_variance: float


def weight_statistics(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> dict[str, WeightStats]:
    """:class:`WeightStats` per named tensor, e.g. ``weight_statistics(model.named_parameters())``."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    out = {}
    for name, tensor in items:
        w = tensor.detach().double().reshape(-1)
        if w.numel() == 0:
            out[name] = WeightStats(0, math.nan, math.nan, math.nan, math.nan)
            continue
        mean = w.mean().item()
        variance = (w - mean).square().mean().item()
        mean_square = w.square().mean().item()
        normalized = variance / mean_square if mean_square > 0 else math.nan
        out[name] = WeightStats(w.numel(), mean, variance, mean_square, normalized)
    return out


def _paired(x, y, log: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length ({x.numel()} != {y.numel()})")
    if log:
        with torch.no_grad():
            x = torch.where(x > 0, x, math.nan).log()
            y = torch.where(y > 0, y, math.nan).log()
    keep = x.isfinite() & y.isfinite()
    return x[keep], y[keep]


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 3:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx.square().sum() * dy.square().sum()).sqrt().item()
    if denominator == 0:
        return math.nan
    return max(-1.0, min(1.0, (dx @ dy).item() / denominator))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing the mean of their ranks."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts  # ranks before each distinct value
    return (start.double() + (counts.double() + 1) / 2)[inverse]


def pearson(x, y, *, log: bool = True) -> float:
    """Pearson correlation of ``log x`` and ``log y`` (``log=False``: of the raw values).

    Pairs where either value is non-finite (or, with ``log``, not positive) are dropped;
    NaN for fewer than 3 remaining pairs or a constant series.
    """
    return _pearson(*_paired(x, y, log))


def spearman(x, y, *, log: bool = True) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties are handled).

    The log does not change ranks; with ``log`` it only drops non-positive values, as
    :func:`pearson` does, so both correlations use the same points. NaN for fewer than 3
    finite pairs or a constant series.
    """
    x, y = _paired(x, y, log)
    if x.numel() < 3:
        return math.nan
    return _pearson(_average_ranks(x), _average_ranks(y))


# ----------------------------------------------------------------------------- 5. test-time twirling


@dataclass(frozen=True)
class Twirl:
    """Held-out loss of the model averaged over k rotations, per sample.

    Attributes:
        ks: the k values, ascending (``ks[0] = 1`` by default).
        loss_twirled: ``(B, n_k)``: an unbiased estimate of ``E ℓ(mean of k i.i.d.
            rotated predictions, y)`` per sample; column ``k = 1`` is ``loss_aug``.
        loss_aug, loss_sym, equiv_error: ``(B,)``, as the audit computes them
            (bias-corrected ``EE``, ``loss_sym = loss_aug − equiv_error``).
        method: ``formula`` (MSE: ``L_sym + EE/k``) or ``ustat`` (U-statistic over subsets).
        n_subsets: subsets (or tuples) averaged for each k.
        exhaustive: whether each k used all of them (else a seeded random sample).
    """

    ks: tuple[int, ...]
    loss_twirled: torch.Tensor
    loss_aug: torch.Tensor
    loss_sym: torch.Tensor
    equiv_error: torch.Tensor
    method: str
    n_subsets: tuple[int, ...]
    exhaustive: tuple[bool, ...]

    def share_of_equiv_error_removed(self) -> torch.Tensor:
        """``(n_k,)``, see :func:`share_of_equiv_error_removed` (this batch only)."""
        return share_of_equiv_error_removed(self.loss_aug, self.loss_twirled, self.equiv_error)


def default_ks(k: int) -> tuple[int, ...]:
    """``1, 2, 4, …`` up to K, and K itself."""
    ks, value = [], 1
    while value < k:
        ks.append(value)
        value *= 2
    return tuple(ks + [k])


TWIRL_METHODS = ("auto", "formula", "ustat")


def _subset_weights(
    k_total: int, k: int, with_replacement: bool, max_subsets: int, generator: torch.Generator
) -> tuple[torch.Tensor, bool]:
    """Averaging weights ``(S, K)``: row s is ``1/k`` on subset s (counts/k with replacement)."""
    count = k_total**k if with_replacement else math.comb(k_total, k)
    if count <= max_subsets:
        # At most max_subsets rows (torch.combinations would build all K^k tuples first).
        tuples = itertools.product(range(k_total), repeat=k) if with_replacement else itertools.combinations(range(k_total), k)
        index = torch.tensor(list(tuples), dtype=torch.long).reshape(-1, k)
        exhaustive = True
    else:
        if with_replacement:
            index = torch.randint(k_total, (max_subsets, k), generator=generator)
        else:
            index = torch.rand(max_subsets, k_total, generator=generator).argsort(1)[:, :k]
        exhaustive = False
    weights = torch.zeros(index.shape[0], k_total, dtype=torch.float64)
    weights.scatter_add_(1, index, torch.full(index.shape, 1.0 / k, dtype=torch.float64))
    return weights, exhaustive


def twirled_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss: str = "mse",
    *,
    ks: Sequence[int] | None = None,
    weight: torch.Tensor | None = None,
    exact: bool = False,
    blocks: int | None = None,
    method: str = "auto",
    max_subsets: int = 256,
    generator: torch.Generator | None = None,
    huber_delta: float = 1.0,
    max_elements: int = 1 << 22,
) -> Twirl:
    """Test-time twirling: the loss of ``mean_{j≤k} R_j⁻¹·f(R_j·x)`` for k i.i.d. rotations.

    Args:
        pred: orbit predictions mapped back, ``(B, K, *E)`` (what the audit computes).
        target, loss, weight, exact, blocks, huber_delta: as in
            :func:`~equiaudit.metrics.orbit_terms` / :func:`~equiaudit.metrics.reduce_per_sample`.
        ks: k values, each in ``1..K`` (default :func:`default_ks`).
        method: ``formula`` (MSE only): the exact identity ``E ℓ(mean of k) = L_sym + EE/k``
            from the unbiased per-element ``L_sym`` and ``EE`` (valid for i.i.d., blocked
            and exact rotation sets; for an exact finite group, k i.i.d. uniform elements).
            ``ustat``: for any loss, the mean of ``ℓ(mean over S, y)`` over k-subsets S of
            the K rotations: an unbiased U-statistic, as the K rotations are i.i.d. given x
            (all subsets when ``C(K, k) ≤ max_subsets``, else ``max_subsets`` seeded random
            subsets, an incomplete U-statistic, still unbiased). With ``exact`` the
            "subsets" are k-tuples drawn with replacement (k i.i.d. uniform group
            elements). For MSE the complete U-statistic equals the formula exactly.
            ``auto``: ``formula`` for MSE, else ``ustat``.
        generator: seeds the random subsets (default: seed 0); the same subsets serve every
            sample of the batch.
        max_elements: bound on the temporary ``(B, S, *E)`` per chunk of subsets.

    Returns:
        :class:`Twirl` with ``loss_twirled`` ``(B, n_k)`` in float64 (average over batches
        as the audit does: per-sample values, then means).

    Raises:
        ValueError: the U-statistic with blocked (quasi-uniform) rotations, whose rotations
            inside a block are not independent — use MSE's formula or i.i.d. rotations.
    """
    b, k_total = pred.shape[:2]
    if method not in TWIRL_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(TWIRL_METHODS)}")
    ks = tuple(default_ks(k_total) if ks is None else sorted(int(k) for k in ks))
    if any(not 1 <= k <= k_total for k in ks):
        raise ValueError(f"every k must be between 1 and the {k_total} rotations per sample (got {list(ks)})")
    if method == "auto":
        method = "formula" if loss == "mse" else "ustat"
    if method == "formula" and loss != "mse":
        raise ValueError(f"the formula L_sym + EE/k holds for mse only, not {loss!r}: use method='ustat'")
    iid_blocks = blocks is None or blocks == k_total
    if method == "ustat" and not exact and not iid_blocks:
        raise ValueError(
            f"the U-statistic needs i.i.d. rotations; these form {blocks} blocks of {k_total // blocks} "
            "(a quasi-uniform set): use loss mse (formula) or i.i.d. Haar rotations"
        )
    pred = pred.detach().double()
    target = target.detach()
    target = target.double() if target.is_floating_point() else target
    terms = orbit_terms(pred, target, loss, exact=exact, blocks=blocks, huber_delta=huber_delta)
    loss_aug = reduce_per_sample(terms.loss_aug, weight)
    equiv_error = reduce_per_sample(terms.equiv_error, weight)
    loss_sym = loss_aug - equiv_error
    columns, n_subsets, exhaustive = [], [], []
    if method == "formula":
        element_sym = terms.loss_aug - terms.equiv_error
        for k in ks:
            columns.append(reduce_per_sample(element_sym + terms.equiv_error / k, weight))
            n_subsets.append(k_total**k if exact else math.comb(k_total, k))
            exhaustive.append(True)
    else:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        flat = pred.reshape(b, k_total, -1)  # (B, K, F)
        target_s = target.unsqueeze(1)
        per_subset_elements = max(1, b * flat.shape[2])
        for k in ks:
            weights, full = _subset_weights(k_total, k, exact and k > 1, max_subsets, generator)
            weights = weights.to(pred.device)
            total = torch.zeros(b, dtype=torch.float64, device=pred.device)
            chunk = max(1, max_elements // per_subset_elements)
            for start in range(0, weights.shape[0], chunk):
                w = weights[start : start + chunk]  # (S, K)
                mean = torch.einsum("sk,bkf->bsf", w, flat).reshape(b, w.shape[0], *pred.shape[2:])
                values = elementwise_loss(loss, mean, target_s, huber_delta)  # (B, S, *E')
                values = values.movedim(1, -1)  # (B, *E', S): the weight broadcasts, S is averaged too
                total += reduce_per_sample(values, weight) * w.shape[0]
            columns.append(total / weights.shape[0])
            n_subsets.append(weights.shape[0])
            exhaustive.append(full)
    return Twirl(
        ks=ks,
        loss_twirled=torch.stack(columns, 1),
        loss_aug=loss_aug,
        loss_sym=loss_sym,
        equiv_error=equiv_error,
        method=method,
        n_subsets=tuple(n_subsets),
        exhaustive=tuple(exhaustive),
    )


def share_of_equiv_error_removed(loss_aug: torch.Tensor, loss_twirled: torch.Tensor, equiv_error: torch.Tensor) -> torch.Tensor:
    """``(mean L_aug − mean L_twirled(k)) / mean EE`` per k, ratios of means as the audit's REE.

    Args:
        loss_aug, equiv_error: per-sample ``(N,)``; loss_twirled: ``(N, n_k)``
            (concatenate :class:`Twirl` fields over batches first).

    Returns:
        ``(n_k,)`` float64: 0 at k = 1; ``1 − 1/k`` for MSE; NaN if ``mean EE ≤ 0``.
    """
    mean_error = equiv_error.double().mean()
    gain = loss_aug.double().mean() - loss_twirled.double().mean(0)
    return torch.where(mean_error > 0, gain / mean_error, torch.full_like(gain, math.nan))


def smallest_k_removing(ks: Sequence[int], share: torch.Tensor | Sequence[float], threshold: float = 0.9) -> int | None:
    """The smallest k whose share of the equivariance error removed is ≥ ``threshold``; None if none."""
    for k, s in zip(ks, torch.as_tensor(share, dtype=torch.float64).tolist()):
        if math.isfinite(s) and s >= threshold:
            return int(k)
    return None

"""Batched orbit evaluation of one model over an in-memory dataset.

For a batch of B samples and group elements ``(B, K, ...)`` (rotations ``(B, K, 3, 3)``)
the engine builds the B·K transformed inputs (one tensor per field, no loop over rotations
or samples), runs the model on them in as few forward passes as ``chunk_size`` allows,
maps every output back to its sample's frame (``P = g⁻¹·f(g·x)``, in float64) and reduces
the orbit to per-sample statistics with :func:`equiaudit.metrics.orbit_terms`, corrected
as the spec's group says (``exact``, ``blocks``).

The module touches no files: batches, elements and models come in as objects; looping
over a dataset's batches is :mod:`equiaudit.plan`'s job.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from equiaudit import actions, representations
from equiaudit.groups import Group, make_group
from equiaudit.errors import ModelOutputError
from equiaudit.metrics import OrbitTerms, orbit_terms, reduce_per_sample

__all__ = ["HeadSpec", "OrbitSpec", "HeadBatch", "evaluate_orbits", "evaluate_round_trip", "call_model", "head_output", "head_weight",
           "model_dtype", "orbit_inputs"]


@dataclass(frozen=True)
class HeadSpec:
    """One supervised output: compare model output ``output`` (default ``name``) to ``target``.

    ``sample_weight``: a per-sample field ``(B,)`` multiplying this head's loss, sample by
    sample (EDM's ``λ(σ)``); set by a task preset. None: every sample weighs the same.
    """

    name: str
    rep: str
    target: str
    loss: str = "mse"
    weight: float = 1.0
    output: str | None = None
    huber_delta: float = 1.0
    sample_weight: str | None = None

    @property
    def output_name(self) -> str:
        return self.output or self.name


@dataclass(frozen=True)
class OrbitSpec:
    """What to rotate and how to call the model.

    Attributes:
        fields: representation of each dataset field (``pos: point``...); fields not
            listed are invariant (``scalar``).
        heads: the supervised outputs.
        inputs: dataset fields passed positionally, in order; or a mapping
            ``{argument_name: field}`` passed as keywords.
        outputs: names for a tuple (or single tensor) return; a dict return is used by key.
        mask: name of the ``(B, N)`` valid-atom mask field, if any: it centres ``point``
            fields and restricts per-atom losses to valid atoms.
        grad: the model differentiates through its inputs (forces by autograd):
            evaluate with gradients enabled and floating inputs requiring grad.
        chunk_size: the most rotated samples per forward pass.
        head_weights: per-head element weights (e.g. a spherical voxel mask
            ``(1, 1, D, H, W)``) that replace the default valid-atom mask.
        orbit_inputs: optional ``(batch, rotations) -> {field: (B, K, ...)}`` that builds
            some fields' orbits itself (e.g. voxelizing rotated atoms, exact where
            resampling a grid is not); other fields are rotated by their representation.
        group: the :class:`~equiaudit.groups.Group` whose elements the orbits use: how they
            act (``group.action``) and how the orbit mean is corrected (``exact``, ``blocks``).
            Default: i.i.d. Haar rotations.
        autocast: run the model under ``torch.autocast`` at this dtype (e.g. bfloat16).
    """

    fields: Mapping[str, str]
    heads: tuple[HeadSpec, ...]
    inputs: Sequence[str] | Mapping[str, str]
    outputs: Sequence[str] | None = None
    mask: str | None = "mask"
    grad: bool = False
    chunk_size: int = 8192
    head_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    orbit_inputs: Callable[[Mapping[str, torch.Tensor], torch.Tensor], dict[str, torch.Tensor]] | None = None
    group: Group = field(default_factory=lambda: make_group("so3", 32, {"sampling": "haar"}))
    autocast: torch.dtype | None = None

    @property
    def input_fields(self) -> list[str]:
        return list(self.inputs.values()) if isinstance(self.inputs, Mapping) else list(self.inputs)


@dataclass(frozen=True)
class HeadBatch:
    """One head on one batch: per-element terms ``(B, *E)`` and per-sample values ``(B,)``.

    ``weight`` is the element weight of the per-sample reduction (valid-atom mask, voxel
    mask or None); ``*_per_rotation`` ``(B, K)`` are the per-sample values split over the
    K group elements (their mean over K is the per-sample value). ``pred`` and ``target``
    are kept only when asked (``keep_predictions``: test-time twirling needs the orbit).
    """

    terms: OrbitTerms
    loss_aug: torch.Tensor
    equiv_error: torch.Tensor
    weight: torch.Tensor | None = None
    loss_per_rotation: torch.Tensor | None = None
    equiv_error_per_rotation: torch.Tensor | None = None
    pred: torch.Tensor | None = None  # (B, K, *E) orbit predictions mapped back, when kept
    target: torch.Tensor | None = None  # (B, *E) the target they were compared with, when kept

    def detached(self) -> "HeadBatch":
        """The same values cut from the autograd graph (the statistics of a differentiable pass need none)."""
        return _detached(self)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _detached(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


def model_dtype(model: Callable) -> torch.dtype:
    """The dtype of the model's floating parameters (inputs are cast to it); default otherwise."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.get_default_dtype()


def call_model(model: Callable, spec: OrbitSpec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call the model as the spec says and name its outputs."""
    if isinstance(spec.inputs, Mapping):
        out = model(**{arg: inputs[f] for arg, f in spec.inputs.items()})
    else:
        out = model(*(inputs[f] for f in spec.inputs))
    if isinstance(out, Mapping):
        return dict(out)
    if isinstance(out, torch.Tensor):
        out = (out,)
    names = list(spec.outputs or [h.output_name for h in spec.heads])
    if len(names) != len(out):
        raise ModelOutputError(
            f"the model returned {len(out)} output(s) but model.outputs names {len(names)}: {names}"
        )
    return dict(zip(names, out))


def _forward_orbit(model, spec: OrbitSpec, rotated: dict[str, torch.Tensor], needed: set[str], differentiable: bool) -> dict[str, torch.Tensor]:
    """Run the model on ``(B·K, ...)`` inputs in chunks; returns the needed outputs
    (detached unless ``differentiable``)."""
    total = next(iter(rotated.values())).shape[0]
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in needed}
    for start in range(0, total, spec.chunk_size):
        piece = {f: v[start : start + spec.chunk_size] for f, v in rotated.items()}
        if spec.grad:
            piece = {f: v.detach().requires_grad_(True) if v.is_floating_point() else v for f, v in piece.items()}
        outputs = call_model(model, spec, piece)
        for name in needed:
            if name not in outputs:
                raise ModelOutputError(f"the model has no output {name!r}; it returned {sorted(outputs)}")
            chunks[name].append(outputs[name] if differentiable else outputs[name].detach())
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def orbit_inputs(model: Callable, batch: Mapping[str, torch.Tensor], rotations: torch.Tensor, spec: OrbitSpec) -> dict[str, torch.Tensor]:
    """The model's inputs on every orbit element of a batch, ``{field: (B·K, ...)}``, cast to
    the model's dtype: what :func:`evaluate_orbits` feeds the model."""
    return _orbit_inputs(batch, rotations, spec, model_dtype(model))


def _orbit_inputs(batch: Mapping[str, torch.Tensor], rotations: torch.Tensor, spec: OrbitSpec, dtype: torch.dtype):
    """The model's inputs on every orbit element, flattened to ``(B·K, ...)``."""
    b, k = rotations.shape[:2]
    mask = batch.get(spec.mask) if spec.mask else None
    custom = spec.orbit_inputs(batch, rotations) if spec.orbit_inputs is not None else {}
    rotated = {}
    for name in spec.input_fields:
        if name in custom:
            orbit = custom[name]
        else:
            orbit = spec.group.action.act(spec.fields.get(name, "scalar"), batch[name], rotations, mask)
        orbit = orbit.reshape(b * k, *orbit.shape[2:])
        rotated[name] = orbit.to(dtype) if orbit.is_floating_point() else orbit
    return rotated


def _run_model(model, batch, rotations, spec: OrbitSpec, differentiable: bool = False,
               rotated: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Forward the ``(B·K, ...)`` orbit inputs (``rotated``: built already, by
    :func:`orbit_inputs`); returns the heads' outputs ``(B·K, ...)`` (detached unless
    ``differentiable``: then gradients flow to the model's parameters)."""
    if rotated is None:
        rotated = _orbit_inputs(batch, rotations, spec, model_dtype(model))
    needed = {h.output_name for h in spec.heads}
    device_type = rotations.device.type
    autocast = torch.autocast(device_type, dtype=spec.autocast) if spec.autocast else contextlib.nullcontext()
    frozen = _parameters_frozen(model) if spec.grad and not differentiable else contextlib.nullcontext()
    with torch.enable_grad() if spec.grad or differentiable else torch.inference_mode(), autocast, frozen:
        outputs = _forward_orbit(model, spec, rotated, needed, differentiable)
    for name, out in outputs.items():
        if not torch.isfinite(out.detach()).all():
            raise ModelOutputError(f"the model returned NaN or inf in output {name!r}", status="nan_output")
    return outputs


@contextlib.contextmanager
def _parameters_frozen(model):
    """The model's parameters with ``requires_grad=False`` for the forward, restored after.

    For a ``grad`` model whose outputs are detached: its ``−dE/dpos`` then records no graph
    to the weights, and a model that keeps the graph through its forces only when a weight
    needs it (``equiaudit.zoo``'s: training, ``--dynamics``) skips ``create_graph``. On
    SevenNet-0 that is 3.7× less memory and 18 % less time (README, Checkpoints).
    """
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def head_output(head: HeadSpec, out: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """``out`` ``(n, ...)`` checked against a per-sample ``target`` ``(B, ...)`` shape."""
    if head.loss == "cross_entropy":
        return out
    expected = (n, *target.shape[1:])
    if out.shape != expected and out.numel() == n * target[0].numel():
        out = out.reshape(expected)  # e.g. energies returned as (B·K, 1) for a target (B,)
    if out.shape != expected:
        raise ModelOutputError(
            f"output {head.output_name!r} has shape {tuple(out.shape[1:])} per sample; "
            f"target {head.target!r} has {tuple(target.shape[1:])}",
            status="bad_output_shape",
        )
    return out


def head_weight(head: HeadSpec, spec: OrbitSpec, mask: torch.Tensor | None, terms: torch.Tensor) -> torch.Tensor | None:
    """Element weight of a head's per-sample reduction over ``terms`` ``(B, *E)``: the head's
    own weight (e.g. a voxel mask), else the valid-atom mask for a per-atom head, else None."""
    weight = spec.head_weights.get(head.name)
    if weight is not None:
        return weight.to(terms.device)
    if mask is not None and terms.dim() >= 2 and terms.shape[1] == mask.shape[1]:
        return mask  # per-atom head: padded atoms do not count
    return None


def _head_statistics(head: HeadSpec, pred: torch.Tensor, batch, spec: OrbitSpec, keep: bool = False) -> HeadBatch:
    """Reduce orbit predictions ``(B, K, ...)`` (in the sample's frame) against the target."""
    mask = batch.get(spec.mask) if spec.mask else None
    target = batch[head.target]
    if representations.get_representation(head.rep).centred and spec.group.action.centres_points:
        target = actions.centre(target, mask)
    target = target.double() if target.is_floating_point() else target
    group = spec.group
    terms = orbit_terms(pred, target, head.loss, exact=group.exact, blocks=None if group.exact else group.blocks,
                        huber_delta=head.huber_delta)
    if head.sample_weight is not None:
        # Scale the element terms (not the reduced values): the per-sample, per-rotation and
        # per-unit (breakdown) reductions below then all carry the weight alike.
        scale = batch[head.sample_weight].double()
        terms = OrbitTerms(*(v * scale.reshape(-1, *[1] * (v.dim() - 1)) for v in
                             (terms.loss_aug, terms.equiv_error, terms.loss_per_rotation, terms.equiv_error_per_rotation)))
    weight = head_weight(head, spec, mask, terms.loss_aug)
    b, k = pred.shape[:2]
    # The same reduction per (sample, rotation): the weight repeated along K.
    weight_bk = None if weight is None else weight.unsqueeze(1).expand(b, k, *weight.shape[1:]).flatten(0, 1)

    def per_rotation(values: torch.Tensor) -> torch.Tensor:
        return reduce_per_sample(values.flatten(0, 1), weight_bk).view(b, k)

    return HeadBatch(
        # The (B, K, *E) arrays are as large as the orbit: keep only their reductions.
        terms=dataclasses.replace(terms, loss_per_rotation=None, equiv_error_per_rotation=None),
        loss_aug=reduce_per_sample(terms.loss_aug, weight),
        equiv_error=reduce_per_sample(terms.equiv_error, weight),
        weight=weight,
        loss_per_rotation=per_rotation(terms.loss_per_rotation),
        equiv_error_per_rotation=per_rotation(terms.equiv_error_per_rotation),
        pred=pred if keep else None,
        target=target if keep else None,
    )


def evaluate_orbits(
    model: Callable,
    batch: Mapping[str, torch.Tensor],
    rotations: torch.Tensor,
    spec: OrbitSpec,
    *,
    differentiable: bool = False,
    keep_predictions: bool = False,
    rotated: dict[str, torch.Tensor] | None = None,
) -> dict[str, HeadBatch]:
    """Evaluate every head on the orbits of one batch: ``P[b, k] = g⁻¹·f(g·x[b])``.

    Args:
        model: the network, already on the batch's device and in eval mode.
        batch: fields ``(B, ...)`` on the model's device; floats in float64.
        rotations: the group elements ``(B, K, ...)`` (rotations ``(B, K, 3, 3)`` float64),
            same device; the spec's group says how they act and how to correct the mean.
        differentiable: keep the graph to the model's parameters (gradients of L_sym and EE).
        keep_predictions: return the orbit predictions ``(B, K, *E)`` in each HeadBatch.
        rotated: the model's orbit inputs ``{field: (B·K, ...)}`` if built already
            (:func:`orbit_inputs`, e.g. ahead, on a side CUDA stream); else built here.

    Returns:
        ``{head: HeadBatch}``, per-sample values ``(B,)`` in float64.
    """
    b, k = rotations.shape[:2]
    outputs = _run_model(model, batch, rotations, spec, differentiable, rotated)
    results = {}
    for head in spec.heads:
        out = head_output(head, outputs[head.output_name], batch[head.target], b * k)
        mask = batch.get(spec.mask) if spec.mask else None
        pred = spec.group.action.act_inverse(head.rep, out.double().reshape(b, k, *out.shape[1:]), rotations, mask)
        results[head.name] = _head_statistics(head, pred, batch, spec, keep_predictions)
    return results


def evaluate_round_trip(
    model: Callable,
    batch: Mapping[str, torch.Tensor],
    rotations: torch.Tensor,
    spec: OrbitSpec,
) -> dict[str, HeadBatch]:
    """The same statistics for ``P[b, k] = R⁻¹·(R·f(x[b]))``: the model runs once, unrotated.

    Whatever equivariance error this shows is the actions' own (trilinear resampling on
    grids): the floor below which the model's figure cannot be told from the tool's.
    """
    b = rotations.shape[0]
    identity = torch.eye(3, dtype=rotations.dtype, device=rotations.device).expand(b, 1, 3, 3)
    outputs = _run_model(model, batch, identity, spec)
    results = {}
    for head in spec.heads:
        out = head_output(head, outputs[head.output_name], batch[head.target], b).double()
        mask = batch.get(spec.mask) if spec.mask else None  # a point output is centred on its valid atoms only
        pred = representations.unrotate(head.rep, representations.rotate(head.rep, out, rotations, mask), rotations)
        results[head.name] = _head_statistics(head, pred, batch, spec)
    return results

"""Local equivariance (``audit --local``): the Lie derivative of ``g⁻¹·f(g·x)`` at the identity. Pure.

For a generator ``L_j`` of so(3) (:func:`equiaudit.rotations.so3_generators`:
``(L_x)_{zy} = 1``, ``(L_x)_{yz} = −1`` and cyclic) and ``g_θ = exp(θ L_j)``,

    ``D_j f(x) = d/dθ [g_θ⁻¹·f(g_θ·x)] at θ = 0``,

which vanishes for every j exactly when f is equivariant to first order around x. For
``f(x) = A x`` on vectors, ``D_j f(x) = (A L_j − L_j A) x``. Per sample and head,

    ``local_equiv_error = Σ_j ‖D_j f(x)‖² / (number of output scalars per sample)``

(valid atoms and voxels only, as in the audit), averaged over samples; and
``rel_local_equiv_error`` is that over the mean squared output ``‖f(x)‖² / (scalars)``.
The weighted ``total`` is ``Σ_h w_h · head`` for both the error and the squared output.

Computation: one forward-mode derivative in θ (``torch.autograd.forward_ad``, the engine
of ``torch.func.jvp``; dual tensors also let a model take ``-dE/dpos`` with
``torch.autograd.grad`` inside, which ``torch.func`` transforms refuse). θ is a dual
number per (sample, generator): the batch is repeated three times along its first axis,
so the three generators are one forward pass, with no loop over samples or generators.
The rotation is ``I + θ L_j``: it agrees with ``exp(θ L_j)`` to first order, which is all
the derivative at θ = 0 sees. The action (float64) then the cast to the model's dtype
happen inside the differentiated function, as in the audit.

Voxel grids: ``grid_sample`` has no forward-mode derivative, and trilinear resampling
is not differentiable at the voxel centres where θ = 0 puts the samples (its one-sided
slopes are forward and backward differences). Its symmetric derivative, the mean of the
two, is the central difference, so on grids ``(g_θ·F)(r) = F(g_θ⁻¹ r)`` has tangent
``−∇F(r)·(L_j r)`` and the output map back ``+∇G(r)·(L_j r)``, with ``∇`` the central
difference in voxel units and zero padding (as ``grid_sample``'s). Floor: the identity
reads exactly 0, but a pointwise map (equivariant in the continuum) reads the chain-rule
defect of central differences, ``O(h²)`` in the voxel size relative to the field's
curvature (``rel_local_equiv_error`` ≈ 1e-2 for Gaussian blobs of width 1.5 voxels under
``tanh``, against ≈ 1 for a random 3×3×3 convolution; see ``tests/test_local.py``): a grid
model cannot read below its own discretisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.autograd.forward_ad as fwAD

from equiaudit import representations
from equiaudit.actions.voxels import voxel_centres
from equiaudit.engine import OrbitSpec, call_model, head_output, head_weight, model_dtype
from equiaudit.errors import ModelOutputError, first_line
from equiaudit.representations import get_representation
from equiaudit.metrics import reduce_per_sample
from equiaudit.rotations import so3_generators

__all__ = ["grid_lie_derivative", "local_batch"]


def grid_lie_derivative(grid: torch.Tensor, generators: torch.Tensor) -> torch.Tensor:
    """``∇F(r)·(L r)`` at every voxel centre: ``grid`` ``(B, C, D, H, W)``, ``generators`` ``(B, 3, 3)`` → grid shape.

    ``∇`` is the central difference in voxel units with zero padding; ``r`` the voxel
    centre ``(x, y, z)`` about the volume centre (:func:`~equiaudit.actions.voxels.voxel_centres`).
    """
    padded = torch.nn.functional.pad(grid, (1, 1, 1, 1, 1, 1))
    # (x, y, z) components: axis W is x, H is y, D is z.
    dx = (padded[..., 1:-1, 1:-1, 2:] - padded[..., 1:-1, 1:-1, :-2]) / 2
    dy = (padded[..., 1:-1, 2:, 1:-1] - padded[..., 1:-1, :-2, 1:-1]) / 2
    dz = (padded[..., 2:, 1:-1, 1:-1] - padded[..., :-2, 1:-1, 1:-1]) / 2
    r = voxel_centres(grid.shape[-3:], 1.0, dtype=grid.dtype, device=grid.device)  # (D, H, W, 3)
    velocity = torch.einsum("bij,dhwj->bdhwi", generators.to(grid.dtype), r)  # L r, (B, D, H, W, 3)
    v = velocity.unsqueeze(1)  # broadcast over channels
    return dx * v[..., 0] + dy * v[..., 1] + dz * v[..., 2]


def _tangent(x: torch.Tensor) -> torch.Tensor:
    tangent = fwAD.unpack_dual(x).tangent
    return torch.zeros_like(x) if tangent is None else tangent


def local_batch(model, batch: Mapping[str, torch.Tensor], spec: OrbitSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample ``(Σ_j mean ‖D_j f‖², mean ‖f‖²)`` for every head of one batch: ``{head: ((B,), (B,))}``.

    ``batch`` as for :func:`equiaudit.engine.evaluate_orbits` (fields ``(B, ...)``, floats in
    float64). A model that cannot be differentiated forward fails with ``ModelOutputError``
    (status ``local_failed``).
    """
    try:
        return _local_batch(model, batch, spec)
    except RuntimeError as exc:  # an op without a forward-mode derivative, typically
        raise ModelOutputError(f"--local: forward-mode differentiation of the model failed: {first_line(exc)}",
                               status="local_failed") from exc


def _local_batch(model, batch: Mapping[str, torch.Tensor], spec: OrbitSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    b = next(iter(batch.values())).shape[0]
    device = next(iter(batch.values())).device
    generators = so3_generators(device=device).repeat(b, 1, 1)  # row 3·i + j is L_j
    repeated = {name: value.repeat_interleave(3, 0) for name, value in batch.items()}
    mask = repeated.get(spec.mask) if spec.mask else None
    dtype = model_dtype(model)
    autocast = torch.autocast(device.type, dtype=spec.autocast) if spec.autocast else contextlib.nullcontext()
    eye = torch.eye(3, dtype=torch.float64, device=device)
    results = {}
    with fwAD.dual_level():
        theta = fwAD.make_dual(torch.zeros(3 * b, dtype=torch.float64, device=device), torch.ones(3 * b, dtype=torch.float64, device=device))
        rotation = (eye + theta[:, None, None] * generators).unsqueeze(1)  # (3B, 1, 3, 3)
        inputs = {}
        for name in spec.input_fields:
            rep, value = spec.fields.get(name, "scalar"), repeated[name]
            if get_representation(rep).grid:
                value = fwAD.make_dual(value, -grid_lie_derivative(value, generators))
            else:
                value = representations.rotate(rep, value, rotation, mask=mask).squeeze(1)
            if value.is_floating_point():
                value = value.to(dtype)
                if spec.grad:  # a leaf the model can differentiate by, carrying the tangent
                    value = fwAD.make_dual(fwAD.unpack_dual(value).primal.detach().requires_grad_(True), _tangent(value))
            inputs[name] = value
        with torch.enable_grad() if spec.grad else torch.no_grad(), autocast:
            outputs = call_model(model, spec, inputs)
        for head in spec.heads:
            if head.output_name not in outputs:
                raise ModelOutputError(f"the model has no output {head.output_name!r}; it returned {sorted(outputs)}")
            out = head_output(head, outputs[head.output_name], batch[head.target], 3 * b).double()
            primal = fwAD.unpack_dual(out).primal.detach()
            if get_representation(head.rep).grid:
                derivative = _tangent(out) + grid_lie_derivative(primal, generators)
            else:
                derivative = _tangent(representations.unrotate(head.rep, out.unsqueeze(1), rotation).squeeze(1))
            weight = head_weight(head, spec, mask, primal)
            error = reduce_per_sample(derivative.detach().square(), weight).view(b, 3).sum(1)
            scale = reduce_per_sample(primal.square(), weight).view(b, 3)[:, 0]
            results[head.name] = (error, scale)
    return results

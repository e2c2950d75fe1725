"""Reference trainers: the paper's three tasks, trained with random-rotation augmentation.

Pure training loops (no files): checkpoints leave through an ``on_checkpoint`` callback
at roughly log-spaced steps (0, 10, 30, 100, 300, 1000, ...), each with the held-out loss
measured on a fixed, seeded set of held-out samples and rotations. Same seed, same
checkpoints (CPU).

Augmentation draws one Haar rotation per sample per step; positions are centred first.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from equiaudit.actions import centre
from equiaudit.rotations import haar_rotations
from equiaudit.voxelize import VoxelGridSpec, voxelize

__all__ = [
    "TrainSettings",
    "log_spaced_steps",
    "force_field_loss",
    "flow_matching_loss",
    "voxel_denoising_loss",
    "train",
]

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    augment: bool = True
    # "constant", or "cosine": lr·½(1 + cos(π·step/steps)), annealed to 0 at the last step.
    schedule: str = "constant"
    # Exponential moving average of the weights (0: off). Checkpoints and the held-out loss
    # are then of the averaged weights, as in most diffusion and force-field trainers.
    ema_decay: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def lr_at(self, step: int) -> float:
        """Learning rate for the update made at ``step`` (0-based)."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(self.steps, 1)))
        return self.lr


def log_spaced_steps(total: int) -> list[int]:
    """``0, 10, 30, 100, 300, 1000, ...`` below ``total``, then ``total`` itself."""
    steps, decade = {0, total}, 10
    while decade < total:
        steps.update(s for s in (decade, 3 * decade) if s < total)
        decade *= 10
    return sorted(steps)


def _rotations(batch_size: int, generator: torch.Generator, augment: bool, dtype, device) -> torch.Tensor:
    """One rotation per sample, ``(B, 3, 3)``; the identity when augmentation is off."""
    if not augment:
        return torch.eye(3, dtype=dtype, device=device).expand(batch_size, 3, 3)
    return haar_rotations(batch_size, generator, dtype=dtype, device=device)


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid atoms and components of ``(B, A, 3)`` tensors."""
    weight = mask.unsqueeze(-1).to(pred.dtype)
    return ((pred - target).square() * weight).sum() / (weight.sum() * pred.shape[-1])


def force_field_loss(augment: bool = True, energy_weight: float = 1.0) -> LossFn:
    """MSE on energy plus MSE on forces, after rotating positions and forces together."""

    def loss(model, batch, generator):
        pos, forces, mask = batch["pos"], batch["forces"], batch["mask"]
        r = _rotations(len(pos), generator, augment, pos.dtype, pos.device)
        pos = centre(pos, mask) @ r.transpose(-1, -2)
        forces = forces @ r.transpose(-1, -2)
        out = model(pos, batch["z"], mask)
        return energy_weight * (out["energy"] - batch["energy"]).square().mean() + _masked_mse(out["forces"], forces, mask)

    return loss


def flow_matching_loss(augment: bool = True, noise_scale: float = 1.0) -> LossFn:
    """Conditional flow matching: ``x_t = (1−t)·x0 + t·x1``, regress ``x1 − x0`` (x1 rotated)."""

    def loss(model, batch, generator):
        pos, mask = batch["pos"], batch["mask"]
        r = _rotations(len(pos), generator, augment, pos.dtype, pos.device)
        x1 = centre(pos, mask) @ r.transpose(-1, -2)
        x0 = centre(noise_scale * torch.randn(pos.shape, generator=generator, dtype=pos.dtype), mask)
        t = torch.rand(len(pos), generator=generator, dtype=pos.dtype)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        out = model(x_t, t, batch["z"], mask)
        return _masked_mse(out["velocity"], x1 - x0, mask)

    return loss


def voxel_denoising_loss(grid: VoxelGridSpec, noise: float = 0.9, augment: bool = True) -> LossFn:
    """Denoise ``voxelize(R·atoms) + σ·ε`` back to ``voxelize(R·atoms)`` (VoxMol's recipe)."""

    def loss(model, batch, generator):
        pos, mask = batch["pos"], batch["mask"]
        r = _rotations(len(pos), generator, augment, torch.float64, pos.device)
        atoms = centre(pos.double(), mask) @ r.transpose(-1, -2)
        clean = voxelize(atoms, batch["z"], mask, grid).to(pos.dtype)
        eps = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
        return (model(clean + noise * eps) - clean).square().mean()

    return loss


@torch.no_grad()
def _update_average(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``average ← decay·average + (1 − decay)·model`` for parameters; buffers are copied."""
    for avg, live in zip(average.parameters(), model.parameters()):
        avg.lerp_(live, 1.0 - decay)
    for avg, live in zip(average.buffers(), model.buffers()):
        avg.copy_(live)


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train_data: Mapping[str, torch.Tensor],
    held_out: Mapping[str, torch.Tensor],
    settings: TrainSettings,
    *,
    checkpoint_steps: list[int] | None = None,
    on_checkpoint: Callable[[int, torch.nn.Module, dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Adam on ``loss_fn`` (optionally scheduled, optionally weight-averaged); at each
    checkpoint step, measure the held-out loss and call back.

    Args:
        train_data, held_out: fields ``(N, ...)``; floats should be float32 (the model's dtype).
        checkpoint_steps: default :func:`log_spaced_steps` of ``settings.steps``.
        on_checkpoint: ``(step, model, record)``, ``model`` being the weight average when
            ``settings.ema_decay`` is set; ``record`` has ``step``, ``train_loss``
            (mean since the last checkpoint), ``held_out_loss`` and ``seconds``.

    Returns:
        The records, one per checkpoint.
    """
    checkpoints = set(checkpoint_steps or log_spaced_steps(settings.steps))
    # The model that is evaluated and checkpointed: the live one, or its weight average.
    evaluated = copy.deepcopy(model) if settings.ema_decay else model
    generator = torch.Generator().manual_seed(settings.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n = len(next(iter(train_data.values())))
    records, recent, start = [], [], time.perf_counter()
    for step in range(settings.steps + 1):
        if step in checkpoints:
            evaluated.eval()
            # The same held-out noise and rotations at every checkpoint.
            held_loss = loss_fn(evaluated, held_out, torch.Generator().manual_seed(settings.seed + 1)).item()
            model.train()
            record = {
                "step": step,
                "train_loss": sum(recent) / len(recent) if recent else float("nan"),
                "held_out_loss": held_loss,
                "seconds": round(time.perf_counter() - start, 3),
            }
            records.append(record)
            recent = []
            if on_checkpoint is not None:
                on_checkpoint(step, evaluated, record)
        if step == settings.steps:
            break
        index = torch.randint(n, (settings.batch_size,), generator=generator)
        loss = loss_fn(model, {k: v[index] for k, v in train_data.items()}, generator)
        for group in optimiser.param_groups:
            group["lr"] = settings.lr_at(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if settings.ema_decay:
            _update_average(evaluated, model, min(settings.ema_decay, (1 + step) / (10 + step)))
        recent.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    evaluated.eval()
    return records

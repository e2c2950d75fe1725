"""The reference trainer's settings: learning-rate schedule and weight averaging (EMA)."""

from __future__ import annotations

import math

import pytest
import torch

from equiaudit.zoo.train import TrainSettings, log_spaced_steps, train


def test_log_spaced_steps():
    assert log_spaced_steps(3000) == [0, 10, 30, 100, 300, 1000, 3000]
    assert log_spaced_steps(10) == [0, 10]


def test_cosine_schedule_anneals_to_zero():
    settings = TrainSettings(steps=100, lr=1e-3, schedule="cosine")
    assert settings.lr_at(0) == pytest.approx(1e-3)
    assert settings.lr_at(50) == pytest.approx(5e-4)
    assert settings.lr_at(99) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert TrainSettings(steps=100, lr=1e-3).lr_at(99) == 1e-3
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings(schedule="linear")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainSettings(ema_decay=1.0)


def _fit_a_scalar(settings: TrainSettings):
    """Train ``w`` to minimise (w − x)² on noisy x; return checkpoints and the live weights per step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    data = {"x": torch.linspace(1.0, 3.0, 16)}

    def loss_fn(m, batch, generator):
        return (m.weight.squeeze() - batch["x"]).square().mean()

    live = [model.weight.item()]
    saved = {}
    train(model, loss_fn, data, data, settings, checkpoint_steps=[0, settings.steps],
          on_checkpoint=lambda step, m, record: saved.update({step: m.weight.item()}),
          on_step=lambda step: live.append(model.weight.item()))
    return saved, live


def test_ema_checkpoints_hold_the_weight_average():
    decay = 0.9
    saved, live = _fit_a_scalar(TrainSettings(steps=40, batch_size=4, lr=0.05, ema_decay=decay))
    # By hand: average ← d_t·average + (1 − d_t)·live after update t, d_t = min(decay, (1+t)/(10+t)).
    average = live[0]
    for t in range(40):
        d = min(decay, (1 + t) / (10 + t))
        average = d * average + (1 - d) * live[t + 1]
    assert saved[0] == pytest.approx(live[0])
    assert saved[40] == pytest.approx(average, rel=1e-6)
    assert abs(saved[40] - live[-1]) > 1e-3  # the checkpoint is not the live iterate


def test_without_ema_checkpoints_are_the_live_weights():
    saved, live = _fit_a_scalar(TrainSettings(steps=40, batch_size=4, lr=0.05))
    assert saved[40] == pytest.approx(live[-1])

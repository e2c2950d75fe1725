"""``flow_matching``: audit a velocity model ``v(x_t, t, ...)`` of a flow over atom positions.

Per sample, drawn once per audit from the seeded generator (so identical for every
checkpoint): ``x0 ~ N(0, noise_scale² I)`` centred on the valid atoms, ``t ~ U(0, 1)``,
``x1`` = the data positions centred, ``x_t = (1 − t)·x0 + t·x1`` and the target velocity
``x1 − x0``. A rotation acts on ``x0`` and ``x1`` together, i.e. on ``x_t`` and on the
target alike: the engine rotates ``x_t`` (a ``point``; already centred) and compares
``R⁻¹·v(R·x_t, t)`` with the unrotated target. ``t`` and atom types are scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from equiaudit.actions import centre
from equiaudit.errors import DataError
from equiaudit.tasks import TaskPreset, register_task


def prepare_flow(dataset: dict[str, torch.Tensor], options: Mapping[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Add ``x0``, ``x1`` ``(N, A, 3)``, ``t`` ``(N,)``, ``x_t`` and ``velocity`` ``(N, A, 3)``."""
    if "pos" not in dataset:
        raise DataError("flow_matching needs atom positions: map them to 'pos' in data.keys")
    pos = dataset["pos"]
    mask = dataset.get("mask")
    x1 = centre(pos, mask)
    noise = torch.randn(pos.shape, generator=generator, dtype=torch.float64).to(pos)
    x0 = centre(float(options["noise_scale"]) * noise, mask)
    t = torch.rand(pos.shape[0], generator=generator, dtype=torch.float64).to(pos)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    return {**dataset, "x0": x0, "x1": x1, "t": t, "x_t": x_t, "velocity": x1 - x0}


FLOW_MATCHING = register_task(
    TaskPreset(
        name="flow_matching",
        fields={"x_t": "point", "t": "scalar", "z": "scalar"},
        heads={"velocity": {"rep": "vector", "target": "velocity", "loss": "mse", "weight": 1.0}},
        inputs=("x_t", "t", "z", "mask"),
        group="so3",
        prepare=prepare_flow,
        options={"noise_scale": 1.0},
    )
)

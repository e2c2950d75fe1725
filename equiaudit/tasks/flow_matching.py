"""``flow_matching``: audit a velocity model ``v(x_t, t, ...)`` of a flow over atom positions.

Per sample, a pure function of the seed and the sample's id (so identical for every
checkpoint, batch size and process): ``x0 ~ N(0, noise_scale² I)`` centred on the valid atoms, ``t ~ U(0, 1)``,
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
from equiaudit.random import SampleRandom
from equiaudit.tasks import TaskPreset, register_task


def prepare_flow(dataset: dict[str, torch.Tensor], options: Mapping[str, Any], random: SampleRandom, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add ``x0``, ``x1`` ``(N, A, 3)``, ``t`` ``(N,)``, ``x_t`` and ``velocity`` ``(N, A, 3)``.

    The noise of atom slot ``a`` is drawn at counters ``3a … 3a+2``: it does not depend on
    how far the atom axis is padded.
    """
    if "pos" not in dataset:
        raise DataError("flow_matching needs atom positions: map them to 'pos' in data.keys")
    pos = dataset["pos"]
    mask = dataset.get("mask")
    x1 = centre(pos, mask)
    noise = random.child("flow x0").normal(ids, pos.shape[1:]).to(pos)
    x0 = centre(float(options["noise_scale"]) * noise, mask)
    t = random.child("flow t").uniform(ids).to(pos)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    return {**dataset, "x0": x0, "x1": x1, "t": t, "x_t": x_t, "velocity": x1 - x0}


FLOW_MATCHING = register_task(
    TaskPreset(
        name="flow_matching",
        fields={"x_t": "point", "t": "scalar", "z": "scalar"},
        heads={"velocity": {"rep": "vector", "target": "velocity", "loss": "mse", "weight": 1.0}},
        inputs=("x_t", "t", "z", "mask"),
        group="so3",
        section="flow",
        prepare=prepare_flow,
        options={"noise_scale": 1.0},
    )
)

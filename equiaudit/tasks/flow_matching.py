"""``flow_matching``: audit a flow model ``f(x_t, t, ...)`` over atom positions.

Per sample, a pure function of the seed and the sample's id (so identical for every
checkpoint, batch size and process): the noise ``x0 ~ N(0, noise_scale² I)`` centred on
the valid atoms, ``t ~ U(0, 1)`` and ``x1`` = the data positions centred. The config's
``flow:`` section sets the conventions of the structure generator being audited:

``time`` — which end of the path is noise:

* ``noise_at_0`` (default; the demo's trainer, Lipman et al.): ``x_t = (1 − t)·x0 + t·x1``,
  velocity ``dx_t/dt = x1 − x0``;
* ``noise_at_1`` (diffusion-style time, e.g. rectified flows run from data at 0 to noise at 1):
  ``x_t = t·x0 + (1 − t)·x1``, velocity ``dx_t/dt = x0 − x1``.

``target`` — what the model predicts, and so the head (name = target field):

* ``velocity`` (default): head ``velocity``, rep ``vector``, target the velocity above;
* ``x1``: head ``x1``, rep ``point``, target the clean structure (AF3/Boltz/Proteina-style
  ``x̂1`` prediction);
* ``x0``: head ``x0``, rep ``point``, target the noise.

A predicted structure or noise sample is a position in the centred frame (it translates
with the input), a velocity is a difference of positions (it does not): hence ``point``
for ``x1``/``x0`` and ``vector`` for ``velocity``. Under rotations both map back by ``Rᵀ``.

``t`` — optional fixed times ``[t_1 … t_T]``: every sample is evaluated at each of them
with the **same** noise ``x0`` (drawn from the sample's id), so differences between times
are not noise. The prepared batch then has ``B·T`` rows, sample-major (rows ``i·T … i·T+T−1``
are sample i at ``t_1 … t_T``), with ``cluster`` ``(B·T,)`` the sample's id: the plan gives
row j of sample ``id`` the row id ``id·T + j`` (its own rotations), ``breakdown.csv`` gets
one ``t`` row per listed time, and the interval resamples samples, not rows.

A rotation acts on ``x0`` and ``x1`` together, i.e. on ``x_t`` and on every target alike:
the engine rotates ``x_t`` (a ``point``; already centred) and compares ``R⁻¹·f(R·x_t, t)``
with the unrotated target. ``t`` and atom types are scalars. The model is called as
``model(x_t, t, z, mask)``; ``x_t``, targets ``(N, A, 3)``, ``t`` ``(N,)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from equiaudit.actions import centre
from equiaudit.errors import ConfigError, DataError
from equiaudit.random import SampleRandom
from equiaudit.tasks.base import SampleVariable, TaskPreset, register_task

__all__ = ["TIMES", "TARGETS", "flow_heads", "resolve_flow_options", "fixed_values", "rows_at", "prepare_flow", "FLOW_MATCHING"]

TIMES = ("noise_at_0", "noise_at_1")
TARGETS = ("velocity", "x1", "x0")
_HEADS = {
    "velocity": {"rep": "vector", "target": "velocity", "loss": "mse", "weight": 1.0},
    "x1": {"rep": "point", "target": "x1", "loss": "mse", "weight": 1.0},
    "x0": {"rep": "point", "target": "x0", "loss": "mse", "weight": 1.0},
}


def flow_heads(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The one head of ``flow.target``: ``{target: {rep, target, loss, weight}}``."""
    target = options.get("target", "velocity")
    return {target: dict(_HEADS[target])}


def fixed_values(section: str, key: str, value: Any, low: float, high: float) -> tuple[float, ...] | None:
    """A config list of fixed values (``flow.t``, ``diffusion.sigma``) checked to lie in
    ``[low, high]``; a single number is a list of one; None stays None."""
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"config: {section}.{key}={value!r} must be a non-empty list of numbers")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
            raise ConfigError(f"config: {section}.{key}={value!r}: every value must be a number in [{low:g}, {high:g}]")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ConfigError(f"config: {section}.{key}={value!r} lists a value twice")
    return tuple(out)


def resolve_flow_options(options: Mapping[str, Any], dataset: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Check ``flow.time``, ``flow.target``, ``flow.t`` and ``flow.noise_scale``; ``t`` becomes a tuple."""
    options = dict(options)
    for key, allowed in (("time", TIMES), ("target", TARGETS)):
        if options[key] not in allowed:
            raise ConfigError(f"config: flow.{key}={options[key]!r} is not allowed; allowed: {', '.join(allowed)}")
    scale = options["noise_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"config: flow.noise_scale={scale!r} must be a finite number")
    options["t"] = fixed_values("flow", "t", options["t"], 0.0, 1.0)
    return options


def rows_at(dataset: Mapping[str, torch.Tensor], ids: torch.Tensor, values, like: torch.Tensor
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One row per (sample, fixed value): every field ``(B, ...)`` with each sample's row
    repeated ``T = len(values)`` times in place (``(B·T, ...)``, sample-major), the values
    ``(B·T,)`` in ``like``'s dtype and device, and ``{"cluster": (B·T,)}``, the sample id of
    each row (the interval then resamples samples, not rows). Shared by ``flow.t`` and
    ``diffusion.sigma``."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    repeat = len(values)
    rows = {name: value.repeat_interleave(repeat, 0) for name, value in dataset.items()}
    column = torch.tensor(values, dtype=like.dtype, device=like.device).repeat(len(ids))
    return rows, column, {"cluster": ids.repeat_interleave(repeat).to(like.device)}


def prepare_flow(dataset: dict[str, torch.Tensor], options: Mapping[str, Any], random: SampleRandom, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add ``x0``, ``x1`` ``(R, A, 3)``, ``t`` ``(R,)``, ``x_t`` and ``velocity`` ``(R, A, 3)``
    (all three targets are there whatever ``flow.target``; the head names one).

    ``R = B`` (``t ~ U(0, 1)`` per sample) or ``B·T`` with fixed times (and then ``cluster``).
    The noise of atom slot ``a`` is drawn at counters ``3a … 3a+2``: it does not depend on
    how far the atom axis is padded; with fixed times it is drawn once per sample, from
    the sample's own id, and shared by its T rows.
    """
    if "pos" not in dataset:
        raise DataError("flow_matching needs atom positions: map them to 'pos' in data.keys")
    pos = dataset["pos"]
    mask = dataset.get("mask")
    x1 = centre(pos, mask)
    noise = random.child("flow x0").normal(ids, pos.shape[1:]).to(pos)
    x0 = centre(float(options["noise_scale"]) * noise, mask)
    times = options.get("t")
    if times is None:
        t = random.child("flow t").uniform(ids).to(pos)
        extra: dict[str, torch.Tensor] = {}
    else:
        # One row per (sample, time), the sample's noise repeated: T rows share x0 and x1.
        dataset, t, extra = rows_at({**dataset, "x0": x0, "x1": x1}, ids, times, like=pos)
        x0, x1 = dataset.pop("x0"), dataset.pop("x1")
    s = t[:, None, None]
    if options.get("time", "noise_at_0") == "noise_at_0":
        x_t, velocity = (1 - s) * x0 + s * x1, x1 - x0
    else:  # noise at t = 1: the path runs the other way, and so does its velocity
        x_t, velocity = s * x0 + (1 - s) * x1, x0 - x1
    return {**dataset, "x0": x0, "x1": x1, "t": t, "x_t": x_t, "velocity": velocity, **extra}


FLOW_MATCHING = register_task(
    TaskPreset(
        name="flow_matching",
        fields={"x_t": "point", "t": "scalar", "z": "scalar"},
        heads={"velocity": dict(_HEADS["velocity"])},
        inputs=("x_t", "t", "z", "mask"),
        group="so3",
        section="flow",
        resolve_options=resolve_flow_options,
        prepare=prepare_flow,
        heads_for=flow_heads,
        options={"noise_scale": 1.0, "time": "noise_at_0", "target": "velocity", "t": None},
        variables=(SampleVariable("t", "flow time t", "time t of the flow"),),
    )
)

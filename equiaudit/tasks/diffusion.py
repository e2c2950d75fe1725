"""``diffusion``: audit an EDM-style denoiser ``D(x_σ, σ, ...)`` of atom positions (Karras et al. 2022).

Per sample, a pure function of the seed and the sample's id (identical for every
checkpoint, batch size and process):

* ``x1`` ``(N, A, 3)``: the data positions, centred on the valid atoms (the clean structure);
* ``noise`` ``(N, A, 3)``: ``ε ~ N(0, I)`` centred on the valid atoms (like flow noise),
  zero on padded atoms;
* ``sigma`` ``(N,)``: the noise level, ``σ = exp(P_mean + P_std·n)`` with ``n ~ N(0, 1)``
  (EDM's training distribution; defaults ``P_mean = −1.2``, ``P_std = 1.2``), or each of
  a fixed list ``diffusion.sigma`` (see below);
* ``x_sigma`` ``(N, A, 3)``: the input ``x_σ = x1 + σ·ε`` (centred);
* ``loss_weight`` ``(N,)``: EDM's ``λ(σ) = (σ² + σ_data²)/(σ·σ_data)²`` (``weighting: edm``,
  ``sigma_data`` default 1.0), or 1 (``weighting: none``).

The model is called as ``model(x_sigma, sigma, z, mask)`` — σ itself, a scalar per sample;
a network that takes EDM's ``c_noise = ¼·ln σ`` or its preconditioning computes them inside
— and its output ``x1`` is the **denoised structure** ``D(x_σ; σ)`` (EDM's D, i.e. after
``c_skip·x + c_out·F``), compared with ``x1`` by the per-sample weighted MSE
``λ(σ)·mean_atoms ‖D − x1‖²`` (:attr:`equiaudit.engine.HeadSpec.sample_weight`).

Why the head is a ``point``: D returns positions in the centred frame of its input. Under
a rotation it maps back by ``Rᵀ`` as a vector would; under translations it moves with its
input (a vector, such as a velocity or ε, would not), and its target is centred like one.

``sigma: [σ_1 … σ_T]`` (optional): every sample is evaluated at each listed σ with the
**same** ε, so differences between levels are not noise: ``B·T`` rows, sample-major, with
``cluster`` (the sample's id; the interval resamples samples). ``breakdown: {by: [sigma]}``
splits by σ — one row per listed level, quantile bins for drawn ones.
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
from equiaudit.tasks.flow_matching import fixed_values, rows_at

__all__ = ["WEIGHTINGS", "edm_weight", "resolve_diffusion_options", "prepare_diffusion", "DIFFUSION"]

WEIGHTINGS = ("edm", "none")


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight ``λ(σ) = (σ² + σ_data²)/(σ·σ_data)²`` (it makes the loss of the
    network's raw output F unit-weighted at every level)."""
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


def _number(key: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise ConfigError(f"config: diffusion.{key}={value!r} must be a finite number" + (" > 0" if positive else ""))
    return float(value)


def resolve_diffusion_options(options: Mapping[str, Any], dataset: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Check the ``diffusion:`` options; ``sigma`` becomes a tuple of floats (or None)."""
    options = dict(options)
    options["P_mean"] = _number("P_mean", options["P_mean"])
    options["P_std"] = _number("P_std", options["P_std"])
    if options["P_std"] < 0:
        raise ConfigError(f"config: diffusion.P_std={options['P_std']!r} must be ≥ 0")
    options["sigma_data"] = _number("sigma_data", options["sigma_data"], positive=True)
    if options["weighting"] not in WEIGHTINGS:
        raise ConfigError(f"config: diffusion.weighting={options['weighting']!r} is not allowed; allowed: {', '.join(WEIGHTINGS)}")
    sigma = fixed_values("diffusion", "sigma", options["sigma"], 0.0, math.inf)
    if sigma is not None and min(sigma) <= 0:
        raise ConfigError(f"config: diffusion.sigma={options['sigma']!r}: every level must be > 0")
    options["sigma"] = sigma
    return options


def prepare_diffusion(dataset: dict[str, torch.Tensor], options: Mapping[str, Any], random: SampleRandom, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Add ``x1``, ``noise``, ``x_sigma`` ``(R, A, 3)``, ``sigma`` and ``loss_weight`` ``(R,)``.

    ``R = B`` (σ drawn per sample) or ``B·T`` with a fixed ``sigma`` list (then also
    ``cluster``). ε of atom slot ``a`` is drawn at counters ``3a … 3a+2`` (independent of
    the padding), once per sample from the sample's own id.
    """
    if "pos" not in dataset:
        raise DataError("diffusion needs atom positions: map them to 'pos' in data.keys")
    pos = dataset["pos"]
    mask = dataset.get("mask")
    x1 = centre(pos, mask)
    noise = centre(random.child("diffusion noise").normal(ids, pos.shape[1:]).to(pos), mask)
    levels = options.get("sigma")
    if levels is None:
        n = random.child("diffusion sigma").normal(ids).to(torch.float64)
        sigma = torch.exp(float(options["P_mean"]) + float(options["P_std"]) * n).to(pos)
        extra: dict[str, torch.Tensor] = {}
    else:
        # One row per (sample, level), the sample's ε repeated: T rows share x1 and ε.
        dataset, sigma, extra = rows_at({**dataset, "x1": x1, "noise": noise}, ids, levels, like=pos)
        x1, noise = dataset.pop("x1"), dataset.pop("noise")
    x_sigma = x1 + sigma[:, None, None] * noise
    # float64 whatever the data: λ spans decades (1/σ² at small σ) and only scales losses.
    if options.get("weighting", "edm") == "edm":
        weight = edm_weight(sigma.double(), float(options["sigma_data"]))
    else:
        weight = torch.ones_like(sigma, dtype=torch.float64)
    return {**dataset, "x1": x1, "noise": noise, "sigma": sigma, "x_sigma": x_sigma, "loss_weight": weight, **extra}


DIFFUSION = register_task(
    TaskPreset(
        name="diffusion",
        fields={"x_sigma": "point", "sigma": "scalar", "z": "scalar"},
        heads={"x1": {"rep": "point", "target": "x1", "loss": "mse", "weight": 1.0, "sample_weight": "loss_weight"}},
        inputs=("x_sigma", "sigma", "z", "mask"),
        group="so3",
        section="diffusion",
        resolve_options=resolve_diffusion_options,
        prepare=prepare_diffusion,
        denoises={"x1": "x_sigma"},
        options={"P_mean": -1.2, "P_std": 1.2, "sigma": None, "sigma_data": 1.0, "weighting": "edm"},
        # Not drawn per step yet (report.html and trajectory.png as before); drawn=True adds the panel.
        variables=(SampleVariable("sigma", "noise level σ", "noise level σ", drawn=False),),
    )
)

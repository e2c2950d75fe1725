"""Task presets: default fields, heads and model call for the paper's three tasks. Pure.

A preset names representations and, where the task needs it, derives fields from the data
(``prepare``): flow-matching noise and times, voxelized and noised grids. Every derived
value of a sample is a pure function of the seed and the sample's id
(:class:`~equiaudit.random.SampleRandom`), so every checkpoint, every batch size, every
process sees the same inputs. The config may override any field or head, and the task's
own options live in its config section (``flow:``, ``voxel:``).

Adding a task is one module here that calls :func:`register_task` (and an import below).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from equiaudit.random import SampleRandom

__all__ = ["TaskPreset", "get_task", "register_task", "task_names", "task_sections", "CUSTOM"]

Dataset = dict[str, torch.Tensor]


def _unchanged(dataset: Dataset, options: Mapping[str, Any], random: SampleRandom, ids: torch.Tensor) -> Dataset:
    return dataset


def _as_given(options: Mapping[str, Any], dataset: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return dict(options)


@dataclass(frozen=True)
class TaskPreset:
    """Defaults for one task.

    Attributes:
        name: the config's ``task``.
        fields: representation of each input field.
        heads: ``{name: {rep, target, loss, weight}}``.
        inputs: default positional model inputs.
        group: default group.
        section: the config section holding the task's options (``flow``, ``voxel``), if any.
        options: allowed keys of that section and their defaults.
        resolve_options: ``(options, dataset) -> options`` fixing data-dependent defaults
            once per audit (e.g. the voxel channels from the elements present), so that
            every batch is prepared alike.
        prepare: ``(batch, options, random, ids) -> batch`` adding derived fields to a batch
            of samples ``(B, ...)`` with ids ``(B,)``; per-sample and seeded, so preparing a
            whole dataset at once or batch by batch gives the same values.
        orbit_inputs: ``(options, prepared dataset) -> builder | None``; the builder makes
            some fields' orbits itself (see :class:`equiaudit.engine.OrbitSpec`).
        heads_for: ``(resolved options) -> heads``, for a task whose heads follow its options
            (``flow.target``: a ``velocity``, ``x1`` or ``x0`` head); None: ``heads``.
        denoises: ``{head: noisy input field}`` for a denoising task: the identity map (the
            noisy input itself) is one of the head's null predictors (:mod:`equiaudit.null`).

    ``prepare`` may return several rows per sample (``flow.t``: one per listed time): then
    every sample of the batch has the same number T of consecutive rows and the batch
    carries ``cluster`` ``(B·T,)`` int64, the id of the sample each row comes from. Each row
    is then audited as a sample of id ``id·T + j`` (its own rotations), and the interval
    resamples clusters (:meth:`equiaudit.plan.AuditPlan.summarize`).
    """

    name: str
    fields: Mapping[str, str] = field(default_factory=dict)
    heads: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    group: str = "so3"
    section: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    resolve_options: Callable[[Mapping[str, Any], Mapping[str, torch.Tensor]], dict[str, Any]] = _as_given
    prepare: Callable[[Dataset, Mapping[str, Any], SampleRandom, torch.Tensor], Dataset] = _unchanged
    orbit_inputs: Callable[[Mapping[str, Any], Dataset], Callable | None] | None = None
    heads_for: Callable[[Mapping[str, Any]], Mapping[str, Mapping[str, Any]]] | None = None
    denoises: Mapping[str, str] = field(default_factory=dict)

    def default_heads(self, options: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
        """The preset's heads under these (resolved) options."""
        return self.heads if self.heads_for is None else self.heads_for(options)


CUSTOM = TaskPreset("custom")
_REGISTRY: dict[str, TaskPreset] = {}


def register_task(preset: TaskPreset) -> TaskPreset:
    _REGISTRY[preset.name] = preset
    return preset


def _registry() -> dict[str, TaskPreset]:
    # Importing the modules registers their presets.
    from equiaudit.tasks import diffusion, flow_matching, force_field, voxel_denoising  # noqa: F401

    return {**_REGISTRY, CUSTOM.name: CUSTOM}


def task_names() -> tuple[str, ...]:
    """Every task a config may name, ``custom`` (no defaults) last."""
    return tuple(_registry())


def task_sections() -> dict[str, str]:
    """``{config section: task}`` for the tasks that have options (``flow: flow_matching`` ...)."""
    return {preset.section: name for name, preset in _registry().items() if preset.section}


def get_task(name: str) -> TaskPreset:
    """The preset for ``name``; ``ValueError`` naming the allowed tasks otherwise."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(registry)}")
    return registry[name]

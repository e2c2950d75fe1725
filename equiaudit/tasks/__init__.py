"""Task presets: default fields, heads and model call for the paper's three tasks.

A preset is pure: it names representations and, where the task needs it, derives
fields from the dataset once per audit (``prepare``), seeded, so every checkpoint
sees the same inputs. The config may override any field or head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TaskPreset", "get_task", "register_task"]

Dataset = dict[str, torch.Tensor]


def _unchanged(dataset: Dataset, options: Mapping[str, Any], generator: torch.Generator) -> Dataset:
    return dataset


@dataclass(frozen=True)
class TaskPreset:
    """Defaults for one task.

    Attributes:
        fields: representation of each input field.
        heads: ``{name: {rep, target, loss, weight}}``.
        inputs: default positional model inputs.
        group: default rotation group.
        prepare: ``(dataset, options, generator) -> dataset`` adding derived fields.
        options: allowed keys of the task's config section and their defaults.
        orbit_inputs: ``(options, prepared dataset) -> builder | None``; the builder makes
            some fields' orbits itself (see :class:`equiaudit.engine.OrbitSpec`).
    """

    name: str
    fields: Mapping[str, str] = field(default_factory=dict)
    heads: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    group: str = "so3"
    prepare: Callable[[Dataset, Mapping[str, Any], torch.Generator], Dataset] = _unchanged
    options: Mapping[str, Any] = field(default_factory=dict)
    orbit_inputs: Callable[[Mapping[str, Any], Dataset], Callable | None] | None = None


_REGISTRY: dict[str, TaskPreset] = {}


def register_task(preset: TaskPreset) -> TaskPreset:
    _REGISTRY[preset.name] = preset
    return preset


def get_task(name: str) -> TaskPreset:
    """The preset for ``name`` (``custom`` has no defaults)."""
    # Importing the modules registers their presets.
    from equiaudit.tasks import flow_matching, force_field, voxel_denoising  # noqa: F401
    if name == "custom":
        return TaskPreset("custom")
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(_REGISTRY) + ['custom'])}")
    return _REGISTRY[name]

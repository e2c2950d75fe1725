"""Task presets: default fields, heads and model call for the paper's three tasks. Pure.

A preset names representations and, where the task needs it, derives fields from the data
(``prepare``): flow-matching noise and times, voxelized and noised grids. Every derived
value of a sample is a pure function of the seed and the sample's id
(:class:`~equiaudit.random.SampleRandom`), so every checkpoint, every batch size, every
process sees the same inputs. The config may override any field or head, and the task's
own options live in its config section (``flow:``, ``voxel:``).

Adding a task is one module here that calls :func:`register_task` (and an import below);
the protocol is :mod:`equiaudit.tasks.base`.
"""

from __future__ import annotations

from equiaudit.tasks.base import CUSTOM, TASKS, Dataset, SampleVariable, TaskPreset, register_task

__all__ = [
    "TaskPreset", "SampleVariable", "get_task", "register_task", "task_names", "task_sections", "sample_variables",
    "CUSTOM", "Dataset",
]


def _registry() -> dict[str, TaskPreset]:
    # Importing the modules registers their presets (they import this package: not at the top).
    from equiaudit.tasks import diffusion, flow_matching, force_field, protein_flow, voxel_denoising  # noqa: F401

    return {**TASKS, CUSTOM.name: CUSTOM}
def task_names() -> tuple[str, ...]:
    """Every task a config may name, ``custom`` (no defaults) last."""
    return tuple(_registry())


def task_sections() -> dict[str, tuple[str, ...]]:
    """``{config section: tasks}`` for the tasks that have options (``flow: (flow_matching,
    protein_flow)`` ...): tasks may share a section (the protein preset takes ``flow:``'s keys)."""
    sections: dict[str, tuple[str, ...]] = {}
    for name, preset in _registry().items():
        if preset.section:
            sections[preset.section] = (*sections.get(preset.section, ()), name)
    return sections


def get_task(name: str) -> TaskPreset:
    """The preset for ``name``; ``ValueError`` naming the allowed tasks otherwise."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(registry)}")
    return registry[name]


def sample_variables() -> dict[str, SampleVariable]:
    """Every registered task's per-sample variables, ``{name: variable}`` in registration order
    (``t`` of flow matching, ``sigma`` of diffusion, …): the fields breakdowns split by when
    the data carries them."""
    return {v.name: v for preset in _registry().values() for v in preset.variables}

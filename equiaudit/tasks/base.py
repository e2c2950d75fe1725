"""The task protocol: a task's fields, heads, options and per-sample variables, and its registry. Pure.

A :class:`TaskPreset` names representations and, where the task needs it, derives fields
from the data (``prepare``): flow-matching noise and times, voxelized and noised grids.
It also declares the per-sample variables it draws or fixes (:class:`SampleVariable`: a
flow time ``t``, a noise level ``sigma``); breakdowns, plots and ``report.html`` read them
from the registry instead of naming them. Tasks register themselves in :data:`TASKS` (one
module each under :mod:`equiaudit.tasks`, or anywhere: ``tests/toy_extensions.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from equiaudit.random import SampleRandom

__all__ = ["Dataset", "SampleVariable", "TaskPreset", "CUSTOM", "TASKS", "register_task"]

Dataset = dict[str, torch.Tensor]


def _unchanged(dataset: Dataset, options: Mapping[str, Any], random: SampleRandom, ids: torch.Tensor) -> Dataset:
    return dataset


def _as_given(options: Mapping[str, Any], dataset: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return dict(options)


@dataclass(frozen=True)
class SampleVariable:
    """A per-sample variable a task draws or fixes (a flow time, a noise level).

    Attributes:
        name: its field in the prepared batch, ``(N,)``, and the ``by`` of its ``breakdown.csv``
            rows (every audit whose data carries it is split by it).
        label: how reports title it (``flow time t``: the panel "REE per flow time t").
        description: how a caption names one of its values (``time t of the flow``).
        drawn: whether the trajectory plot and ``report.html`` draw REE against step at each
            of its fixed values (the per-variable panel).
    """

    name: str
    label: str
    description: str
    drawn: bool = True


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
        variables: its per-sample variables (:class:`SampleVariable`): breakdowns split by
            them, plots and ``report.html`` draw them, read from here.
        data_defaults: defaults of ``data.*`` reading options (``protein_flow``: ``units: nm``).

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
    variables: tuple[SampleVariable, ...] = ()
    data_defaults: Mapping[str, Any] = field(default_factory=dict)

    def default_heads(self, options: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
        """The preset's heads under these (resolved) options."""
        return self.heads if self.heads_for is None else self.heads_for(options)


CUSTOM = TaskPreset("custom")
TASKS: dict[str, TaskPreset] = {}


def register_task(preset: TaskPreset) -> TaskPreset:
    TASKS[preset.name] = preset
    return preset



"""Audit checkpoints: resolve a config into one plan, then evaluate each checkpoint with it.

The plan (model, dataset, orbit spec, rotations) is built once, so every checkpoint of
a run sees the same samples under the same rotations (common random numbers). A
checkpoint that fails is reported with a status and the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from equiaudit.actions.voxels import spherical_mask
from equiaudit.breakdown import BUILTIN_SPLITS, BreakdownCollector, BreakdownOptions
from equiaudit.engine import HeadSpec, OrbitSpec, audit_model, evaluate_round_trip
from equiaudit.floor import float_floor_metric
from equiaudit.groups_extra import EXTRA_GROUP_NAMES, group_action, make_extra_group
from equiaudit.local import local_metric
from equiaudit.errors import ConfigError, DataError, EquiauditError, first_line
from equiaudit.groups import RotationSet, make_rotation_set
from equiaudit.io.checkpoints import CheckpointRef, load_into_model, read_checkpoint
from equiaudit.io.config import AuditConfig
from equiaudit.io.data import load_dataset
from equiaudit.io.models import build_model
from equiaudit.metrics import OrbitAccumulator, Summary
from equiaudit.rotations import is_signed_permutation
from equiaudit.tasks import TaskPreset, get_task

__all__ = ["AuditPlan", "CheckpointResult", "prepare_audit", "audit_checkpoint", "resolve_device", "build_orbit_spec"]

# Separate, fixed streams so that changing one draw never shifts the other.
PREPARE_STREAM = 1_000_003


@dataclass
class CheckpointResult:
    ref: CheckpointRef
    status: str
    message: str | None = None
    step: int | None = None
    summaries: dict[str, Summary] = field(default_factory=dict)
    extras: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    breakdown: list[dict] = field(default_factory=list)  # breakdown.csv rows (see equiaudit.breakdown)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# An extra per-head figure computed after the main audit of a checkpoint, with the
# checkpoint's weights loaded: ``(plan, summaries) -> {head: {column: value}}``.
ExtraMetric = Callable[["AuditPlan", dict[str, Summary]], dict[str, dict[str, float]]]


@dataclass
class AuditPlan:
    config: AuditConfig
    preset: TaskPreset
    model: torch.nn.Module
    dataset: dict[str, torch.Tensor]
    spec: OrbitSpec
    rotation_set: RotationSet
    rotations: torch.Tensor
    device: torch.device
    extra_metrics: list[ExtraMetric] = field(default_factory=list)
    breakdown: BreakdownOptions | None = None
    sample_index: torch.Tensor | None = None  # each sample's index in the data file (N,)

    @property
    def n_samples(self) -> int:
        return self.rotations.shape[0]

    def breakdown_identity(self) -> str:
        """What shapes this plan's breakdown rows (the per-sample fields split by, the binning),
        as a string; ``""`` without a breakdown. Built-in splits named in ``by`` add no rows."""
        if self.breakdown is None:
            return ""
        options = dataclasses.asdict(self.breakdown)
        options["by"] = BreakdownCollector.fields(self.dataset, self.breakdown)
        return json.dumps(options, sort_keys=True)

    def evaluate(self, **options) -> OrbitAccumulator:
        """Run :func:`~equiaudit.engine.audit_model` on the plan's model, data and rotations
        (with the rotation set's ``exact``/``blocks`` corrections); ``options`` go through."""
        return audit_model(
            self.model,
            self.dataset,
            self.rotations,
            self.spec,
            batch_size=self.config.batch_size,
            exact=self.rotation_set.exact,
            blocks=getattr(self.rotation_set, "blocks", None),
            device=self.device,
            **options,
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"--device={name!r} is not allowed; allowed: auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def build_orbit_spec(config: AuditConfig, preset: TaskPreset, dataset: dict[str, torch.Tensor]) -> OrbitSpec:
    """Merge the preset's defaults with the config and check them against the data."""
    fields = {**preset.fields, **config.fields}
    if config.heads is None:
        heads_raw = {n: dict(h) for n, h in preset.heads.items() if h["target"] in dataset}
    else:
        heads_raw = {}
        for name, head in config.heads.items():
            merged = dict(preset.heads.get(name, {}))
            merged.update({k: v for k, v in vars(head).items() if v is not None})
            merged.setdefault("target", name)
            if "rep" not in merged:
                raise ConfigError(f"config: heads.{name}.rep is required (no preset default for this head)")
            heads_raw[name] = merged
    if not heads_raw:
        raise ConfigError(f"config: no heads to audit: the data has none of the preset's targets; fields: {', '.join(dataset)}")
    for name, head in heads_raw.items():
        if head["target"] not in dataset:
            raise ConfigError(
                f"config: heads.{name}.target={head['target']!r} is not a field of the data; fields: {', '.join(dataset)}"
            )
    heads = tuple(HeadSpec(name=name, **head) for name, head in heads_raw.items())
    inputs = config.model.inputs if config.model.inputs is not None else list(preset.inputs)
    for field_name in inputs.values() if isinstance(inputs, dict) else inputs:
        if field_name not in dataset:
            raise ConfigError(f"config: model.inputs names {field_name!r}, not a field of the data; fields: {', '.join(dataset)}")
    return OrbitSpec(
        fields=fields,
        heads=heads,
        inputs=inputs,
        outputs=config.model.outputs,
        mask=config.mask if config.mask in dataset else None,
        grad=config.model.grad,
        chunk_size=config.chunk_size,
    )


def task_options(config: AuditConfig, preset: TaskPreset) -> dict[str, Any]:
    """The task's options section (``voxel:`` or ``flow:``) over the preset's defaults."""
    sections = {"voxel_denoising": "voxel", "flow_matching": "flow"}
    for task, section in sections.items():
        if getattr(config, section) and config.task != task:
            raise ConfigError(f"config: '{section}' applies to task {task} only (task is {config.task})")
    given = getattr(config, sections[config.task]) if config.task in sections else {}
    unknown = sorted(set(given) - set(preset.options))
    if unknown:
        section = sections[config.task]
        raise ConfigError(f"config: unknown key '{section}.{unknown[0]}'; allowed: {', '.join(preset.options)}")
    return {**preset.options, **given}


def round_trip_floor(column: str) -> ExtraMetric:
    """A floor metric: the EE of ``R⁻¹·(R·f(x))`` (the model run once, unrotated), over the
    model's own ``loss_aug``, for every head; written as ``column``."""

    def metric(plan: AuditPlan, summaries: dict[str, Summary]) -> dict[str, dict[str, float]]:
        accumulator = plan.evaluate(evaluate=evaluate_round_trip)
        floors = {}
        for head, (_, equiv_error) in accumulator.per_sample().items():
            loss_aug = summaries[head].loss_aug
            floors[head] = {column: equiv_error.mean().item() / loss_aug if loss_aug > 0 else math.nan}
        return floors

    return metric


def grid_settings(
    spec: OrbitSpec, preset: TaskPreset, options: dict[str, Any], dataset: dict[str, torch.Tensor], rotations: torch.Tensor
) -> tuple[OrbitSpec, list[ExtraMetric]]:
    """Voxel grids: cubic-grid check for the exact group; under continuous rotations the
    preset's exact orbit inputs, the spherical mask and the ``interp_floor`` metric."""
    voxel_heads = [h for h in spec.heads if h.rep == "voxel"]
    voxel_fields = [f for f in spec.input_fields if spec.fields.get(f) == "voxel"]
    if not voxel_heads and not voxel_fields:
        return spec, []
    continuous = not is_signed_permutation(rotations)
    for name in voxel_fields + [h.target for h in voxel_heads]:
        shape = tuple(dataset[name].shape[2:])
        if len(shape) != 3:
            raise DataError(f"voxel field {name!r} must be (N, C, D, H, W); got {tuple(dataset[name].shape)}")
        if not continuous and len(set(shape)) != 1:
            raise ConfigError(
                f"cube rotations permute voxels and need cubic grids; {name!r} is (D, H, W) = {shape}: use group so3"
            )
    use_mask = options.get("spherical_mask", "auto")
    if use_mask not in ("auto", True, False):
        raise ConfigError(f"config: voxel.spherical_mask={use_mask!r} is not allowed; allowed: auto, true, false")
    weights = {}
    if use_mask is True or (use_mask == "auto" and continuous):
        weights = {h.name: spherical_mask(tuple(dataset[h.target].shape[2:]))[None, None] for h in voxel_heads}
    builder = preset.orbit_inputs(options, dataset) if preset.orbit_inputs is not None and continuous else None
    spec = dataclasses.replace(spec, orbit_inputs=builder, head_weights={**spec.head_weights, **weights})
    return spec, [round_trip_floor("interp_floor")] if continuous else []


def extra_group_set(config: AuditConfig, preset: TaskPreset, dataset: dict[str, torch.Tensor], spec: OrbitSpec):
    """The set of an ``o3``, ``translation`` or ``permutation`` audit; ``ValueError`` when it cannot apply."""
    name = config.group or preset.group
    if name != "o3" and any(rep == "voxel" for rep in [*spec.fields.values(), *(h.rep for h in spec.heads)]):
        raise ValueError(f"{name} does not act on voxel grids; use so3, o3 or octahedral")
    mask = dataset.get(spec.mask) if spec.mask else None
    points = [v for f, v in dataset.items() if spec.fields.get(f) == "point" and v.dim() == 3]
    n_atoms = mask.shape[1] if mask is not None else (points[0].shape[1] if points else None)
    return make_extra_group(name, config.rotations, config.group_options, n_atoms=n_atoms)


def analysis_settings(
    config: AuditConfig, dataset: dict[str, torch.Tensor], spec: OrbitSpec, rotation_set
) -> tuple[OrbitSpec, list[ExtraMetric], BreakdownOptions]:
    """The group's action and autocast on the spec; the float floor (always) and ``--local``
    metrics; the breakdown options, checked against the data."""
    if config.group_options and not hasattr(rotation_set, "action"):
        raise ConfigError(f"config: group.{next(iter(config.group_options))} does not apply to group {rotation_set.group}")
    autocast = getattr(torch, config.model.autocast) if config.model.autocast else None
    spec = dataclasses.replace(spec, group=group_action(rotation_set), autocast=autocast)
    metrics: list[ExtraMetric] = [float_floor_metric] + ([local_metric] if config.local else [])
    known = {k: v for k, v in config.breakdown.items() if k in ("elements", "worst", "bins")}
    options = BreakdownOptions(by=tuple(config.breakdown.get("by", ())), **known)
    try:
        BreakdownCollector.fields(dataset, options)
    except ValueError as exc:
        raise ConfigError(f"config: {exc}; or one of: {', '.join(BUILTIN_SPLITS)}") from exc
    return spec, metrics, options


# Budget for one float64 orbit tensor (B, K, *E) of one head when batch_size is not set:
# large grids (VoxMol's 64³ × 8 channels) then get small batches instead of running out of memory.
ORBIT_BYTES = 64 * 2**20
DEFAULT_BATCH_SIZE = 64


def default_batch_size(dataset: dict[str, torch.Tensor], spec: OrbitSpec, n_rotations: int) -> int:
    """At most 64 samples per batch, fewer when one head's orbit would exceed :data:`ORBIT_BYTES`."""
    largest = max(dataset[h.target][0].numel() for h in spec.heads)
    return int(max(1, min(DEFAULT_BATCH_SIZE, ORBIT_BYTES // (8 * n_rotations * largest))))


def prepare_audit(config: AuditConfig, *, device: str | torch.device = "auto") -> AuditPlan:
    """Build everything that stays fixed across the checkpoints of an audit."""
    device = resolve_device(device) if isinstance(device, str) else device
    preset = get_task(config.task)
    options = task_options(config, preset)
    dataset, sample_index = load_dataset(
        config.data.path, config.data.keys, samples=config.data.samples, subset_seed=config.data.subset_seed, return_index=True
    )
    dataset = preset.prepare(dataset, options, torch.Generator().manual_seed(config.seed + PREPARE_STREAM))
    spec = build_orbit_spec(config, preset, dataset)
    try:
        if (config.group or preset.group) in EXTRA_GROUP_NAMES:
            if config.sampling not in (None, "haar"):
                raise ValueError(f"sampling {config.sampling!r} applies to so3 only")
            rotation_set = extra_group_set(config, preset, dataset, spec)
        else:
            rotation_set = make_rotation_set(config.group or preset.group, config.rotations, config.sampling)
    except ValueError as exc:
        raise ConfigError(f"config: group: {exc}") from exc
    n_samples = len(next(iter(dataset.values())))
    rotations = rotation_set.sample(n_samples, torch.Generator().manual_seed(config.seed))
    spec, extra_metrics = grid_settings(spec, preset, options, dataset, rotations)
    spec, more_metrics, breakdown = analysis_settings(config, dataset, spec, rotation_set)
    extra_metrics = extra_metrics + more_metrics
    if "batch_size" not in config.raw:
        config = dataclasses.replace(config, batch_size=default_batch_size(dataset, spec, rotation_set.n_rotations))
    model = build_model(config.model.factory, config.model.kwargs, config.source.parent if config.source else None)
    model = model.to(device=device, dtype=getattr(torch, config.model.dtype)).eval()
    return AuditPlan(config, preset, model, dataset, spec, rotation_set, rotations, device, extra_metrics, breakdown, sample_index)


def audit_checkpoint(
    plan: AuditPlan,
    ref: CheckpointRef,
    *,
    on_batch: Callable[[int, int], None] | None = None,
) -> CheckpointResult:
    """Load one checkpoint into the plan's model and audit it; never raises for a bad checkpoint."""
    start = time.perf_counter()
    step = ref.step
    try:
        loaded = read_checkpoint(ref.path, map_location=plan.device)
        step = loaded.step if loaded.step is not None else step
        load_into_model(plan.model, loaded)
        plan.model.to(dtype=getattr(torch, plan.config.model.dtype)).eval()
        collector = BreakdownCollector(plan.spec) if plan.breakdown is not None else None
        accumulator = plan.evaluate(on_batch=on_batch, on_result=collector.update if collector is not None else None)
        summaries = accumulator.compute(n_bootstrap=plan.config.bootstrap, seed=plan.config.seed)
        breakdown = collector.rows(plan.dataset, plan.rotations, plan.breakdown, plan.sample_index) if collector is not None else []
        extras: dict[str, dict[str, float]] = {}
        for metric in plan.extra_metrics:
            for head, columns in metric(plan, summaries).items():
                extras.setdefault(head, {}).update(columns)
    except EquiauditError as exc:
        return CheckpointResult(ref, exc.status, str(exc), step, seconds=time.perf_counter() - start)
    except torch.OutOfMemoryError:
        message = "out of memory; lower batch_size or chunk_size in the config"
        return CheckpointResult(ref, "out_of_memory", message, step, seconds=time.perf_counter() - start)
    except RuntimeError as exc:
        # A model that crashes on these inputs fails this checkpoint, not the run.
        reason = first_line(exc)
        if "does not require grad" in reason and not plan.spec.grad:
            reason += " (if the model takes forces by autograd, set model.grad: true)"
        return CheckpointResult(ref, "model_error", f"the model failed: {reason}", step, seconds=time.perf_counter() - start)
    return CheckpointResult(ref, "ok", None, step, summaries, extras, seconds=time.perf_counter() - start, breakdown=breakdown)


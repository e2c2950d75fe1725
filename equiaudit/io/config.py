"""The audit settings: the YAML config, its keys as Python keywords, validation. The only place config is read.

One schema serves every face: a YAML file (``equiaudit audit CONFIG``), a mapping, and the
keyword arguments of :func:`equiaudit.audit` / :class:`equiaudit.EquivarianceMetric`, which
are the YAML keys with the same names, defaults and checks (nested keys are reached by
the short names of :data:`KEYWORDS`: ``inputs=`` is ``model.inputs``, ``rotations=`` is
``group.rotations``, ``samples=`` is ``data.samples``...). Every problem raises
:class:`~equiaudit.errors.ConfigError` with one line naming the key, the bad value and what
is allowed. Relative paths are resolved against the working directory first, then against
the config file's folder.

Size guard: a config is data, but YAML aliases let 800 bytes stand for gigabytes once
expanded ("billion laughs"); a config whose expansion exceeds :data:`MAX_CONFIG_VALUES`
values is refused before anything uses it.

Work bounds: sizes that set how much memory or time the audit takes are refused up front
(exit 2, the bound named) beyond limits no real use reaches — :data:`MAX_ROTATIONS`,
:data:`MAX_BOOTSTRAP`, :data:`MAX_ROTATION_ROWS` (rotations × samples, checked once the data
is read), :data:`MAX_ATOMS` (atoms per structure, ``data.max_atoms``) and the dynamics and
breakdown sizes of :data:`SIZE_LIMITS`. docs/safety.md lists every bound.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from equiaudit.errors import ConfigError, DataError
from equiaudit.groups import SAMPLINGS, group_names, group_options
from equiaudit.metrics import LOSS_NAMES
from equiaudit.representations import is_representation, representation_names
from equiaudit.tasks import task_names, task_sections

__all__ = [
    "AuditConfig", "ModelConfig", "DataConfig", "HeadConfig", "load_config", "parse_config", "settings_mapping",
    "read_yaml", "apply_overrides", "KEYWORDS", "MAX_CONFIG_VALUES", "WEIGHT_SETS", "MAX_ROTATIONS", "MAX_BOOTSTRAP",
    "MAX_ROTATION_ROWS", "MAX_ATOMS", "SIZE_LIMITS", "check_rotation_rows",
]

BASE_KEYS = (
    "task", "model", "checkpoints", "data", "fields", "heads", "group", "seed",
    "batch_size", "chunk_size", "bootstrap", "mask", "name", "local", "breakdown",
    "float_floor", "interp_floor", "dynamics", "target_ci", "min_skill",
)
MODEL_KEYS = ("factory", "family", "kwargs", "inputs", "outputs", "grad", "dtype", "autocast")
DATA_KEYS = ("path", "keys", "samples", "subset_seed", "follow_external", "max_atoms",
             "atoms", "units", "chains", "frames", "max_residues", "strict")
# data.* keys of protein structure files (equiaudit.io.data_structures)
STRUCTURE_KEYS = ("atoms", "units", "chains", "frames", "max_residues", "strict")
HEAD_KEYS = ("rep", "target", "loss", "weight", "output", "huber_delta")
CHECKPOINT_KEYS = ("path", "weights", "prefix")
WEIGHT_SETS = ("auto", "raw", "ema")
MODEL_DTYPES = ("float32", "float64", "bfloat16", "float16")
AUTOCAST_DTYPES = ("bfloat16", "float16")
BREAKDOWN_KEYS = ("by", "elements", "worst", "bins")
DYNAMICS_KEYS = ("gradients", "twirl", "hessian", "params", "track_params", "landscape", "grid", "samples", "tol", "max_iter",
                 "twirl_target")
INTERP_FLOOR = ("auto", True, False)
# Python keywords that name nested keys (everything else is a top-level key of the same name).
KEYWORDS = {
    "inputs": "model.inputs", "outputs": "model.outputs", "grad": "model.grad", "dtype": "model.dtype",
    "autocast": "model.autocast", "factory": "model.factory", "kwargs": "model.kwargs",
    "rotations": "group.rotations", "sampling": "group.sampling", "radius": "group.radius", "shape": "group.shape",
    "samples": "data.samples", "keys": "data.keys", "subset_seed": "data.subset_seed",
    "by": "breakdown.by", "weights": "checkpoints.weights", "prefix": "checkpoints.prefix",
    "hessian": "dynamics.hessian", "params": "dynamics.params", "track_params": "dynamics.track_params",
    "landscape": "dynamics.landscape", "twirl": "dynamics.twirl", "twirl_target": "dynamics.twirl_target",
}
MAX_CONFIG_VALUES = 100_000
# Work bounds (docs/safety.md). Each is far beyond real use and far below what would exhaust
# a machine: one rotation is 72 bytes (float64 3×3) per sample, one bootstrap resample one
# pass over the samples per interval.
MAX_ROTATIONS = 100_000  # group.rotations: audits use 8–64; Monte Carlo error ∝ 1/√K, 0.3 % at 10⁵
MAX_BOOTSTRAP = 100_000  # bootstrap: the 95 % quantile's Monte Carlo error is then ~0.3 % (normal |t|)
MAX_ROTATION_ROWS = 100_000_000  # (sample, rotation) pairs held at once: 7.2 GB of float64 rotations
MAX_ATOMS = 1_000_000  # data.max_atoms default: atoms in one structure of a text file (extxyz), checked before parsing
SIZE_LIMITS = {  # the other sizes whose work grows with the value
    "dynamics.grid": 1_000,  # grid × grid loss-landscape evaluations
    "dynamics.hessian": 1_000,  # Hessian eigenvalues: Lanczos vectors kept in memory
    "dynamics.max_iter": 10_000,
    "breakdown.worst": 1_000_000,
    "breakdown.bins": 10_000,
}


def top_level_keys() -> tuple[str, ...]:
    """The config's top-level keys: the base ones and each task's options section."""
    return BASE_KEYS + tuple(task_sections())


def group_keys() -> tuple[str, ...]:
    return ("name", "rotations") + group_options()


@dataclass(frozen=True)
class ModelConfig:
    factory: str | None  # None when the caller passes a built model (Python API)
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] | dict[str, str] | None = None
    outputs: list[str] | None = None
    grad: bool = False
    dtype: str | None = "float32"  # None: a model the caller built keeps its own dtype
    autocast: str | None = None  # run the model under torch.autocast at this dtype
    family: str | None = None  # a model family (equiaudit.zoo.families) builds the model instead of a factory
    source: Path | None = None  # the checkpoint a family builds from (chosen by the CLI; not a setting)
    allow_torchscript: bool = False  # the CLI's --allow-torchscript (never from a config file)


@dataclass(frozen=True)
class DataConfig:
    path: Path | None  # None when the caller passes the data (Python API)
    keys: dict[str, str] = field(default_factory=dict)
    samples: int | None = None
    subset_seed: int | None = None
    follow_external: bool = False  # HDF5: follow external links / virtual sources outside the file's folder
    max_atoms: int = MAX_ATOMS  # atoms per structure a text file may declare (checked before parsing)
    # PDB/mmCIF options (atoms, units, chains, frames, max_residues, strict), with the task's
    # defaults (protein_flow: units nm): see equiaudit.io.data_structures
    structures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadConfig:
    rep: str | None = None
    target: str | None = None
    loss: str | None = None
    weight: float | None = None
    output: str | None = None
    huber_delta: float | None = None


@dataclass(frozen=True)
class AuditConfig:
    """A validated config. ``heads``/``fields`` hold only what the user wrote; the task
    preset fills in the defaults (see :mod:`equiaudit.tasks`)."""

    task: str
    model: ModelConfig
    data: DataConfig
    checkpoints: Path | None = None
    weights: str = "auto"  # checkpoints.weights: which weight set (auto prefers an EMA)
    prefix: str | None = None  # checkpoints.prefix: add or strip this key prefix
    fields: dict[str, str] = field(default_factory=dict)
    heads: dict[str, HeadConfig] | None = None
    group: str | None = None
    rotations: int | None = None
    sampling: str | None = None  # so3: haar | quasi | fibonacci (None: the default)
    seed: int = 0
    batch_size: int = 64
    chunk_size: int | str = "auto"  # rotated samples per forward pass; "auto": measured (equiaudit.chunking)
    bootstrap: int = 1000
    mask: str = "mask"
    task_options: dict[str, Any] = field(default_factory=dict)  # the task's section (flow:, voxel:)
    name: str | None = None
    group_options: dict[str, Any] = field(default_factory=dict)  # e.g. so3 sampling, translation radius
    local: bool = False
    float_floor: bool = True
    interp_floor: str | bool = "auto"
    dynamics: dict[str, Any] | None = None  # the dynamics section, normalised (None: not asked)
    breakdown: dict[str, Any] = field(default_factory=dict)
    target_ci: float | None = None  # --target-ci: samples in order until the total REE's 95 % CI is ± this
    min_skill: float = 0.1  # --min-skill: below it a checkpoint is flagged not_learned (equiaudit.null)
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def settings_hash(self) -> str:
        """Hash of everything that changes the numbers: not the checkpoint paths, nor the
        breakdown and dynamics options (they add rows to breakdown.csv, dynamics.csv, twirl.csv
        but change no summary number; the cache tells them apart by their own identity);
        the weight set and prefix count when given."""
        relevant = {k: v for k, v in self.raw.items() if k not in ("checkpoints", "name", "breakdown", "dynamics")}
        chosen = {k: v for k, v in (self.raw.get("checkpoints") or {}).items() if k in ("weights", "prefix")} \
            if isinstance(self.raw.get("checkpoints"), Mapping) else {}
        if chosen:
            relevant["checkpoints"] = chosen
        blob = json.dumps(relevant, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _check_keys(section: str, mapping: Any, allowed: tuple[str, ...]) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"config: '{section}' must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(f"config: unknown key '{where}'; allowed: {', '.join(allowed)}")
    return dict(mapping)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"config: {key}={value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


def _structure_options(task: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The structure-file keys of ``data`` over the task's data defaults, checked."""
    from equiaudit.io.data_structures import check_structure_options
    from equiaudit.tasks import get_task

    given = {**getattr(get_task(task), "data_defaults", {}), **{k: data[k] for k in STRUCTURE_KEYS if k in data}}
    try:
        check_structure_options(given)
    except DataError as exc:
        raise ConfigError(f"config: {exc}") from None
    return given


def _representation(key: str, value: Any) -> str:
    """A registered representation or an e3nn irreps string (``1x0e+1x2e``)."""
    if not is_representation(value):
        allowed = ", ".join(representation_names())
        raise ConfigError(f"config: {key}={value!r} is not allowed; allowed: {allowed} or an e3nn irreps string (1x0e+1x1o+1x2e)")
    return value


def _positive_int(key: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config: {key}={value!r} must be an integer ≥ {minimum}")
    maximum = SIZE_LIMITS.get(key) if maximum is None else maximum
    if maximum is not None and value > maximum:
        raise ConfigError(f"config: {key}={value:,} is over its bound of {maximum:,} (refused before any work; "
                          "see docs/safety.md)")
    return value


def check_rotation_rows(n_rows: int, n_rotations: int) -> None:
    """Refuse holding ``n_rows × n_rotations`` rotations (``(N, K, 3, 3)`` float64, 72 bytes
    each) beyond :data:`MAX_ROTATION_ROWS`: one line naming both sizes, before allocating."""
    if n_rows * n_rotations > MAX_ROTATION_ROWS:
        gigabytes = n_rows * n_rotations * 72 / 1e9
        raise ConfigError(
            f"config: {n_rows:,} samples × {n_rotations:,} rotations = {n_rows * n_rotations:,} rotations to hold "
            f"({gigabytes:,.1f} GB), over the bound of {MAX_ROTATION_ROWS:,}: lower group.rotations or data.samples"
        )


def _chunk_size(value: Any) -> int | str:
    """``chunk_size``: ``auto`` (measured: :mod:`equiaudit.chunking`) or a positive integer."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config: chunk_size={value!r} must be 'auto' or an integer ≥ 1")
    return value


def resolve_path(value: str | Path, base: Path | None) -> Path:
    """A relative path is taken from the working directory, else from the config's folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or base is None or path.exists() or any(ch in str(value) for ch in "*?["):
        return path
    beside = base / path
    return beside if beside.exists() else path


def _parse_model(raw: Any, model_given: bool) -> ModelConfig:
    family = raw.get("family") if isinstance(raw, Mapping) else None
    family_options: dict[str, Any] = {}
    if family is not None:
        from equiaudit.zoo.families.base import family_names

        if family not in family_names():
            raise ConfigError(f"config: model.family={family!r} is not a known family; known: {', '.join(family_names())}")
        if raw.get("factory") is not None:
            raise ConfigError("config: give model.family or model.factory, not both")
        # Other keys under model: are the family's options (model: {family: orb, name: orb_v3_direct_20_omat}).
        family_options = {k: v for k, v in raw.items() if k not in MODEL_KEYS}
        raw = {k: v for k, v in raw.items() if k in MODEL_KEYS}
    model = _check_keys("model", raw, MODEL_KEYS)
    factory = model.get("factory")
    if (factory is None and model_given) or family is not None:
        pass  # the caller built the model, or a family builds it: nothing is imported
    elif not isinstance(factory, str) or ":" not in factory:
        raise ConfigError(
            f"config: model.factory={factory!r} must be 'package.module:callable' or 'path/to/file.py:callable'"
        )
    inputs = model.get("inputs")
    if inputs is not None and not (
        (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs))
        or (isinstance(inputs, Mapping) and all(isinstance(v, str) for v in inputs.values()))
    ):
        raise ConfigError("config: model.inputs must be a list of field names or a mapping {argument: field}")
    outputs = model.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise ConfigError("config: model.outputs must be a list of output names")
    kwargs = model.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError("config: model.kwargs must be a mapping")
    kwargs = {**family_options, **kwargs}
    grad = model.get("grad", False)
    if not isinstance(grad, bool):
        raise ConfigError(f"config: model.grad={grad!r} must be true or false")
    # A model the caller built keeps its own dtype unless model.dtype says otherwise.
    dtype = model.get("dtype", None if model_given else "float32")
    autocast = model.get("autocast")
    return ModelConfig(
        factory=factory,
        family=family,
        kwargs=dict(kwargs),
        inputs=dict(inputs) if isinstance(inputs, Mapping) else inputs,
        outputs=outputs,
        grad=grad,
        dtype=None if dtype is None else _choice("model.dtype", dtype, MODEL_DTYPES),
        autocast=None if autocast is None else _choice("model.autocast", _AUTOCAST_ALIASES.get(autocast, autocast), AUTOCAST_DTYPES),
    )


_AUTOCAST_ALIASES = {"bf16": "bfloat16", "fp16": "float16"}


def _parse_breakdown(raw: Any) -> dict[str, Any]:
    section = _check_keys("breakdown", raw, BREAKDOWN_KEYS)
    by = section.get("by", [])
    if isinstance(by, str):
        by = [b.strip() for b in by.split(",") if b.strip()]
    if isinstance(by, tuple):
        by = list(by)
    if not isinstance(by, list) or not all(isinstance(b, str) for b in by):
        raise ConfigError(f"config: breakdown.by={by!r} must be a list of split or field names")
    if "elements" in section and not isinstance(section["elements"], str):
        raise ConfigError(f"config: breakdown.elements={section['elements']!r} must be a field name")
    for key in ("worst", "bins"):
        if key in section:
            _positive_int(f"breakdown.{key}", section[key])
    return {**section, "by": by}


def _parse_dynamics(raw: Any) -> dict[str, Any] | None:
    """``dynamics: true`` (gradients and twirling), ``false``/absent (None), or a mapping."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    section = _check_keys("dynamics", raw, DYNAMICS_KEYS)
    out: dict[str, Any] = {}
    for key in ("gradients", "twirl"):
        out[key] = section.get(key, True)
        if not isinstance(out[key], bool):
            raise ConfigError(f"config: dynamics.{key}={out[key]!r} must be true or false")
    out["hessian"] = _positive_int("dynamics.hessian", section.get("hessian", 0), minimum=0)
    for key in ("params", "track_params"):
        value = section.get(key, [])
        value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config: dynamics.{key}={section.get(key)!r} must be a parameter-name glob or a list of them")
        out[key] = tuple(value)
    landscape = section.get("landscape", ())
    if isinstance(landscape, str):
        landscape = [int(v) for v in landscape.split(",") if v.strip().isdigit()] if landscape.strip() else []
    if isinstance(landscape, bool):
        out["landscape"] = landscape
    elif isinstance(landscape, int):
        out["landscape"] = (landscape,)
    elif isinstance(landscape, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in landscape):
        out["landscape"] = tuple(landscape)
    else:
        raise ConfigError(f"config: dynamics.landscape={section.get('landscape')!r} must be true or a list of steps")
    out["grid"] = _positive_int("dynamics.grid", section.get("grid", 20), minimum=3)
    samples = section.get("samples")
    out["samples"] = None if samples is None else _positive_int("dynamics.samples", samples)
    out["tol"] = _number("dynamics.tol", section.get("tol", 1e-3))
    if not 0 < out["tol"] < 1:
        raise ConfigError(f"config: dynamics.tol={out['tol']!r} must be in (0, 1)")
    out["max_iter"] = _positive_int("dynamics.max_iter", section.get("max_iter", 40))
    out["twirl_target"] = _number("dynamics.twirl_target", section.get("twirl_target", 0.9))
    if not 0 < out["twirl_target"] < 1:
        raise ConfigError(f"config: dynamics.twirl_target={out['twirl_target']!r} must be in (0, 1): the share of EE "
                          "the k-rotation average should remove")
    return out


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config: {key}={value!r} must be a number")
    return float(value)


def _parse_heads(raw: Any) -> dict[str, HeadConfig] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("config: 'heads' must be a non-empty mapping {head_name: {rep, target, loss, weight}}")
    heads = {}
    for name, spec in raw.items():
        spec = _check_keys(f"heads.{name}", spec, HEAD_KEYS)
        if "rep" in spec:
            _representation(f"heads.{name}.rep", spec["rep"])
        if "loss" in spec:
            _choice(f"heads.{name}.loss", spec["loss"], LOSS_NAMES)
        if "weight" in spec:
            weight = _number(f"heads.{name}.weight", spec["weight"])
            if not (math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"config: heads.{name}.weight={spec['weight']!r} must be a finite number ≥ 0")
        if "huber_delta" in spec:
            delta = _number(f"heads.{name}.huber_delta", spec["huber_delta"])
            if not (math.isfinite(delta) and delta > 0):
                raise ConfigError(f"config: heads.{name}.huber_delta={spec['huber_delta']!r} must be a finite number > 0")
        for text in ("target", "output"):
            if text in spec and not isinstance(spec[text], str):
                raise ConfigError(f"config: heads.{name}.{text}={spec[text]!r} must be a field name")
        heads[str(name)] = HeadConfig(**spec)
    if all(h.weight == 0 for h in heads.values() if h.weight is not None) and all(h.weight is not None for h in heads.values()):
        raise ConfigError("config: every head has weight 0: the total would be empty; give one head a positive weight")
    return heads


def _check_size(raw: Any, limit: int = MAX_CONFIG_VALUES) -> None:
    """Refuse a config that expands to more than ``limit`` values (YAML aliases can make a
    few hundred bytes stand for gigabytes). Shared sub-objects are counted every time they
    are reached, as any use of the config (hashing, run.json) would expand them."""
    count = 0
    stack = [raw]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            raise ConfigError(
                f"config: expands to more than {limit:,} values (YAML aliases such as '*name' repeat what they "
                "point to); refused before use — write the values out, or shorten the config"
            )
        if isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, str) and len(node) > limit:
            raise ConfigError(f"config: a string of {len(node):,} characters; refused (the limit is {limit:,})")


def parse_config(raw: Any, source: Path | None = None, *, model_given: bool = False, data_given: bool = False) -> AuditConfig:
    """Validate a config mapping (as loaded from YAML, or built from keywords).

    ``model_given``/``data_given``: the caller passes the model object / the data (Python
    API), so ``model.factory`` / ``data.path`` are not required.
    """
    _check_size(raw)
    top = _check_keys("", raw, top_level_keys())
    base = source.parent if source is not None else None
    task = _choice("task", top.get("task", "custom"), task_names())
    if "model" not in top and not model_given:
        raise ConfigError("config: missing key 'model' (needs at least model.factory)")
    data = _check_keys("data", top.get("data"), DATA_KEYS)
    if "path" not in data and not data_given:
        raise ConfigError("config: missing key 'data.path'")
    keys = data.get("keys") or {}
    if not isinstance(keys, Mapping):
        raise ConfigError("config: data.keys must be a mapping {field: key_in_file}")
    samples = data.get("samples")
    subset_seed = data.get("subset_seed")
    follow_external = data.get("follow_external", False)
    if not isinstance(follow_external, bool):
        raise ConfigError(f"config: data.follow_external={follow_external!r} must be true or false")
    max_atoms = _positive_int("data.max_atoms", data.get("max_atoms", MAX_ATOMS))
    if subset_seed is not None and (isinstance(subset_seed, bool) or not isinstance(subset_seed, int)):
        raise ConfigError(f"config: data.subset_seed={subset_seed!r} must be an integer")
    fields = top.get("fields") or {}
    if not isinstance(fields, Mapping):
        raise ConfigError("config: 'fields' must be a mapping {field: representation}")
    for name, rep in fields.items():
        _representation(f"fields.{name}", rep)
    group = top.get("group")
    group = {"name": group} if isinstance(group, str) else group
    group = _check_keys("group", group, group_keys())
    if "name" in group:
        _choice("group.name", group["name"], group_names())
    rotations = group.get("rotations")
    if rotations is not None:
        _positive_int("group.rotations", rotations, minimum=2, maximum=MAX_ROTATIONS)
    if group.get("sampling") is not None:
        _choice("group.sampling", group["sampling"], SAMPLINGS)
    checkpoints = top.get("checkpoints")
    checkpoints = {"path": checkpoints} if isinstance(checkpoints, (str, Path)) else checkpoints
    checkpoints = _check_keys("checkpoints", checkpoints, CHECKPOINT_KEYS)
    weights = _choice("checkpoints.weights", checkpoints.get("weights", "auto"), WEIGHT_SETS)
    prefix = checkpoints.get("prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ConfigError(f"config: checkpoints.prefix={prefix!r} must be a key prefix such as 'model.'")
    sections = task_sections()
    for section, owner in sections.items():
        if top.get(section) is not None and not isinstance(top[section], Mapping):
            raise ConfigError(f"config: '{section}' must be a mapping")
        if top.get(section) and task not in owner:
            raise ConfigError(f"config: '{section}' applies to task {' or '.join(owner)} only (task is {task})")
    seed = top.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"config: seed={seed!r} must be an integer")
    flags = {}
    for key, default in (("local", False), ("float_floor", True)):
        flags[key] = top.get(key, default)
        if not isinstance(flags[key], bool):
            raise ConfigError(f"config: {key}={flags[key]!r} must be true or false")
    interp = top.get("interp_floor", "auto")
    if interp not in INTERP_FLOOR:
        raise ConfigError(f"config: interp_floor={interp!r} is not allowed; allowed: auto, true, false")
    target_ci = top.get("target_ci")
    if target_ci is not None:
        if isinstance(target_ci, bool) or not isinstance(target_ci, (int, float)) or not 0 < target_ci < 1:
            raise ConfigError(f"config: target_ci={target_ci!r} must be a half-width in REE fraction units, "
                              "between 0 and 1 (0.002 = ±0.2 percentage points)")
        if top.get("bootstrap", 1000) == 0:
            raise ConfigError("config: target_ci needs the bootstrap interval; bootstrap=0 turns it off")
    min_skill = top.get("min_skill", 0.1)
    if isinstance(min_skill, bool) or not isinstance(min_skill, (int, float)) or not -1 <= min_skill < 1:
        raise ConfigError(f"config: min_skill={min_skill!r} must be a number in [-1, 1) (the skill 1 − L_sym/loss_null "
                          "below which a checkpoint is flagged not_learned; 0.1 by default)")
    own_section = next((section for section, owner in sections.items() if task in owner), None)
    path = data.get("path")
    return AuditConfig(
        task=task,
        model=_parse_model(top.get("model") or {}, model_given),
        data=DataConfig(
            path=None if path is None else resolve_path(path, base),
            keys={str(k): str(v) for k, v in keys.items()},
            samples=None if samples is None else _positive_int("data.samples", samples),
            subset_seed=subset_seed,
            follow_external=follow_external,
            max_atoms=max_atoms,
            structures=_structure_options(task, data),
        ),
        checkpoints=None if checkpoints.get("path") is None else resolve_path(checkpoints["path"], base),
        weights=weights,
        prefix=prefix,
        fields={str(k): v for k, v in fields.items()},
        heads=_parse_heads(top.get("heads")),
        group=group.get("name"),
        rotations=rotations,
        sampling=group.get("sampling"),
        seed=seed,
        batch_size=_positive_int("batch_size", top.get("batch_size", 64)),
        chunk_size=_chunk_size(top.get("chunk_size", "auto")),
        bootstrap=_positive_int("bootstrap", top.get("bootstrap", 1000), minimum=0, maximum=MAX_BOOTSTRAP),
        mask=str(top.get("mask", "mask")),
        task_options=dict(top.get(own_section) or {}) if own_section else {},
        name=None if top.get("name") is None else str(top.get("name")),
        group_options={k: group[k] for k in group_options() if k in group},
        local=flags["local"],
        float_floor=flags["float_floor"],
        interp_floor=interp,
        dynamics=_parse_dynamics(top.get("dynamics")),
        breakdown=_parse_breakdown(top.get("breakdown")),
        target_ci=None if target_ci is None else float(target_ci),
        min_skill=float(min_skill),
        source=source,
        raw=json.loads(json.dumps(dict(top), default=str)),
    )


_BINARY_SUFFIXES = {".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".tar", ".npz", ".npy", ".h5", ".hdf5", ".db", ".aselmdb"}
_CONFIG_HINT = ("the first argument is a YAML audit config (see sample_configs/); write one with "
                "`equiaudit init CHECKPOINT DATA`, then `equiaudit audit CONFIG.yaml CHECKPOINT`")


def _not_a_config(path: Path) -> str:
    """Why ``path`` cannot be the YAML config: missing, a directory, or a checkpoint/data file."""
    if path.is_dir():
        return f"config: {path} is a directory (a training run's folder?), not a YAML config: {_CONFIG_HINT}"
    if not path.exists():
        return f"config file not found: {path} ({_CONFIG_HINT})"
    kind = "a data file" if path.suffix in {".npz", ".npy", ".h5", ".hdf5", ".db", ".aselmdb"} else "a checkpoint or other binary file"
    return f"config: {path} is {kind}, not a YAML config: {_CONFIG_HINT}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file (safe loader: tags such as ``!!python`` are refused)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(_not_a_config(path))
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80" or head[:8] == b"\x89HDF\r\n\x1a\n" or path.suffix in _BINARY_SUFFIXES:
            raise ConfigError(_not_a_config(path))
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config: {path} is not valid YAML{where}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(_not_a_config(path)) from exc
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path} ({type(exc).__name__})") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    _check_size(raw)
    return dict(raw)


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``raw`` with dotted keys (``group.rotations``) set; ``None`` values are skipped.
    Nested mappings are copied, never modified in place."""
    raw = json.loads(json.dumps(dict(raw), default=str)) if raw else {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif isinstance(child, str) and key == "group":
                child = node[key] = {"name": child}  # group: so3 → group: {name: so3, ...}
            elif isinstance(child, str) and key == "checkpoints":
                child = node[key] = {"path": child}
            elif isinstance(child, bool) and key == "dynamics":
                child = node[key] = {} if child else {"gradients": False, "twirl": False}
            elif not isinstance(child, dict):
                raise ConfigError(f"config: cannot override {dotted}: '{key}' is not a mapping")
            node = child
        if value is True and isinstance(node.get(leaf), dict):
            continue  # turning on a section the config already spells out keeps its settings
        node[leaf] = value
    return raw


def settings_mapping(config: str | Path | Mapping[str, Any] | None, keywords: Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The raw config of the Python API: ``config`` (a YAML path, a mapping or None) with the
    keyword arguments on top. Keywords are top-level keys or the short names of :data:`KEYWORDS`;
    an unknown keyword is a ConfigError naming the allowed ones."""
    source = None
    if config is None:
        raw: dict[str, Any] = {}
    elif isinstance(config, (str, Path)):
        source = Path(config)
        raw = read_yaml(source)
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raise ConfigError(f"config= must be a YAML path or a mapping, got {type(config).__name__}")
    _check_size(raw)
    allowed = top_level_keys() + tuple(KEYWORDS)
    overrides = {}
    for key, value in keywords.items():
        if key not in allowed:
            raise ConfigError(f"unknown keyword {key}=; allowed: {', '.join(allowed)}")
        if key == "group" and isinstance(value, str) and isinstance(raw.get("group"), Mapping):
            overrides["group.name"] = value  # group="so3" beside a config's group section
        else:
            overrides[KEYWORDS.get(key, key)] = value
    return apply_overrides(raw, overrides), source


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> AuditConfig:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``group.rotations``)."""
    path = Path(path)
    return parse_config(apply_overrides(read_yaml(path), overrides), source=path)

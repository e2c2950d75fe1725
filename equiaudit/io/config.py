"""The YAML audit config: parse, validate, resolve paths. The only place config is read.

Every problem raises :class:`~equiaudit.errors.ConfigError` with one line naming the
key, the bad value and what is allowed. Relative paths are resolved against the
working directory first, then against the config file's folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from equiaudit.actions import REPRESENTATIONS
from equiaudit.errors import ConfigError
from equiaudit.groups import GROUP_NAMES, SAMPLINGS
from equiaudit.groups_extra import EXTRA_GROUP_NAMES, GROUP_OPTIONS
from equiaudit.metrics import LOSS_NAMES

__all__ = ["AuditConfig", "ModelConfig", "DataConfig", "HeadConfig", "load_config", "parse_config", "TASK_NAMES"]

TASK_NAMES = ("force_field", "flow_matching", "voxel_denoising", "custom")
TOP_LEVEL_KEYS = (
    "task", "model", "checkpoints", "data", "fields", "heads", "group", "seed",
    "batch_size", "chunk_size", "bootstrap", "mask", "voxel", "flow", "name",
    "local", "breakdown",
)
MODEL_KEYS = ("factory", "kwargs", "inputs", "outputs", "grad", "dtype", "autocast")
DATA_KEYS = ("path", "keys", "samples", "subset_seed")
HEAD_KEYS = ("rep", "target", "loss", "weight", "output", "huber_delta")
GROUP_KEYS = ("name", "rotations", "sampling") + GROUP_OPTIONS
MODEL_DTYPES = ("float32", "float64", "bfloat16", "float16")
AUTOCAST_DTYPES = ("bfloat16", "float16")
BREAKDOWN_KEYS = ("by", "elements", "worst", "bins")


@dataclass(frozen=True)
class ModelConfig:
    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] | dict[str, str] | None = None
    outputs: list[str] | None = None
    grad: bool = False
    dtype: str = "float32"
    autocast: str | None = None  # run the model under torch.autocast at this dtype


@dataclass(frozen=True)
class DataConfig:
    path: Path
    keys: dict[str, str] = field(default_factory=dict)
    samples: int | None = None
    subset_seed: int | None = None


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
    fields: dict[str, str] = field(default_factory=dict)
    heads: dict[str, HeadConfig] | None = None
    group: str | None = None
    rotations: int | None = None
    sampling: str | None = None  # so3: haar | quasi | fibonacci (None: the default)
    seed: int = 0
    batch_size: int = 64
    chunk_size: int = 8192
    bootstrap: int = 1000
    mask: str = "mask"
    voxel: dict[str, Any] = field(default_factory=dict)
    flow: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    group_options: dict[str, Any] = field(default_factory=dict)  # e.g. translation radius
    local: bool = False
    breakdown: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def settings_hash(self) -> str:
        """Hash of everything that changes the numbers (not the checkpoint paths, nor the
        breakdown options, which add rows to breakdown.csv but change no summary number)."""
        relevant = {k: v for k, v in self.raw.items() if k not in ("checkpoints", "name", "breakdown")}
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


def _positive_int(key: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config: {key}={value!r} must be an integer ≥ {minimum}")
    return value


def resolve_path(value: str | Path, base: Path | None) -> Path:
    """A relative path is taken from the working directory, else from the config's folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or base is None or path.exists() or any(ch in str(value) for ch in "*?["):
        return path
    beside = base / path
    return beside if beside.exists() else path


def _parse_model(raw: Any) -> ModelConfig:
    model = _check_keys("model", raw, MODEL_KEYS)
    factory = model.get("factory")
    if not isinstance(factory, str) or ":" not in factory:
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
    grad = model.get("grad", False)
    if not isinstance(grad, bool):
        raise ConfigError(f"config: model.grad={grad!r} must be true or false")
    return ModelConfig(
        factory=factory,
        kwargs=dict(kwargs),
        inputs=dict(inputs) if isinstance(inputs, Mapping) else inputs,
        outputs=outputs,
        grad=grad,
        dtype=_choice("model.dtype", model.get("dtype", "float32"), MODEL_DTYPES),
        autocast=None if model.get("autocast") is None else _choice("model.autocast", _AUTOCAST_ALIASES.get(model["autocast"], model["autocast"]), AUTOCAST_DTYPES),
    )


_AUTOCAST_ALIASES = {"bf16": "bfloat16", "fp16": "float16"}


def _parse_breakdown(raw: Any) -> dict[str, Any]:
    section = _check_keys("breakdown", raw, BREAKDOWN_KEYS)
    by = section.get("by", [])
    if isinstance(by, str):
        by = [b.strip() for b in by.split(",") if b.strip()]
    if not isinstance(by, list) or not all(isinstance(b, str) for b in by):
        raise ConfigError(f"config: breakdown.by={by!r} must be a list of split or field names")
    if "elements" in section and not isinstance(section["elements"], str):
        raise ConfigError(f"config: breakdown.elements={section['elements']!r} must be a field name")
    for key in ("worst", "bins"):
        if key in section:
            _positive_int(f"breakdown.{key}", section[key])
    return {**section, "by": by}


def _parse_heads(raw: Any) -> dict[str, HeadConfig] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("config: 'heads' must be a non-empty mapping {head_name: {rep, target, loss, weight}}")
    heads = {}
    for name, spec in raw.items():
        spec = _check_keys(f"heads.{name}", spec, HEAD_KEYS)
        if "rep" in spec:
            _choice(f"heads.{name}.rep", spec["rep"], REPRESENTATIONS)
        if "loss" in spec:
            _choice(f"heads.{name}.loss", spec["loss"], LOSS_NAMES)
        for number in ("weight", "huber_delta"):
            if number in spec and (isinstance(spec[number], bool) or not isinstance(spec[number], (int, float))):
                raise ConfigError(f"config: heads.{name}.{number}={spec[number]!r} must be a number")
        heads[str(name)] = HeadConfig(**spec)
    return heads


def parse_config(raw: Any, source: Path | None = None) -> AuditConfig:
    """Validate a config mapping (as loaded from YAML)."""
    top = _check_keys("", raw, TOP_LEVEL_KEYS)
    base = source.parent if source is not None else None
    task = _choice("task", top.get("task", "custom"), TASK_NAMES)
    if "model" not in top:
        raise ConfigError("config: missing key 'model' (needs at least model.factory)")
    data = _check_keys("data", top.get("data"), DATA_KEYS)
    if "path" not in data:
        raise ConfigError("config: missing key 'data.path'")
    keys = data.get("keys") or {}
    if not isinstance(keys, Mapping):
        raise ConfigError("config: data.keys must be a mapping {field: key_in_file}")
    samples = data.get("samples")
    fields = top.get("fields") or {}
    if not isinstance(fields, Mapping):
        raise ConfigError("config: 'fields' must be a mapping {field: representation}")
    for name, rep in fields.items():
        _choice(f"fields.{name}", rep, REPRESENTATIONS)
    group = _check_keys("group", top.get("group"), GROUP_KEYS)
    if "name" in group:
        _choice("group.name", group["name"], GROUP_NAMES + EXTRA_GROUP_NAMES)
    rotations = group.get("rotations")
    if rotations is not None:
        _positive_int("group.rotations", rotations, minimum=2)
    if group.get("sampling") is not None:
        _choice("group.sampling", group["sampling"], SAMPLINGS)
    checkpoints = top.get("checkpoints")
    if isinstance(checkpoints, Mapping):
        checkpoints = _check_keys("checkpoints", checkpoints, ("path",)).get("path")
    for section in ("voxel", "flow"):
        if top.get(section) is not None and not isinstance(top[section], Mapping):
            raise ConfigError(f"config: '{section}' must be a mapping")
    seed = top.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"config: seed={seed!r} must be an integer")
    local = top.get("local", False)
    if not isinstance(local, bool):
        raise ConfigError(f"config: local={local!r} must be true or false")
    return AuditConfig(
        task=task,
        model=_parse_model(top["model"]),
        data=DataConfig(
            path=resolve_path(data["path"], base),
            keys={str(k): str(v) for k, v in keys.items()},
            samples=None if samples is None else _positive_int("data.samples", samples),
            subset_seed=data.get("subset_seed"),
        ),
        checkpoints=None if checkpoints is None else resolve_path(checkpoints, base),
        fields={str(k): v for k, v in fields.items()},
        heads=_parse_heads(top.get("heads")),
        group=group.get("name"),
        rotations=rotations,
        sampling=group.get("sampling"),
        seed=seed,
        batch_size=_positive_int("batch_size", top.get("batch_size", 64)),
        chunk_size=_positive_int("chunk_size", top.get("chunk_size", 8192)),
        bootstrap=_positive_int("bootstrap", top.get("bootstrap", 1000), minimum=0),
        mask=str(top.get("mask", "mask")),
        voxel=dict(top.get("voxel") or {}),
        flow=dict(top.get("flow") or {}),
        name=top.get("name"),
        group_options={k: group[k] for k in GROUP_OPTIONS if k in group},
        local=local,
        breakdown=_parse_breakdown(top.get("breakdown")),
        source=source,
        raw=json.loads(json.dumps(dict(top), default=str)),
    )


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> AuditConfig:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``group.rotations``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config: {path} is not valid YAML{where}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    raw = dict(raw)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"config: cannot override {dotted}: '{key}' is not a mapping")
            node = child
        node[leaf] = value
    return parse_config(raw, source=path)

"""``equiaudit audit RUN_DIR --data FILE``: the config of a known model family, made from its files.

The first positional of ``equiaudit audit`` is a config when it ends in ``.yaml``/``.yml``;
anything else is a checkpoint path, run directory or glob. Then every file discovery finds is
recognised from its contents by the model families (:mod:`equiaudit.zoo.families`): the
family whose checkpoints they are builds the model from the first of them, and its declared
defaults give the task, heads, group, ``model.grad`` and ``model.dtype``. ``--set key=value``
overrides any config key afterwards (a dotted key; the value is read as YAML: ``3``, ``true``,
``[energy]``). The made config is an ordinary config: validated by the same schema, written
to ``run.json``, hashed for the cache.

Files a family recognises as support files (metatrain's ``composition_model.ckpt``) or
TorchScript archives (``mtt export``'s ``model.pt``) are skipped, each listed once with why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from equiaudit.errors import ConfigError
from equiaudit.io.checkpoints import CheckpointRef, display_name

__all__ = ["is_config_path", "parse_sets", "Detected", "detect_family", "family_config", "split_refs", "with_source"]

CONFIG_SUFFIXES = (".yaml", ".yml")


def is_config_path(path: str | Path) -> bool:
    """A YAML config (by suffix); anything else is a checkpoint path, directory or glob."""
    return str(path).lower().endswith(CONFIG_SUFFIXES)


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["group.rotations=8", "heads=[energy]"]`` → dotted overrides, values read as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (a dotted config key, e.g. group.rotations=8)")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


@dataclass
class Detected:
    """What the families made of the discovered files: ``family`` and the checkpoint it
    builds from (``source``), ``architecture``, and every file's recognition kind."""

    family: str | None = None
    source: Path | None = None
    architecture: str | None = None
    kinds: dict[Path, Any] = field(default_factory=dict)  # path -> Recognition | None
    torchscript: bool = False  # the model is a TorchScript archive (--allow-torchscript)


def detect_family(refs: Sequence[CheckpointRef], *, allow_torchscript: bool = False) -> Detected:
    """Recognise each discovered file; the family of the first checkpoint-kind file wins
    (files of another family are then not that model's: they fail, as any mismatch does).
    With no checkpoint and ``allow_torchscript``, the first TorchScript archive a family
    recognises is the model (the archive runs: the user said so)."""
    from equiaudit.zoo.families.base import Peek, recognise

    detected = Detected()
    for ref in refs:
        found = recognise(ref.path, Peek(ref.path)) if ref.path.is_file() else None
        detected.kinds[ref.path] = found
        if found is not None and found.kind == "checkpoint" and detected.family is None:
            detected.family, detected.source, detected.architecture = found.family, ref.path, found.architecture
    if detected.family is None and allow_torchscript:
        for path, found in detected.kinds.items():
            if found is not None and found.kind == "torchscript":
                detected.family, detected.source, detected.architecture = found.family, path, found.architecture
                detected.torchscript = True
                break
    return detected


def split_refs(refs: Sequence[CheckpointRef], detected: Detected, *, allow_torchscript: bool = False
               ) -> tuple[list[CheckpointRef], list[tuple[str, str]]]:
    """(checkpoints to audit, skipped ``(name, reason)``): support files and TorchScript
    archives are skipped (archives are audited only with ``allow_torchscript``)."""
    audited, skipped = [], []
    for ref in refs:
        found = detected.kinds.get(ref.path)
        if found is not None and found.kind == "support":
            skipped.append((ref.name, found.reason))
        elif found is not None and found.kind == "torchscript" and not (allow_torchscript and detected.torchscript
                                                                         and ref.path == detected.source):
            reason = found.reason if not allow_torchscript else (
                "a TorchScript archive beside the checkpoints audited here; audit it alone "
                f"(equiaudit audit {ref.name} --data FILE --allow-torchscript)")
            skipped.append((ref.name, reason))
        else:
            audited.append(ref)
    return audited, skipped


def family_config(detected: Detected, *, data: str | None, sets: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """The raw config (YAML-shaped) of an audit with no config file."""
    from equiaudit.zoo.families.base import family

    archives = [(p, r) for p, r in detected.kinds.items() if r is not None and r.kind == "torchscript"]
    if detected.family is None and archives:
        path, found = archives[0]
        raise ConfigError(f"{display_name(path.name)}: {found.reason}")
    if detected.family is None:
        names = ", ".join(display_name(p.name) for p in list(detected.kinds)[:4]) or "none"
        first = Path(paths[0]) if paths else None
        what = ("is a directory (a training run's folder?)" if first is not None and first.is_dir()
                else "is a checkpoint or other binary file, not a YAML config," if first is not None and first.is_file()
                else "matches no YAML config")
        raise ConfigError(
            f"{display_name(str(first))} {what} and no known model family recognised its files ({names}): give a "
            f"YAML audit config first (equiaudit audit CONFIG.yaml {display_name(str(first))}; sample_configs/ has one "
            f"per task, or write one with `equiaudit init {display_name(str(first))} DATA`), or name the model with "
            "--set model.family=... / --set model.factory=..."
        )
    if data is None:
        raise ConfigError("no config given: --data FILE names the structures to audit on (extxyz, .traj, .h5, ...)")
    module = family(detected.family)
    # The defaults are the family's own; they need the built model (its dtype), which is
    # cheap next to the audit and built again identically by the runner.
    raw: dict[str, Any] = {
        "task": "force_field",
        "model": {"family": detected.family},
        "data": {"path": str(data)},
        "checkpoints": {"path": str(paths[0])},
    }
    # The family's options given with --set (model.name=..., model.kwargs.x=...) build the model
    # whose defaults are taken: Orb's checkpoints hold only weights, its architecture is named.
    from equiaudit.io.config import MODEL_KEYS, apply_overrides

    model_set = apply_overrides({"model": {}}, {k: v for k, v in sets.items() if k.startswith("model.")})["model"]
    options = {**{k: v for k, v in model_set.items() if k not in MODEL_KEYS}, **(model_set.get("kwargs") or {})}
    defaults = _family_defaults(module, detected, options)
    if detected.torchscript:
        raw["checkpoints"] = {"path": str(detected.source)}
    raw["task"] = defaults.task
    raw["model"].update({"grad": defaults.grad, "dtype": defaults.dtype})
    raw["heads"] = {name: {} for name in defaults.heads}
    raw["group"] = {"name": defaults.group}
    return apply_overrides(raw, dict(sets))


def _family_defaults(module, detected: Detected, options: Mapping[str, Any] | None = None):
    from equiaudit.zoo.families.base import build

    try:
        model = build(detected.family, detected.source, allow_torchscript=detected.torchscript, **dict(options or {}))
    except ImportError as exc:
        raise ConfigError(f"{display_name(detected.source.name)} is a {detected.family} checkpoint: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the family's package failing on this file
        raise ConfigError(f"{display_name(detected.source.name)}: the {detected.family} family cannot build it "
                          f"({type(exc).__name__}: {exc})") from exc
    return module.defaults(model)


def with_source(config, detected: Detected | None):
    """``config`` with ``model.source`` set to the checkpoint the family builds from (kept out
    of the settings hash: the weights of every audited checkpoint are loaded into it), and
    ``model.allow_torchscript`` when that is a TorchScript archive the user allowed."""
    if config.model.family is None or config.model.source is not None:
        return config
    if detected is not None and detected.torchscript and detected.family == config.model.family:
        return replace(config, model=replace(config.model, source=detected.source, allow_torchscript=True))
    source = detected.source if detected is not None and detected.family == config.model.family else None
    if source is None and detected is not None:
        source = next((p for p, r in detected.kinds.items() if r is not None and r.kind == "checkpoint"
                       and r.family == config.model.family), None)
    return replace(config, model=replace(config.model, source=source))

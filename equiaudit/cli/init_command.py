"""``equiaudit init [CHECKPOINT] [DATA]``: a commented starter config from what is found.

From the **data** (any file ``load_dataset`` reads): the fields and their shapes, the keys
mapping when the file's names are not the canonical ones (rMD17/MD17 keys are detected), the
task they suggest (energy and forces: ``force_field``; positions only: ``flow_matching``) and
one head per target field (energy → ``scalar``, forces → ``vector``).

From the **checkpoint** (a file or a run's folder; read ``weights_only``, as the audit does):
its layout (format, step, which weights, key prefix, tensor count, top-level modules) as
comments, and the model: each :mod:`equiaudit.zoo` recipe's model is built and the checkpoint
loaded into it (strict, the audit's own key matching); a match names the factory, its
kwargs, and the recipe's audit settings (head weights as trained). Anything else gets a
``model.factory`` placeholder that says what to write, and the audit says the same until it
is filled in. Nothing is guessed silently: every inferred value carries a comment saying
where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from equiaudit.errors import ConfigError

__all__ = ["starter_config", "run_init_command", "match_zoo_model"]

_CANONICAL = ("pos", "z", "mask", "energy", "forces")


def match_zoo_model(ckpt) -> tuple[Any, str] | None:
    """The :mod:`equiaudit.zoo` recipe (or baseline) whose model the checkpoint loads into
    (strictly), with how the keys were matched; ``None`` when none does."""
    from equiaudit.io.checkpoints import load_into_model
    from equiaudit.zoo.recipes import RECIPES

    candidates = []
    for recipe in RECIPES.values():
        candidates.append(recipe)
        if recipe.baseline is not None:
            candidates.append(recipe.baseline_recipe())
    matches = []
    for recipe in candidates:
        try:
            model = recipe.build_model(0)
            how = load_into_model(model, ckpt)
        except Exception:  # a mismatch of keys or shapes: not this model
            continue
        matches.append((recipe, how or "keys as stored"))
    # Two recipes with one architecture (none today) would be ambiguous: say nothing then.
    return matches[0] if len(matches) == 1 else None


def _describe_data(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The canonical fields, the keys mapping to write (empty when detected), and notes."""
    from equiaudit.io.data import load_dataset

    data = load_dataset(path, samples=4)
    notes = [f"{name}: {tuple(value.shape[1:])} {str(value.dtype).removeprefix('torch.')}" for name, value in data.items()]
    return data, {}, notes


def _task_for(fields: Mapping[str, torch.Tensor]) -> str:
    if "forces" in fields or "energy" in fields:
        return "force_field"
    return "flow_matching"


def starter_config(checkpoint: Path | None, data: Path | None) -> str:
    """The YAML text of a starter config (comments included) for ``checkpoint`` and ``data``."""
    from equiaudit.io.checkpoints import describe_checkpoint, discover_checkpoints, read_checkpoint

    lines: list[str] = ["# Written by `equiaudit init`: every inferred value says where it came from; check them.",
                        "# Keys: docs/your-model.md; one commented config per task: sample_configs/."]
    config: dict[str, Any] = {}
    comments: dict[str, str] = {}
    recipe = None
    refs = []
    if checkpoint is not None:
        refs = discover_checkpoints([str(checkpoint)])
        last = refs[-1]
        info = describe_checkpoint(last.path)
        if "problem" in info:
            raise ConfigError(f"init: {last.path}: {info['problem']}")
        ckpt = read_checkpoint(last)
        modules = sorted({key.split(".")[0] for key in ckpt.state_dict})
        lines += [f"# Checkpoints: {len(refs)} found under {checkpoint}; the last, {last.name}:",
                  f"#   format {info['format']}, step {info['step']}, weights {info['weights']} ({info['weights_source']}),",
                  f"#   {info['n_tensors']} tensors ({info['n_parameters']:,} values), key prefix {info['prefix'] or 'none'},",
                  f"#   top-level modules: {', '.join(modules[:12])}{' ...' if len(modules) > 12 else ''}"]
        match = match_zoo_model(ckpt)
        if match is not None:
            recipe, how = match
            lines.append(f"# Model: the checkpoint loads into equiaudit.zoo:{recipe.builder}{recipe.kwargs} ({how}).")
        config["checkpoints"] = {"path": str(checkpoint.resolve()), "weights": "auto"}
        comments["checkpoints"] = "auto: EMA weights where a checkpoint has them (as trainers evaluate), else raw"
    fields: dict[str, torch.Tensor] = {}
    if data is not None:
        fields, keys, notes = _describe_data(data)
        lines.append(f"# Data {data}: fields {'; '.join(notes)}")
    task = recipe.task if recipe is not None else (_task_for(fields) if fields else "force_field")
    config = {"task": task, **config}
    if recipe is not None:
        config["model"] = {"factory": f"equiaudit.zoo:{recipe.builder}", "kwargs": dict(recipe.kwargs)}
        if recipe.kwargs.get("grad"):
            config["model"]["grad"] = True
    else:
        config["model"] = {"factory": "path/to/models.py:build", "kwargs": {},
                           "inputs": ["pos", "z", "mask"] if task == "force_field" else None,
                           "outputs": ["energy", "forces"] if task == "force_field" else None}
        config["model"] = {k: v for k, v in config["model"].items() if v is not None}
        comments["model"] = ("TODO: the function that builds your network (called with kwargs; the checkpoint's weights "
                             "are loaded into it); inputs: data fields passed positionally; outputs: names of a tuple return")
    if data is not None:
        config["data"] = {"path": str(data.resolve())}
        if recipe is not None and "samples" in recipe.audit:
            config["data"]["samples"] = recipe.audit["samples"]
        else:
            config["data"]["samples"] = 256
        comments["data"] = "samples: how many held-out samples are audited (each under every rotation)"
        missing = [name for name in ("pos", "z") if name not in fields]
        if missing:
            config["data"]["keys"] = {name: "TODO" for name in missing}
            comments["data"] += (f"; TODO keys: which of the file's arrays ({', '.join(fields)}) hold "
                                 f"{', '.join(missing)} (positions (A, 3), atomic numbers (A,))")
    if recipe is not None and "heads" in recipe.audit:
        config["heads"] = {name: dict(head) for name, head in recipe.audit["heads"].items()}
        comments["heads"] = "the weights of the training loss (from the zoo recipe): REE is a share of the loss that was trained"
    elif task == "force_field" and fields:
        heads = {}
        if "energy" in fields:
            heads["energy"] = {"rep": "scalar", "target": "energy", "loss": "mse", "weight": 1.0}
        if "forces" in fields:
            heads["forces"] = {"rep": "vector", "target": "forces", "loss": "mse", "weight": 1.0}
        if heads:
            config["heads"] = heads
            comments["heads"] = "set each weight to your training loss's (e.g. energy 0.1): REE is a share of that loss"
    if recipe is not None:
        for key in ("voxel", "dynamics"):
            if key in recipe.audit:
                config[key] = dict(recipe.audit[key])
        config["group"] = dict(recipe.audit.get("group", {"name": "so3", "rotations": 24}))
    else:
        config["group"] = {"name": "so3", "rotations": 24}
    comments["group"] = "so3 for point clouds (24 = 2 randomised tetrahedral copies); octahedral for voxel grids"
    config["seed"] = 0
    body = []
    for key, value in config.items():
        if key in comments:
            body.append(f"# {comments[key]}")
        flow = None if isinstance(value, Mapping) else False  # leaves inline, never the whole document
        body.append(yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=flow, width=100).rstrip())
    return "\n".join(lines + body) + "\n"


def run_init_command(*, checkpoint: Path | None, data: Path | None, out: Path | None, force: bool, console) -> int:
    """Body of ``equiaudit init``: print the starter config, or write it to ``out``."""
    from rich.markup import escape

    from equiaudit.io.atomic import atomic_write_text

    if checkpoint is None and data is None:
        raise ConfigError("init: give a CHECKPOINT (a file or a run's folder), a DATA file, or both")
    for name, path in (("CHECKPOINT", checkpoint), ("DATA", data)):
        if path is not None and not path.exists():
            raise ConfigError(f"init: {name} {path} does not exist")
    text = starter_config(checkpoint, data)
    if out is None:
        print(text, end="")
        return 0
    if out.exists() and not force:
        raise ConfigError(f"init: {out} exists; --force overwrites it")
    atomic_write_text(out, text)
    console.print(f"wrote {escape(str(out))}; audit with: equiaudit audit {escape(str(out))}", highlight=False)
    return 0

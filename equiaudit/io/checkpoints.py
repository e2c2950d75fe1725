"""Find, read and load training checkpoints — safely.

Formats: raw ``state_dict`` files, training dicts (weights under ``state_dict`` /
``model_state_dict`` / ``model`` / ``ema`` ...), PyTorch Lightning ``.ckpt``,
``.safetensors`` and Hugging Face ``checkpoint-N/`` folders. Pickles are only ever read
with ``torch.load(..., weights_only=True)``: a checkpoint that needs arbitrary code is
refused, never run. Every failure is a :class:`CheckpointError` with a one-line message
and a ``status`` for ``summary.csv``: ``not_found``, ``unreadable``, ``corrupt``,
``unsafe_pickle``, ``no_weights`` or ``key_mismatch``.
"""

from __future__ import annotations

import filecmp
import glob
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from equiaudit.errors import CheckpointError
from equiaudit.io.atomic import atomic_write
from equiaudit.io.safe_load import DamagedFile, RefusedPickle, damaged_reason, load_weights_only

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
# Files the HF Trainer writes beside the weights; they are not model checkpoints.
TRAINER_AUX_FILES = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"})
_AUX_RE = re.compile(r"rng_state(_\d+)?\.pth")
_SHARD_RE = re.compile(r".*-\d{5}-of-\d{5}\.(safetensors|bin)")  # HF shards belong to an index
_FOLDER_RE = re.compile(r"checkpoint-(\d+)")
_LAST_RE = re.compile(r"last(-v\d+)?")  # Lightning's `save_last` copies (`last.ckpt`, `last-v1.ckpt`)
# HF weight files inside a checkpoint folder, in order of preference.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Keys of a training dict that hold the model weights, in order of preference (raw before EMA).
WEIGHT_KEYS = (
    "state_dict", "model_state_dict", "model", "module", "net", "network",
    "ema", "ema_state_dict", "model_ema", "weights", "params",
)
STEP_KEYS = ("global_step", "step", "iteration", "iter")
# Prefixes added by wrappers (DDP, torch.compile) or by a Lightning module's attribute.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "network.")

# Names carry the step as `step=1200`, `step_000100`, `global_step-5`, `iter_300` ...;
# a number glued to a decimal point or to `=` after another word is a metric, never a step.
_STEP_NAME_RE = re.compile(r"(?<![a-z])(?:global_?)?(?:step|iteration|iter)s?[=_-]?(\d+)(?![\d.])", re.I)
_EPOCH_NAME_RE = re.compile(r"(?<![a-z])epochs?[=_-]?(\d+)(?![\d.])", re.I)
_TRAILING_NUMBER_RE = re.compile(r"(?:^|[_-])(\d+)$")  # `ckpt_1000`, `checkpoint-500`, `1000`


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint found by :func:`discover_checkpoints` (nothing loaded yet).

    ``step_source`` says where ``step`` came from: ``"file"`` (stored inside), ``"name"``,
    ``"epoch"`` (only an epoch number was found and stands in for the step) or ``None``.
    """

    path: Path
    name: str
    run: str
    step: int | None
    step_source: str | None = None


@dataclass
class LoadedCheckpoint:
    """Weights of one checkpoint: ``state_dict`` maps key -> tensor exactly as stored
    (prefixes such as ``module.`` are resolved later by :func:`load_into_model`)."""

    state_dict: dict[str, torch.Tensor]
    format: str  # "state_dict" | "training_dict" | "lightning" | "safetensors" | "hf_folder"
    step: int | None
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- discovery


def discover_checkpoints(paths: Sequence[str | Path]) -> list[CheckpointRef]:
    """Expand files, run directories, HF ``checkpoint-N/`` folders and globs into checkpoints.

    Runs keep the order in which they first appear; within a run checkpoints are ordered
    by step (unknown steps last), then modification time, then name. A file that cannot
    be read is still listed (it fails when loaded). Raises ``CheckpointError("not_found")``
    for a path that matches no checkpoint.
    """
    # Keyed by absolute path so a file reached twice is listed once; symlinks are not resolved
    # here (a `last.ckpt` link must not displace its target: _drop_duplicate_last handles it).
    found: dict[str, Path] = {}
    for raw in paths:
        matches = _expand(str(raw))
        if not matches:
            raise CheckpointError(_nothing_found_message(str(raw)), status="not_found")
        for path in matches:
            found.setdefault(os.path.abspath(path), path)

    refs = [_make_ref(path) for path in found.values()]
    refs = _drop_duplicate_last(refs)
    run_order: dict[Path, int] = {}
    for ref in refs:
        run_order.setdefault(_run_dir(ref.path), len(run_order))
    return sorted(refs, key=lambda r: (run_order[_run_dir(r.path)], _order_key(r)))


def _expand(raw: str) -> list[Path]:
    """Checkpoint paths (files or checkpoint folders) that one argument stands for."""
    path = Path(raw)
    if path.is_file():
        return [path]  # named explicitly: taken whatever its extension
    if path.is_dir():
        return [path] if _is_single_folder_checkpoint(path) else _scan_run(path)
    if path.exists() or not any(c in raw for c in "*?["):
        return []
    out: list[Path] = []
    for match in sorted(glob.glob(raw, recursive=True)):
        match = Path(match)
        if match.is_dir():
            out.extend([match] if _is_single_folder_checkpoint(match) else _scan_run(match))
        elif _is_weight_file(match):
            out.append(match)
    return out


def _scan_run(directory: Path) -> list[Path]:
    """Checkpoint files directly in a run directory, plus its ``checkpoint-N/`` folders."""
    out = []
    for entry in sorted(directory.iterdir()):
        if (entry.is_file() and _is_weight_file(entry)) or (entry.is_dir() and _is_folder_checkpoint(entry)):
            out.append(entry)
    return out


def _is_weight_file(path: Path) -> bool:
    name = path.name
    return (
        name.lower().endswith(WEIGHT_SUFFIXES)
        and name not in TRAINER_AUX_FILES
        and not _AUX_RE.fullmatch(name)
        and not _SHARD_RE.fullmatch(name)
    )


def _is_folder_checkpoint(directory: Path) -> bool:
    """A HF-style folder: named ``checkpoint-N`` or holding ``model.safetensors`` & co."""
    return bool(_FOLDER_RE.fullmatch(directory.name)) or _hf_weights_file(directory) is not None


def _is_single_folder_checkpoint(directory: Path) -> bool:
    # An HF output_dir holds final weights *and* checkpoint-N/ folders: that is a run.
    return _is_folder_checkpoint(directory) and not any(
        child.is_dir() and _is_folder_checkpoint(child) for child in directory.iterdir()
    )


def _nothing_found_message(raw: str) -> str:
    path = Path(raw)
    if not path.exists() and not any(c in raw for c in "*?["):
        return f"{raw}: no such file or directory"
    hint = ""
    if path.is_dir():
        nested = [c.name for c in sorted(path.iterdir()) if c.is_dir() and _scan_run(c)]
        if nested:
            hint = f"; subfolders are not searched: pass {path / nested[0]}"
    kinds = " ".join(WEIGHT_SUFFIXES)
    return f"{raw}: no checkpoints found (looked for {kinds} files and checkpoint-N/ folders){hint}"


def _make_ref(path: Path) -> CheckpointRef:
    try:
        step, epoch = _read_step(path)
    except Exception:  # noqa: BLE001 - unreadable files are listed anyway and fail when loaded
        step, epoch = None, None
    step, source = _resolve_step(step, epoch, path.name)
    return CheckpointRef(path=path, name=path.name, run=_run_dir(path).name, step=step, step_source=source)


def _run_dir(path: Path) -> Path:
    # abspath, not resolve: a symlinked checkpoint still belongs to the run it was found in.
    parent = Path(os.path.abspath(path)).parent
    # Lightning writes <run>/checkpoints/*.ckpt: the run is the folder above.
    return parent.parent if parent.name == "checkpoints" and parent.parent.name else parent


def _order_key(ref: CheckpointRef) -> tuple:
    try:
        mtime = ref.path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return (ref.step is None, ref.step or 0, mtime, ref.name)


def _drop_duplicate_last(refs: list[CheckpointRef]) -> list[CheckpointRef]:
    """Drop ``last.ckpt`` / ``last.pt`` when it is a copy of (or link to) another checkpoint of the run."""

    def is_last(ref: CheckpointRef) -> bool:
        return bool(_LAST_RE.fullmatch(_strip_suffixes(ref.name)))

    def duplicated(last: CheckpointRef) -> bool:
        return any(
            not is_last(other)
            and _run_dir(other.path) == _run_dir(last.path)
            and (last.step is None or other.step == last.step)
            and _same_checkpoint(last, other)
            for other in refs
        )

    return [ref for ref in refs if not (is_last(ref) and duplicated(ref))]


def _same_checkpoint(a: CheckpointRef, b: CheckpointRef) -> bool:
    if a.path.is_dir() or b.path.is_dir():
        return a.path.resolve() == b.path.resolve()
    if os.path.samefile(a.path, b.path):
        return True
    if a.path.stat().st_size == b.path.stat().st_size and filecmp.cmp(a.path, b.path, shallow=False):
        return True
    # Lightning re-saves last.ckpt with different callback state: compare the weights instead.
    if a.step is None or a.step != b.step:
        return False
    try:
        sa, sb = read_checkpoint(a.path).state_dict, read_checkpoint(b.path).state_dict
    except CheckpointError:
        return False
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


# --------------------------------------------------------------------------- steps


def _read_step(path: Path) -> tuple[int | None, int | None]:
    """(step, epoch) stored inside a checkpoint, read cheaply (mmap / header / json only)."""
    if path.is_dir():
        return _hf_folder_step(path)
    if path.name.lower().endswith(".safetensors"):
        return _steps_from_mapping(_safetensors_metadata(path))
    # mmap keeps discovery cheap: tensors are not read. Only zip-format files support it.
    obj = _torch_load(path, "cpu", mmap=zipfile.is_zipfile(path))
    # A raw state_dict has no step (a buffer that happens to be called `step` is a weight).
    if not isinstance(obj, Mapping) or _is_tensor_dict(obj):
        return None, None
    return _steps_from_mapping(obj)


def _steps_from_mapping(values: Mapping) -> tuple[int | None, int | None]:
    """(step, epoch) from a training dict, safetensors metadata (strings) or trainer_state.json."""
    step = next((s for s in (_as_int(values.get(k)) for k in STEP_KEYS) if s is not None), None)
    return step, _as_int(values.get("epoch"))


def _as_int(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():  # HF stores epoch as 3.0
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _step_from_name(name: str) -> tuple[int | None, int | None]:
    """(step, epoch) parsed from a file/folder name; never a metric such as ``val_loss=0.12``."""
    stem = _strip_suffixes(name)
    step = _STEP_NAME_RE.search(stem)
    if step:
        return int(step.group(1)), None
    epoch = _EPOCH_NAME_RE.search(stem)
    bare = _TRAILING_NUMBER_RE.search(_EPOCH_NAME_RE.sub("", stem))  # `epoch_10` is not step 10
    return (int(bare.group(1)) if bare else None), (int(epoch.group(1)) if epoch else None)


def _resolve_step(inside_step: int | None, inside_epoch: int | None, name: str) -> tuple[int | None, str | None]:
    """Best step and its source: stored step > step in the name > epoch (stored, then named)."""
    name_step, name_epoch = _step_from_name(name)
    for value, source in ((inside_step, "file"), (name_step, "name"), (inside_epoch, "epoch"), (name_epoch, "epoch")):
        if value is not None:
            return value, source
    return None, None


def _strip_suffixes(name: str) -> str:
    while name.lower().endswith(WEIGHT_SUFFIXES):
        name = name[: name.rfind(".")]
    return name


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: Path | str, map_location: Any = "cpu") -> LoadedCheckpoint:
    """Read the weights of one checkpoint file or HF folder (never executes pickled code)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory", status="not_found")
    if path.is_dir():
        return _read_hf_folder(path, map_location)
    if path.name.lower().endswith(".safetensors"):
        state_dict = _load_safetensors(path, map_location)
        step, epoch = _steps_from_mapping(_safetensors_metadata(path))
        return _loaded(path, state_dict, "safetensors", step, epoch, {})

    obj = _torch_load(path, map_location, mmap=False)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path.name}: holds a {type(obj).__name__}, not a dict of named tensors", status="no_weights"
        )
    if not obj or _is_tensor_dict(obj):  # an empty dict is an empty state_dict: "contains no tensors"
        return _loaded(path, dict(obj), "state_dict", None, None, {})

    key, weights = _find_weights(obj)
    if weights is None:
        raise CheckpointError(
            f"{path.name}: no model weights found (top-level keys: {_preview(list(obj))}); "
            f"expected one of {list(WEIGHT_KEYS[:4])} to hold a dict of tensors",
            status="no_weights",
        )
    lightning = "pytorch-lightning_version" in obj or "lightning_version" in obj
    metadata = {"weights_key": key, "keys": [str(k) for k in obj]}
    if lightning:
        metadata["lightning_version"] = obj.get("pytorch-lightning_version") or obj.get("lightning_version")
    step, epoch = _steps_from_mapping(obj)
    return _loaded(path, weights, "lightning" if lightning else "training_dict", step, epoch, metadata)


def _loaded(path: Path, state_dict: dict, fmt: str, step: int | None, epoch: int | None, metadata: dict) -> LoadedCheckpoint:
    if not state_dict:
        raise CheckpointError(f"{path.name}: contains no tensors", status="no_weights")
    step, source = _resolve_step(step, epoch, path.name)
    metadata = {**metadata, "epoch": epoch, "step_source": source}
    return LoadedCheckpoint(state_dict=state_dict, format=fmt, step=step, metadata=metadata)


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    """:func:`~equiaudit.io.safe_load.load_weights_only` with every failure turned into a one-line CheckpointError."""
    try:
        return load_weights_only(path, map_location, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or directory", status="not_found") from None
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot open ({exc.strerror or exc})", status="unreadable") from None
    except RefusedPickle as exc:
        raise CheckpointError(
            f"{path.name}: refused: the pickle needs `{exc.global_name}`; "
            "equiaudit never executes pickled code. Re-save the weights as a state_dict "
            "(torch.save(model.state_dict(), path)) or .safetensors",
            status="unsafe_pickle",
        ) from None
    except DamagedFile as exc:
        raise _corrupt(path, exc.reason) from None


def _corrupt(path: Path, reason: BaseException | str) -> CheckpointError:
    reason = damaged_reason(reason) if isinstance(reason, BaseException) else reason
    return CheckpointError(f"{path.name}: not a readable checkpoint (truncated or corrupt: {reason})", status="corrupt")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_weights(obj: Mapping) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """The first known key (then any key) of a training dict whose value is a dict of tensors."""
    keys = [k for k in WEIGHT_KEYS if k in obj] + [k for k in obj if k not in WEIGHT_KEYS]
    for key in keys:
        if _is_tensor_dict(obj[key]):
            return str(key), dict(obj[key])
    return None, None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: a damaged header
        raise _corrupt(path, exc) from None


def _load_safetensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # noqa: BLE001 - safetensors never runs code; any failure is a bad file
        raise _corrupt(path, exc) from None


def _hf_weights_file(folder: Path) -> Path | None:
    return next((folder / n for n in HF_WEIGHT_FILES if (folder / n).is_file()), None)


def _hf_folder_step(folder: Path) -> tuple[int | None, int | None]:
    """(step, epoch) from ``trainer_state.json``, else from the weights' safetensors metadata."""
    state_file = folder / "trainer_state.json"
    if state_file.is_file():
        try:
            step, epoch = _steps_from_mapping(json.loads(state_file.read_text()))
        except (OSError, ValueError, AttributeError):
            step, epoch = None, None
        if step is not None:
            return step, epoch
    weights = _hf_weights_file(folder)
    if weights is not None and weights.name == "model.safetensors":
        return _steps_from_mapping(_safetensors_metadata(weights))
    return None, None


def _read_hf_folder(folder: Path, map_location: Any) -> LoadedCheckpoint:
    weights = _hf_weights_file(folder)
    if weights is None:
        raise CheckpointError(
            f"{folder.name}: no model weights inside (looked for {', '.join(HF_WEIGHT_FILES)})", status="no_weights"
        )
    files = _shard_files(weights) if weights.name.endswith(".index.json") else [weights]
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(_file_tensors(file, map_location))
    step, epoch = _hf_folder_step(folder)
    return _loaded(folder, state_dict, "hf_folder", step, epoch, {"files": [f.name for f in files]})


def _shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [index.parent / name for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(index, exc) from None


def _file_tensors(file: Path, map_location: Any) -> dict[str, torch.Tensor]:
    """All weights of one file inside an HF folder (shard or whole model)."""
    if not file.is_file():
        raise CheckpointError(f"{file.parent.name}: missing weight file {file.name}", status="corrupt")
    try:
        if file.name.endswith(".safetensors"):
            return _load_safetensors(file, map_location)
        return read_checkpoint(file, map_location).state_dict
    except CheckpointError as exc:  # name the folder too: every HF checkpoint has a model.safetensors
        raise CheckpointError(f"{file.parent.name}/{exc}", status=exc.status) from None


def _preview(items: Sequence, limit: int = 3) -> str:
    shown = repr([str(x) for x in items[:limit]])
    return shown if len(items) <= limit else f"{shown[:-1]}, ... +{len(items) - limit} more]"


# --------------------------------------------------------------------------- into a model


def load_into_model(model: torch.nn.Module, ckpt: LoadedCheckpoint) -> str | None:
    """Load ``ckpt`` into ``model`` (strict), stripping the key prefix that makes the keys match.

    Handles ``module.`` (DDP), ``_orig_mod.`` (torch.compile), a Lightning attribute such as
    ``model.`` (other attributes of the LightningModule are then ignored) and combinations.
    Returns the stripped prefix, or ``None``. Raises ``CheckpointError("key_mismatch")``.
    """
    own = model.state_dict()
    prefix = _best_prefix(list(ckpt.state_dict), set(own))
    stripped = {k[len(prefix):]: v for k, v in ckpt.state_dict.items() if k.startswith(prefix)}

    problems = []
    missing = [k for k in own if k not in stripped]
    unexpected = [k for k in stripped if k not in own]
    if missing or unexpected:
        parts = ([f"missing {_preview(missing)}"] if missing else []) + (
            [f"unexpected {_preview(unexpected)}"] if unexpected else []
        )
        problems.append("keys do not match the model: " + "; ".join(parts))
    shapes = [k for k in own if k in stripped and tuple(stripped[k].shape) != tuple(own[k].shape)]
    if shapes:
        k = shapes[0]
        more = f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""
        problems.append(
            f"shape mismatch for '{k}': checkpoint {tuple(stripped[k].shape)} vs model {tuple(own[k].shape)}{more}"
        )
    after = f" (after stripping '{prefix}')" if prefix else ""
    if problems:
        raise CheckpointError("; ".join(problems) + after, status="key_mismatch")
    try:
        model.load_state_dict(stripped, strict=True)
    except RuntimeError as exc:  # e.g. a custom module's load hook rejecting a value
        raise CheckpointError(f"cannot load weights into the model: {damaged_reason(exc)}{after}",
                              status="key_mismatch") from None
    return prefix or None


def _best_prefix(ckpt_keys: list[str], model_keys: set[str]) -> str:
    """The prefix whose stripping maps the most checkpoint keys onto model keys.

    Candidates are the leading 1-3 dotted components of keys whose remainder is a model key.
    Ties go to fewer leftover keys, then to well-known wrapper prefixes (so ``model.`` wins
    over an ``ema.`` copy of the same network), then to the shorter prefix.
    """
    candidates = {""}
    for key in ckpt_keys:
        parts = key.split(".")
        for i in range(1, min(len(parts), 4)):
            if ".".join(parts[i:]) in model_keys:
                candidates.add(".".join(parts[:i]) + ".")

    def score(prefix: str) -> tuple:
        under = {k[len(prefix):] for k in ckpt_keys if k.startswith(prefix)}
        known = prefix == "" or all(p + "." in KNOWN_PREFIXES for p in prefix[:-1].split("."))
        return (len(under & model_keys), -len(under - model_keys), known, -len(prefix))

    return max(sorted(candidates), key=score)


# --------------------------------------------------------------------------- inspect


def describe_checkpoint(path: Path | str) -> dict:
    """Summary for ``equiaudit inspect``: format, step, tensor/parameter counts, prefix, dtypes.

    ``n_parameters`` counts elements of floating tensors (integer buffers such as
    ``num_batches_tracked`` excluded); ``prefix`` is the wrapper prefix shared by all keys.
    """
    ckpt = read_checkpoint(path)
    dtypes: dict[str, int] = {}
    for tensor in ckpt.state_dict.values():
        name = str(tensor.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    return {
        "path": str(path),
        "format": ckpt.format,
        "step": ckpt.step,
        "n_tensors": len(ckpt.state_dict),
        "n_parameters": sum(t.numel() for t in ckpt.state_dict.values() if t.is_floating_point()),
        "prefix": _shared_prefix(list(ckpt.state_dict), lightning=ckpt.format == "lightning"),
        "dtypes": dtypes,
    }


def _shared_prefix(keys: list[str], lightning: bool) -> str | None:
    """Leading components shared by all keys that are wrappers (``module.``, ``_orig_mod.``, ...).

    Without the model we cannot tell a wrapper from a real top-level submodule, so only known
    wrapper names count — plus, for Lightning, whichever single attribute holds every key.
    """
    prefix = ""
    while True:
        heads = {k[len(prefix):].split(".", 1)[0] + "." for k in keys}
        if len(heads) != 1 or any("." not in k[len(prefix):] for k in keys):
            break
        head = heads.pop()
        if head not in KNOWN_PREFIXES and not (lightning and prefix == ""):
            break
        prefix += head
    return prefix or None


def save_checkpoint(path: Path | str, state_dict: Mapping[str, torch.Tensor], *, step: int, **metadata: Any) -> Path:
    """Write a training dict ``{"model_state_dict", "step", **metadata}`` atomically.

    Temp file + rename in the same folder, so a reader (``audit --watch``) never sees a
    half-written checkpoint. ``metadata`` must be plain numbers/strings (weights-only loadable).
    """
    payload = {"model_state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "step": int(step), **metadata}
    return atomic_write(path, lambda handle: torch.save(payload, handle))

"""Find, read and load training checkpoints — safely.

Formats: raw ``state_dict`` files, training dicts (weights under ``state_dict`` /
``model_state_dict`` / ``model`` ..., or one level down such as CHGNet's
``model.state_dict``), PyTorch Lightning ``.ckpt``, ``.safetensors`` and Hugging Face
``checkpoint-N/`` folders. Pickles are only ever read through
:func:`~equiaudit.io.safe_load.load_weights_only` (``weights_only=True`` with resource
bounds): a checkpoint that needs arbitrary code is refused, never run.

**Which weights** (``weights="auto" | "raw" | "ema"``; ``auto`` prefers an EMA set):
timm/VoxMol ``state_dict_ema``; ``ema`` / ``model_ema`` / ``ema_state_dict`` entries
(MatterSim, many trainers), also inside Lightning ``callbacks``; NeMo/Proteina's sibling
``X-EMA.ckpt`` and NeMo's ``EMAOptimizer`` state (``optimizer_states[i]["ema"]``, a list in
parameter order); Lightning's ``WeightAveraging``/``EMAWeightAveraging`` callback, which
saves the *averaged* weights as ``state_dict`` and the raw ones as ``current_model_state``;
``torch_ema`` ``ExponentialMovingAverage.state_dict()`` (``shadow_params``, a list in
parameter order), inside the training file or in a separate ``ema_*.pt`` beside it. Lists
in parameter order are mapped onto ``model.named_parameters()`` by :func:`load_into_model`.

Every failure is a :class:`CheckpointError` with a one-line message and a ``status`` for
``summary.csv``: ``not_found``, ``unreadable`` (cannot be opened, or not a regular file),
``corrupt``, ``unsafe_pickle``, ``too_large`` (see the bounds in
:mod:`equiaudit.io.safe_load`), ``no_weights`` (no dict of tensors keyed by parameter
name), ``no_ema`` / ``no_raw`` (the requested weight set is not in the file) or
``key_mismatch`` (the weights do not fit the model).

Names shown to users (:attr:`CheckpointRef.name`, ``.run``, every message) are
:func:`display_name` strings: bytes that are not UTF-8 appear escaped (``\\xff``), control
characters too, so one line stays one line; ``.path`` keeps the real path.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from equiaudit.errors import CheckpointError, ConfigError, first_line
from equiaudit.io.atomic import atomic_write
from equiaudit.io.safe_load import (
    DamagedFile,
    NotRegularFile,
    RefusedPickle,
    TooLarge,
    damaged_reason,
    file_kind,
    load_weights_only,
    open_regular,
)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
# Files the HF Trainer (and guided-diffusion's optNNNNNN.pt) write beside the weights.
TRAINER_AUX_FILES = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"})
_AUX_RE = re.compile(r"rng_state(_\d+)?\.pth|opt\d+\.pt")
_SHARD_RE = re.compile(r".*-\d{5}-of-\d{5}\.(safetensors|bin)")  # HF shards belong to an index
_FOLDER_RE = re.compile(r"checkpoint-(\d+)")
# HF weight files inside a checkpoint folder, in order of preference.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Keys of a training dict that hold the raw model weights, in order of preference; each is
# also looked for one level down (CHGNet: {"model": {"state_dict": ..., "model_args": ...}}).
RAW_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
# Keys that hold an EMA copy: a dict of tensors, or a torch_ema state (shadow_params).
EMA_KEYS = ("state_dict_ema", "ema_state_dict", "model_ema", "ema_model", "ema", "ema_weights",
            "model_ema_state_dict", "ema_params")
WEIGHT_KEYS = RAW_KEYS + EMA_KEYS
# A training dict whose model weights ARE the weight average says so under this key (True):
# equiaudit's trainer (`equiaudit train`, the demo) saves the EMA model as model_state_dict.
AVERAGED_MARKER = "model_state_dict_is_ema"
STEP_KEYS = ("global_step", "step", "iteration", "iter")
EPOCH_KEYS = ("epoch", "last_epoch")  # last_epoch: MatterSim's epoch counter
# Prefixes added by wrappers (DDP, torch.compile) or by a Lightning module's attribute.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "network.")
WEIGHT_CHOICES = ("auto", "raw", "ema")

# Names carry the step as `step=1200`, `step_000100`, `global_step-5`, `iter_300` ...;
# a number glued to a decimal point or to `=` after another word is a metric, never a step.
_STEP_NAME_RE = re.compile(r"(?<![a-z])(?:global_?)?(?:step|iteration|iter)s?[=_-]?(\d+)(?![\d.])", re.I)
_EPOCH_NAME_RE = re.compile(r"(?<![a-z])epochs?[=_-]?(\d+)(?![\d.])", re.I)
# `ckpt_1000`, `checkpoint-500`, `1000`, guided-diffusion's `model010000` (not `resnet50`).
_TRAILING_NUMBER_RE = re.compile(r"(?:^|[_-]|(?<=model)|(?<=ckpt))(\d+)$", re.I)
# `X-EMA` (NeMo), `ema_X`, `X_ema`, `ema_0.9999_010000` (guided-diffusion); not `schema`.
_EMA_TOKEN_RE = re.compile(r"(?:^|[-_.])ema(?:[-_]\d*\.\d+)?(?=$|[-_.])", re.I)
# Copies of a stepped checkpoint: Lightning `last.ckpt`, MatterSim `best_model.pth` /
# `last_model.pth`, timm `model_best.pth.tar`, HF `save_model()`'s top-level `model.safetensors`.
_ALIAS_RE = re.compile(
    r"(?:(?:model|checkpoint|ckpt|weights)[-_]?)?(?:best|last|latest|final)(?:[-_]?(?:model|checkpoint|ckpt|weights))?"
    r"(?:-v\d+)?|model|pytorch_model",
    re.I,
)
# Bounds on what describing an untrusted object may cost (keys listed, entries walked).
_PREVIEW_KEYS = 3
_MAX_LISTED = 20
_MAX_CALLBACKS = 64


def display_name(name: str | os.PathLike) -> str:
    """``name`` as one printable line: bytes that are not UTF-8 as ``\\xff``, control
    characters as ``\\n``/``\\x1b``. The real name stays on the path."""
    text = os.fsencode(os.fspath(name)).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint found by :func:`discover_checkpoints` (nothing loaded yet).

    ``name``/``run`` are display strings (:func:`display_name`); ``path`` is the real path.
    ``step_source`` says where ``step`` came from: ``"file"`` (stored inside), ``"name"``,
    ``"epoch"`` (only an epoch number was found and stands in for the step) or ``None``;
    ``epoch`` is the epoch stored inside (else named), if any. ``ema_path`` is a sibling file
    holding the EMA weights of the same checkpoint (NeMo ``X-EMA.ckpt``, ``ema_X.pt``);
    ``aliases`` are names of other files of the run that hold the same weights
    (``best_model.pth``, ``last.ckpt``, a top-level ``model.safetensors``), listed once here.
    """

    path: Path
    name: str
    run: str
    step: int | None
    step_source: str | None = None
    epoch: int | None = None
    ema_path: Path | None = None
    aliases: tuple[str, ...] = ()


@dataclass
class LoadedCheckpoint:
    """The chosen weights of one checkpoint.

    ``state_dict`` maps key -> tensor exactly as stored (prefixes such as ``module.`` are
    resolved later by :func:`load_into_model`). ``weights`` is ``"raw"`` or ``"ema"`` and
    ``weights_source`` says where they came from (``"state_dict_ema"``,
    ``"sibling step=100-EMA.ckpt"``, ``"optimizer_states[0]['ema']"`` ...); ``weight_sets``
    lists the kinds present. ``ordered_params``, when set, are the chosen weights as a list
    in the model's ``named_parameters()`` order (torch_ema, NeMo's EMAOptimizer): they
    replace those entries of ``state_dict`` (which then supplies the buffers) at load time.
    """

    state_dict: dict[str, torch.Tensor]
    format: str  # "state_dict" | "training_dict" | "lightning" | "safetensors" | "hf_folder" | "torch_ema"
    step: int | None
    metadata: dict = field(default_factory=dict)
    weights: str = "raw"
    weights_source: str = "state_dict"
    weight_sets: tuple[str, ...] = ("raw",)
    ordered_params: list[torch.Tensor] | None = None
    epoch: int | None = None
    step_source: str | None = None


@dataclass
class _WeightSet:
    """One candidate set of weights inside a file: named tensors and/or a list in parameter order."""

    kind: str  # "raw" | "ema"
    source: str
    named: dict | None
    ordered: list | None = None


# --------------------------------------------------------------------------- discovery


def discover_checkpoints(
    paths: Sequence[str | Path], *, skipped: list[tuple[str, str]] | None = None
) -> list[CheckpointRef]:
    """Expand files, run directories, HF ``checkpoint-N/`` folders and globs into checkpoints.

    A run directory contributes its weight files, its ``checkpoint-N/`` folders and the files
    in its ``checkpoints/`` subfolder (Lightning's ``version_N/checkpoints/``). Each real file
    is listed once however many paths reach it (symlinks, ``**`` globs), directory symlinks
    are followed at most once per real directory (no loops), and nothing that is not a
    regular file is opened: such entries go to ``skipped`` as ``(name, reason)`` (a FIFO
    named explicitly is listed and fails when loaded). An EMA sibling is paired onto its
    checkpoint (``ema_path``), and copies of a stepped checkpoint (``last.ckpt``,
    ``best_model.pth``, a final ``model.safetensors``; same tensors) are listed once, as
    ``aliases`` of that checkpoint.

    Runs keep the order in which they first appear; within a run checkpoints are ordered
    by step (unknown steps last), then modification time, then name. A file that cannot
    be read is still listed (it fails when loaded). Raises ``CheckpointError("not_found")``
    for a path that matches no checkpoint.
    """
    skip = skipped.append if skipped is not None else (lambda item: None)
    reached: dict[tuple, list[Path]] = {}  # real file -> every path that reached it
    for raw in paths:
        matches = _expand(str(raw), skip)
        if not matches:
            raise CheckpointError(_nothing_found_message(str(raw)), status="not_found")
        for path in matches:
            reached.setdefault(_identity(path), []).append(path)

    entries = [_primary(group) for group in reached.values()]  # (path, names of the other paths)
    ema_of, consumed = _pair_ema(entries)
    refs = [_make_ref(path, ema_of.get(path), aliases) for path, aliases in entries if path not in consumed]
    refs = _merge_duplicates(refs)
    run_order: dict[Path, int] = {}
    for ref in refs:
        run_order.setdefault(_run_dir(ref.path), len(run_order))
    return sorted(refs, key=lambda r: (run_order[_run_dir(r.path)], _order_key(r)))


def _stat(path: str | Path) -> os.stat_result | None:
    """``os.stat`` (following symlinks), ``None`` when missing, dangling or inaccessible."""
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _identity(path: Path) -> tuple:
    st = _stat(path)
    return (st.st_dev, st.st_ino) if st is not None else ("path", os.path.abspath(path))


def _is_glob(raw: str) -> bool:
    return any(c in raw for c in "*?[")


def _expand(raw: str, skip) -> list[Path]:
    """Checkpoint paths (files or checkpoint folders) that one argument stands for."""
    path = Path(raw)
    st = _stat(path)
    if st is None:
        return _glob(raw, skip) if _is_glob(raw) and not os.path.lexists(raw) else []
    if stat.S_ISDIR(st.st_mode):
        return [path] if _is_single_folder_checkpoint(path) else _scan_run(path, skip)
    return [path]  # named explicitly: taken whatever it is (a FIFO fails at load time, unopened)


def _scan_run(directory: Path, skip, *, descend: bool = True) -> list[Path]:
    """Checkpoint files directly in a run directory, its ``checkpoint-N/`` folders and
    (one level, never further) the contents of its ``checkpoints/`` subfolder."""
    out = []
    for entry in _listdir(directory, skip):
        st = _stat(entry)
        if st is None:
            if _is_weight_file(entry):
                skip((display_name(entry), "a dangling symlink or unreadable entry"))
        elif stat.S_ISREG(st.st_mode):
            if _is_weight_file(entry):
                out.append(entry)
        elif stat.S_ISDIR(st.st_mode):
            if _is_folder_checkpoint(entry):
                out.append(entry)
            elif descend and entry.name == "checkpoints":
                out.extend(_scan_run(entry, skip, descend=False))
        elif _is_weight_file(entry):
            skip((display_name(entry), f"{file_kind(st.st_mode)}, not a regular file: not opened"))
    return out


def _listdir(directory: Path, skip) -> list[Path]:
    try:
        return sorted(directory / name for name in os.listdir(directory))
    except OSError as exc:
        skip((display_name(directory), f"cannot list ({exc.strerror or exc})"))
        return []


def _glob(pattern: str, skip) -> list[Path]:
    """``glob.glob(pattern, recursive=True)`` semantics (hidden names need a leading dot in
    the pattern) without its hazards: a ``**`` walk enters each real directory once, so
    symlink loops end, and only regular files and checkpoint folders are returned."""
    parts = Path(pattern).parts
    fixed = next((i for i, p in enumerate(parts) if _is_glob(p)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    out: list[Path] = []
    seen: set[tuple] = set()
    for match in _glob_parts(root, list(parts[fixed:])):
        st = _stat(match)
        key = _identity(match)
        if st is None or key in seen:
            continue
        if stat.S_ISDIR(st.st_mode):
            seen.add(key)
            out.extend([match] if _is_single_folder_checkpoint(match) else _scan_run(match, skip))
        elif _is_weight_file(match):
            if stat.S_ISREG(st.st_mode):
                seen.add(key)
                out.append(match)
            else:
                skip((display_name(match), f"{file_kind(st.st_mode)}, not a regular file: not opened"))
    return out


def _glob_parts(base: Path, parts: list[str]) -> Iterator[Path]:
    if not parts:
        yield base
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        for directory in _walk_dirs(base):
            yield from _glob_parts(directory, rest)
            if not rest:
                yield from (directory / n for n in _names(directory) if not n.startswith("."))
        return
    if not _is_glob(head):
        if os.path.lexists(base / head):
            yield from _glob_parts(base / head, rest)
        return
    for name in _names(base):
        if name.startswith(".") and not head.startswith("."):
            continue
        if fnmatch.fnmatchcase(name, head) and (not rest or os.path.isdir(base / name)):
            yield from _glob_parts(base / name, rest)


def _walk_dirs(base: Path) -> Iterator[Path]:
    """``base`` and every directory below it (not hidden), each real directory once."""
    seen: set[tuple[int, int]] = set()
    pending = [base]
    while pending:
        directory = pending.pop()
        st = _stat(directory)
        if st is None or not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        yield directory
        pending.extend(sorted((directory / n for n in _names(directory) if not n.startswith(".")), reverse=True))


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


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
        (directory / n).is_dir() and _is_folder_checkpoint(directory / n) for n in _names(directory)
    )


def _nothing_found_message(raw: str) -> str:
    path = Path(raw)
    shown = display_name(raw)
    if not os.path.lexists(path) and not _is_glob(raw):
        return f"{shown}: no such file or directory"
    hint = ""
    if path.is_dir():
        nested = [n for n in _names(path) if (path / n).is_dir() and _scan_run(path / n, lambda item: None)]
        if nested:
            hint = f"; subfolders are not searched: pass {display_name(path / nested[0])}"
    kinds = " ".join(WEIGHT_SUFFIXES)
    return f"{shown}: no checkpoints found (looked for {kinds} files and checkpoint-N/ folders){hint}"


def _primary(paths: list[Path]) -> tuple[Path, tuple[str, ...]]:
    """The path to list a real file under (a real name before a ``last.ckpt`` link, then the
    shortest path) and the other names it was reached by."""
    best = min(paths, key=lambda p: (_is_alias_name(p.name), len(Path(os.path.abspath(p)).parts), str(p)))
    others = tuple(sorted({display_name(p.name) for p in paths if p.name != best.name}))
    return best, others


def _make_ref(path: Path, ema_path: Path | None = None, aliases: tuple[str, ...] = ()) -> CheckpointRef:
    try:
        step, epoch = _read_step(path)
    except Exception:  # noqa: BLE001 - unreadable files are listed anyway and fail when loaded
        step, epoch = None, None
    step, source, epoch = _resolve_step(step, epoch, path.name)
    return CheckpointRef(path=path, name=display_name(path.name), run=display_name(_run_dir(path).name),
                         step=step, step_source=source, epoch=epoch, ema_path=ema_path, aliases=aliases)


def _run_dir(path: Path) -> Path:
    # abspath, not resolve: a symlinked checkpoint still belongs to the run it was found in.
    parent = Path(os.path.abspath(path)).parent
    # Lightning writes <run>/checkpoints/*.ckpt: the run is the folder above.
    return parent.parent if parent.name == "checkpoints" and parent.parent.name else parent


def _order_key(ref: CheckpointRef) -> tuple:
    st = _stat(ref.path)
    return (ref.step is None, ref.step or 0, st.st_mtime if st else 0.0, ref.name)


# --------------------------------------------------------------------------- EMA siblings


def _is_ema_name(name: str) -> bool:
    return bool(_EMA_TOKEN_RE.search(_strip_suffixes(name)))


def _ema_base(name: str) -> str:
    """The name an EMA file's partner has: ``X-EMA.ckpt`` -> ``x``, ``ema_step_10.pt`` -> ``step_10``."""
    base = _EMA_TOKEN_RE.sub("_", _strip_suffixes(name)).strip("-_.")
    return re.sub(r"[-_.]{2,}", "_", base).lower()


def _directory_pairs(directory: Path) -> dict[str, str]:
    """raw file name -> EMA file name for the regular weight files of one directory.

    An EMA file pairs with the raw file of the same name without the EMA token, else with
    the one raw file of the same step in its name, else (a bare ``ema.pt``) with the only raw file.
    """
    names = [n for n in _names(directory) if _is_weight_file(directory / n)
             and (st := _stat(directory / n)) is not None and stat.S_ISREG(st.st_mode)]
    emas = [n for n in names if _is_ema_name(n)]
    raws = [n for n in names if not _is_ema_name(n)]
    pairs: dict[str, str] = {}
    for ema in emas:
        free = [r for r in raws if r not in pairs]
        base = _ema_base(ema)
        match = [r for r in free if _strip_suffixes(r).lower() == base]
        step = _step_from_name(ema)[0]
        if not match and step is not None:
            match = [r for r in free if _step_from_name(r)[0] == step]
        if not match and not base and len(raws) == 1:
            match = free
        if len(match) == 1:
            pairs[match[0]] = ema
    return pairs


def _pair_ema(entries: list[tuple[Path, tuple]]) -> tuple[dict[Path, Path], set[Path]]:
    """Which found files get an EMA sibling, and which found EMA files are thereby taken."""
    cache: dict[str, dict[str, str]] = {}
    ema_of: dict[Path, Path] = {}
    for path, _ in entries:
        if path.is_dir() or _is_ema_name(path.name):
            continue
        directory = Path(os.path.abspath(path)).parent
        pairs = cache.setdefault(str(directory), _directory_pairs(directory))
        if path.name in pairs:
            ema_of[path] = path.parent / pairs[path.name]
    taken = {_identity(e) for e in ema_of.values()}
    consumed = {path for path, _ in entries if _identity(path) in taken}
    return ema_of, consumed


def _ema_partner_on_disk(path: Path) -> Path | None:
    """The EMA sibling of a raw checkpoint file, if one lies beside it."""
    if path.is_dir() or _is_ema_name(path.name):
        return None
    ema = _directory_pairs(Path(os.path.abspath(path)).parent).get(path.name)
    return path.parent / ema if ema else None


def _raw_partner_on_disk(path: Path) -> Path | None:
    """The raw checkpoint an EMA-named file belongs to, if it lies beside it."""
    pairs = _directory_pairs(Path(os.path.abspath(path)).parent)
    raw = next((r for r, e in pairs.items() if e == path.name), None)
    return path.parent / raw if raw else None


# --------------------------------------------------------------------------- duplicates


def _is_alias_name(name: str) -> bool:
    return bool(_ALIAS_RE.fullmatch(_strip_suffixes(name)))


def _merge_duplicates(refs: list[CheckpointRef]) -> list[CheckpointRef]:
    """Fold copies of a stepped checkpoint into it (listed once, the copy's name kept in ``aliases``).

    A copy is a file named like ``last``/``best``/``final``/``model`` whose step is not in
    its name and whose chosen weights equal those of a stepped checkpoint of the same run
    (the same step when it stores one). Candidates are compared by key/shape signature
    first, then by a hash of every tensor's bytes (read memory-mapped, memoised).
    """
    copies = [r for r in refs if _is_alias_name(r.path.name) and r.step_source != "name"]
    if not copies:
        return refs
    absorbed: dict[int, list[str]] = {}
    dropped: set[int] = set()
    for copy in copies:
        run = _run_dir(copy.path)
        targets = [r for r in refs if r is not copy and id(r) not in dropped and r.step is not None
                   and not (_is_alias_name(r.path.name) and r.step_source != "name") and _run_dir(r.path) == run
                   and (copy.step_source not in ("file", "epoch") or r.step == copy.step)]
        for target in sorted(targets, key=lambda r: -(r.step or 0)):
            if _same_weights(copy, target):
                dropped.add(id(copy))
                absorbed.setdefault(id(target), []).extend([copy.name, *copy.aliases])
                break
    return [replace(r, aliases=tuple(sorted({*r.aliases, *absorbed[id(r)]}))) if id(r) in absorbed else r
            for r in refs if id(r) not in dropped]


_FINGERPRINTS: OrderedDict[tuple, tuple | None] = OrderedDict()
_FINGERPRINT_CACHE_SIZE = 1024


def _fingerprint(ref: CheckpointRef, with_digest: bool) -> tuple | None:
    """(signature, digest or None) of a checkpoint's auto-chosen weights, memoised by file
    identity, size and mtime (``--watch`` re-discovers every poll)."""
    stamps = []
    for p in (ref.path, ref.ema_path):
        st = _stat(p) if p is not None else None
        stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st else None)
    key = (tuple(stamps), with_digest)
    if key in _FINGERPRINTS:
        _FINGERPRINTS.move_to_end(key)
        return _FINGERPRINTS[key]
    try:
        ckpt = _read(ref.path, "cpu", "auto", ref.ema_path, mmap=True)
        tensors = sorted(ckpt.state_dict.items()) + [(f"#{i}", t) for i, t in enumerate(ckpt.ordered_params or [])]
        signature = tuple((k, str(t.dtype), tuple(t.shape)) for k, t in tensors)
        digest = None
        if with_digest:
            h = hashlib.blake2b(digest_size=20)
            for _, t in tensors:
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            digest = h.hexdigest()
        result: tuple | None = (signature, digest)
    except (CheckpointError, RuntimeError, TypeError, ValueError):
        result = None
    _FINGERPRINTS[key] = result
    while len(_FINGERPRINTS) > _FINGERPRINT_CACHE_SIZE:
        _FINGERPRINTS.popitem(last=False)
    return result


def _same_weights(a: CheckpointRef, b: CheckpointRef) -> bool:
    if _identity(a.path) == _identity(b.path):
        return True
    fa, fb = _fingerprint(a, False), _fingerprint(b, False)
    if fa is None or fb is None or fa[0] != fb[0]:
        return False
    fa, fb = _fingerprint(a, True), _fingerprint(b, True)
    return fa is not None and fb is not None and fa[1] == fb[1]


# --------------------------------------------------------------------------- steps


def _read_step(path: Path) -> tuple[int | None, int | None]:
    """(step, epoch) stored inside a checkpoint, read cheaply (mmap / header / json only)."""
    if path.is_dir():
        return _hf_folder_step(path)
    if path.name.lower().endswith(".safetensors"):
        return _steps_from_mapping(_safetensors_metadata(path))
    obj = _torch_load(path, "cpu", mmap=True)  # mmap: tensors are not read (zip files)
    # A raw state_dict has no step (a buffer that happens to be called `step` is a weight).
    if not isinstance(obj, Mapping) or _is_tensor_dict(obj):
        return None, None
    return _steps_from_mapping(obj)


def _steps_from_mapping(values: Mapping) -> tuple[int | None, int | None]:
    """(step, epoch) from a training dict, safetensors metadata (strings) or trainer_state.json."""
    step = next((s for s in (_as_int(values.get(k)) for k in STEP_KEYS) if s is not None), None)
    epoch = next((e for e in (_as_int(values.get(k)) for k in EPOCH_KEYS) if e is not None), None)
    return step, epoch


def _as_int(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, str) and len(value) < 20 and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():  # HF stores epoch as 3.0
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _name_numbers(name: str) -> tuple[int | None, int | None, int | None]:
    """(explicit step, epoch, bare trailing number) in a file/folder name; never a metric
    such as ``val_loss=0.12``. ``ckpt_10`` is bare: a step or an epoch, the file decides."""
    stem = _strip_suffixes(name)
    step = _STEP_NAME_RE.search(stem)
    epoch = _EPOCH_NAME_RE.search(stem)
    bare = None if step else _TRAILING_NUMBER_RE.search(_EPOCH_NAME_RE.sub("", stem))  # `epoch_10` is not step 10
    return (int(step.group(1)) if step else None, int(epoch.group(1)) if epoch else None,
            int(bare.group(1)) if bare else None)


def _step_from_name(name: str) -> tuple[int | None, int | None]:
    """(step, epoch) parsed from a file/folder name (a bare trailing number counts as the step)."""
    step, epoch, bare = _name_numbers(name)
    return (step if step is not None else bare), epoch


def _resolve_step(inside_step: int | None, inside_epoch: int | None, name: str) -> tuple[int | None, str | None, int | None]:
    """(step, its source, epoch): stored step > step named as such > epoch (stored, then named)
    > a bare number in the name. So MatterSim's ``ckpt_10.pth`` holding ``last_epoch=10`` is
    epoch 10, not step 10, while a raw ``ckpt_1000.pt`` is step 1000 by its name."""
    named_step, named_epoch, bare = _name_numbers(name)
    epoch = inside_epoch if inside_epoch is not None else named_epoch
    for value, source in ((inside_step, "file"), (named_step, "name"), (inside_epoch, "epoch"),
                          (named_epoch, "epoch"), (bare, "name")):
        if value is not None:
            return value, source, epoch
    return None, None, epoch


def _strip_suffixes(name: str) -> str:
    while name.lower().endswith(WEIGHT_SUFFIXES):
        name = name[: name.rfind(".")]
    return name


# --------------------------------------------------------------------------- reading


def read_checkpoint(
    path_or_ref: Path | str | CheckpointRef, map_location: Any = "cpu", *, weights: str = "auto"
) -> LoadedCheckpoint:
    """Read one set of weights of a checkpoint file or HF folder (never executes pickled code).

    ``weights``: ``"auto"`` takes the EMA set when there is one, else the raw weights;
    ``"raw"`` / ``"ema"`` insist (``CheckpointError`` ``no_raw`` / ``no_ema`` otherwise).
    Given a :class:`CheckpointRef`, its ``ema_path`` is used; given a path, an EMA sibling
    beside it (``X-EMA.ckpt``, ``ema_X.pt``) is found on disk.
    """
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, not {weights!r}")
    if isinstance(path_or_ref, CheckpointRef):
        return _read(path_or_ref.path, map_location, weights, path_or_ref.ema_path)
    path = Path(path_or_ref)
    return _read(path, map_location, weights, _ema_partner_on_disk(path) if _stat(path) else None)


def _read(path: Path, map_location: Any, weights: str, ema_path: Path | None, mmap: bool = False) -> LoadedCheckpoint:
    """:func:`read_checkpoint` for a resolved path and EMA sibling (``mmap``: discovery's cheap reads)."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{display_name(path)}: no such file or directory", status="not_found")
    if path.is_dir():
        return _read_hf_folder(path, map_location, weights)
    if path.name.lower().endswith(".safetensors"):
        state_dict = _load_safetensors(path, map_location)
        step, epoch = _steps_from_mapping(_safetensors_metadata(path))
        kind = "ema" if _is_ema_name(path.name) else "raw"
        return _choose(path, [_WeightSet(kind, "safetensors", state_dict)], weights, "safetensors", step, epoch, {})

    obj = _torch_load(path, map_location, mmap=mmap)
    fmt, sets, step, epoch, metadata = _analyse(obj, path)
    if ema_path is not None and weights != "raw":
        sets = _sibling_sets(ema_path, map_location, mmap) + sets
    return _choose(path, sets, weights, fmt, step, epoch, metadata)


def _analyse(obj: Any, path: Path) -> tuple[str, list[_WeightSet], int | None, int | None, dict]:
    """(format, weight sets, step, epoch, metadata) of one unpickled file; never str()s its contents."""
    name = display_name(path.name)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a dict of named tensors", status="no_weights")
    kind = "ema" if _is_ema_name(path.name) else "raw"
    if not obj:
        raise CheckpointError(f"{name}: contains no tensors", status="no_weights")
    if _is_tensor_dict(obj):
        return "state_dict", [_WeightSet(kind, "state_dict", dict(obj))], None, None, {}
    if _torch_ema_params(obj) is not None:  # a separate torch_ema file: ema.state_dict()
        return "torch_ema", [_WeightSet("ema", "torch_ema shadow_params", None, _torch_ema_params(obj))], None, None, {}

    sets = _training_dict_sets(obj)
    if kind == "ema":  # NeMo's X-EMA.ckpt, ema_X.pt: whatever the file holds is the average
        sets = [replace(s, kind="ema") for s in sets]
    if not sets:
        raise CheckpointError(
            f"{name}: no model weights found (top-level keys: {_preview(list(obj))}); "
            f"expected one of {list(RAW_KEYS[:3]) + ['state_dict_ema']} to hold a dict of tensors",
            status="no_weights",
        )
    lightning = "pytorch-lightning_version" in obj or "lightning_version" in obj
    metadata = {"weights_key": sets[0].source, "keys": [_safe_key(k) for k in list(obj)[:_MAX_LISTED]]}
    version = obj.get("pytorch-lightning_version") or obj.get("lightning_version")
    if isinstance(version, str):
        metadata["lightning_version"] = version[:40]
    step, epoch = _steps_from_mapping(obj)
    return ("lightning" if lightning else "training_dict"), sets, step, epoch, metadata


def _training_dict_sets(obj: Mapping) -> list[_WeightSet]:
    """Every weight set a training dict holds, raw and EMA, in order of preference."""
    sets: list[_WeightSet] = []
    # Lightning's WeightAveraging moves the raw weights to current_model_state and saves the
    # average as state_dict (lightning/pytorch/callbacks/weight_averaging.py, on_save_checkpoint).
    averaged = _is_tensor_dict(obj.get("current_model_state")) and isinstance(obj.get("averaging_state"), Mapping)
    raw_found = None
    for key in RAW_KEYS:
        found = _tensor_dict_at(obj, key)
        if found is not None:
            raw_found = found
            if averaged and key == "state_dict":
                sets.append(_WeightSet("ema", f"Lightning {_averaging_callback(obj)} (averaged weights in state_dict)", found[1]))
                sets.append(_WeightSet("raw", "current_model_state", dict(obj["current_model_state"])))
            elif obj.get(AVERAGED_MARKER) is True:  # the trainer saved its weight average as the model's weights
                sets.append(_WeightSet("ema", f"{found[0]} (the weight average: {AVERAGED_MARKER})", found[1]))
            else:
                sets.append(_WeightSet("raw", *found))
            break
    if raw_found is None:  # e.g. metatrain's model_state_dict, which carries `finetune_config: {}`
        for key in RAW_KEYS:
            found = _mostly_tensor_dict_at(obj, key)
            if found is not None:
                sets.append(_WeightSet("raw", *found))
                break
    for key in EMA_KEYS:
        found = _tensor_dict_at(obj, key)
        if found is not None:
            sets.append(_WeightSet("ema", *found))
        elif isinstance(obj.get(key), Mapping) and _torch_ema_params(obj[key]) is not None:
            sets.extend(_torch_ema_sets(obj, key, sets))
    callbacks = obj.get("callbacks")
    if isinstance(callbacks, Mapping):  # e.g. a Lightning EMA callback returning {"state_dict_ema": ...}
        for cb_key, state in list(callbacks.items())[:_MAX_CALLBACKS]:
            for key in EMA_KEYS if isinstance(state, Mapping) else ():
                if _is_tensor_dict(state.get(key)):
                    sets.append(_WeightSet("ema", f"callbacks[{_safe_key(cb_key)}][{key!r}]", dict(state[key])))
    optimizer_states = obj.get("optimizer_states")
    if isinstance(optimizer_states, (list, tuple)):  # NeMo's EMAOptimizer.state_dict(): {"opt", "ema", ...}
        for i, state in enumerate(optimizer_states[:_MAX_CALLBACKS]):
            if isinstance(state, Mapping) and _is_tensor_list(state.get("ema")):
                sets.append(_WeightSet("ema", f"optimizer_states[{i}]['ema']", None, list(state["ema"])))
                break
    if not any(s.kind == "raw" for s in sets) and not any(s.named for s in sets):
        # Any other key holding a dict of tensors (e.g. {"encoder_weights": {...}}).
        skip = set(WEIGHT_KEYS) | {"current_model_state", "averaging_state", "callbacks", "optimizer_states"}
        for key in list(obj)[:_MAX_LISTED * 50]:
            if key not in skip and _is_tensor_dict(obj[key]):
                sets.append(_WeightSet("raw", _safe_key(key), dict(obj[key])))
                break
    return sets


def _torch_ema_sets(obj: Mapping, key: str, sets: list[_WeightSet]) -> list[_WeightSet]:
    """A torch_ema state under ``key``. MatterSim (and anyone saving inside
    ``ema.average_parameters()``) stores the *averaged* weights as the model's state_dict and
    the raw ones in ``collected_params``: then the named set is relabelled EMA, and the
    collected params become the raw set."""
    shadow = _torch_ema_params(obj[key])
    raw = next((s for s in sets if s.kind == "raw" and s.named), None)
    if raw is not None and _holds_in_order(raw.named, shadow):
        out = [_WeightSet("ema", f"{raw.source} (= torch_ema shadow_params in '{key}': saved with the average swapped in)",
                          raw.named)]
        sets.remove(raw)
        collected = obj[key].get("collected_params")
        if _is_tensor_list(collected) and len(collected) == len(shadow):
            out.append(_WeightSet("raw", f"'{key}' collected_params (torch_ema's copy of the raw weights)", None,
                                  list(collected)))
        return out
    return [_WeightSet("ema", f"'{key}' torch_ema shadow_params", None, shadow)]


def _holds_in_order(named: Mapping, tensors: list) -> bool:
    """Whether ``tensors`` appear, equal and in order, among the values of ``named``
    (a state_dict lists parameters in ``parameters()`` order, buffers interleaved)."""
    values = iter(named.values())
    for t in tensors:
        if not any(v.shape == t.shape and v.dtype == t.dtype and torch.equal(v, t) for v in values):
            return False
    return True


def _averaging_callback(obj: Mapping) -> str:
    """The WeightAveraging subclass named in a Lightning checkpoint's callback states."""
    callbacks = obj.get("callbacks")
    if isinstance(callbacks, Mapping):
        for key in list(callbacks)[:_MAX_CALLBACKS]:
            if isinstance(key, str) and "Averaging" in key:
                return display_name(key.split("{")[0])[:60]
    return "WeightAveraging"


def _tensor_dict_at(obj: Mapping, key: str) -> tuple[str, dict] | None:
    """(source, tensors) for ``obj[key]`` when it is a dict of tensors, or holds one under a
    raw weight key one level down (``model.state_dict``, ``model.model_state_dict``)."""
    value = obj.get(key)
    if _is_tensor_dict(value):
        return key, dict(value)
    if isinstance(value, Mapping):
        for sub in RAW_KEYS:
            if _is_tensor_dict(value.get(sub)):
                return f"{key}.{sub}", dict(value[sub])
    return None


def _mostly_tensor_dict_at(obj: Mapping, key: str) -> tuple[str, dict] | None:
    """``obj[key]`` as a state dict of its tensors when a few of its entries are not tensors
    (configs a trainer stores beside the weights); those entries are dropped and named in the
    source, e.g. ``"model_state_dict (dropped non-tensor 'finetune_config')"``."""
    value = obj.get(key)
    if not isinstance(value, Mapping) or not value or len(value) > 100_000:
        return None
    tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
    dropped = [k for k in value if not isinstance(value[k], torch.Tensor)]
    if not tensors or len(dropped) > max(8, len(value) // 4):
        return None
    return f"{key} (dropped non-tensor {_preview(dropped)})", tensors


def _sibling_sets(ema_path: Path, map_location: Any, mmap: bool) -> list[_WeightSet]:
    """The EMA weight sets of a sibling file, labelled with its name."""
    try:
        obj = _torch_load(ema_path, map_location, mmap=mmap) if not ema_path.name.endswith(".safetensors") else None
        sets = (_analyse(obj, ema_path)[1] if obj is not None
                else [_WeightSet("ema", "safetensors", _load_safetensors(ema_path, map_location))])
    except CheckpointError as exc:
        raise CheckpointError(f"EMA sibling {exc}", status=exc.status) from None
    label = f"sibling {display_name(ema_path.name)}"
    return [replace(s, kind="ema", source=label if s.source in ("state_dict", "safetensors") else f"{label} {s.source}")
            for s in sets]


def _choose(path: Path, sets: list[_WeightSet], weights: str, fmt: str, step: int | None, epoch: int | None,
            metadata: dict) -> LoadedCheckpoint:
    name = display_name(path.name)
    emas = sorted((s for s in sets if s.kind == "ema"), key=lambda s: s.named is None)  # named before ordered
    raws = [s for s in sets if s.kind == "raw"]
    kinds = tuple(k for k in ("raw", "ema") if any(s.kind == k for s in sets))
    if weights == "ema" and not emas:
        raise CheckpointError(
            f"{name}: no EMA weights found (looked for {', '.join(EMA_KEYS[:3])} ..., an X-EMA.ckpt / ema_X sibling, "
            "optimizer_states[i]['ema'], torch_ema shadow_params, Lightning WeightAveraging); use weights raw or auto",
            status="no_ema",
        )
    if weights == "raw" and not raws:
        partner = _raw_partner_on_disk(path) if _is_ema_name(path.name) else None
        where = f"; the raw weights are in {display_name(partner.name)}" if partner else ""
        raise CheckpointError(f"{name}: holds only EMA weights ({emas[0].source}){where}; use weights ema or auto",
                              status="no_raw")
    chosen = (emas or raws)[0] if weights == "auto" else (emas if weights == "ema" else raws)[0]
    named = chosen.named
    if named is None:  # a list in parameter order: buffers and key names come from a named set (raw first)
        named = next((s.named for s in raws + emas if s.named), None) or {}
    _check_keys(named, chosen.source, name)
    if not named and not chosen.ordered:
        raise CheckpointError(f"{name}: contains no tensors", status="no_weights")
    step, source, epoch = _resolve_step(step, epoch, path.name)
    metadata = {**metadata, "epoch": epoch, "step_source": source}
    return LoadedCheckpoint(state_dict=dict(named), format=fmt, step=step, metadata=metadata, weights=chosen.kind,
                            weights_source=chosen.source, weight_sets=kinds, ordered_params=chosen.ordered,
                            epoch=epoch, step_source=source)


def _check_keys(named: Mapping, where: str, name: str) -> None:
    bad = [k for k in named if not isinstance(k, str)]
    if bad:
        types = "/".join(sorted({type(k).__name__ for k in bad}))
        raise CheckpointError(
            f"{name}: {len(bad)} of the {len(named)} tensors in {where} are keyed by {types}, not by parameter name "
            f"(e.g. {_safe_key(bad[0])}); re-save with torch.save(model.state_dict(), path)",
            status="no_weights",
        )


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    """:func:`~equiaudit.io.safe_load.load_weights_only` with every failure turned into a one-line CheckpointError."""
    name = display_name(path.name)
    try:
        try:
            return load_weights_only(path, map_location, mmap=mmap)
        except RefusedPickle:
            # TorchScript objects / metatrain classes beside the weights (metatrain's model_N.ckpt):
            # read again with them as inert placeholders; any other global is still refused.
            from equiaudit.io.safe_opaque import opaque_globals, read_opaque

            if not opaque_globals(path):
                raise
            return read_opaque(path, map_location, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{display_name(path)}: no such file or directory", status="not_found") from None
    except NotRegularFile as exc:
        raise CheckpointError(f"{name}: {exc.kind}, not a regular file: not opened", status="unreadable") from None
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot open ({exc.strerror or exc})", status="unreadable") from None
    except RefusedPickle as exc:
        if exc.pickled_module:
            raise CheckpointError(
                f"{name}: refused: a whole pickled model (the pickle needs `{exc.global_name}`), which loads only by "
                "running code from the file; equiaudit never executes pickled code. Use the run's training checkpoints "
                "(state_dicts), or, for a file you trust, convert it once yourself: "
                f"torch.save(torch.load(PATH, weights_only=False).state_dict(), '{_strip_suffixes(name)}.pt')",
                status="unsafe_pickle",
            ) from None
        raise CheckpointError(
            f"{name}: refused: the pickle needs `{exc.global_name}`; "
            "equiaudit never executes pickled code. Re-save the weights as a state_dict "
            "(torch.save(model.state_dict(), path)) or .safetensors",
            status="unsafe_pickle",
        ) from None
    except TooLarge as exc:
        raise CheckpointError(f"{name}: refused: {exc.reason}", status="too_large") from None
    except DamagedFile as exc:
        raise _corrupt(path, exc.reason) from None


def _corrupt(path: Path, reason: BaseException | str) -> CheckpointError:
    reason = damaged_reason(reason) if isinstance(reason, BaseException) else reason
    if "TorchScript archive" in reason:  # torch.jit.save's format: neither truncated nor corrupt
        return CheckpointError(
            f"{display_name(path.name)}: a TorchScript archive (torch.jit.save), a program rather than a checkpoint; "
            "equiaudit does not run it by default: audit the run's training checkpoints, or, for a known model family "
            "and a file you trust, `equiaudit audit FILE --data DATA --allow-torchscript`",
            status="torchscript")
    return CheckpointError(f"{display_name(path.name)}: not a readable checkpoint (truncated or corrupt: {reason})",
                           status="corrupt")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _is_tensor_list(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj)


def _torch_ema_params(obj: Mapping) -> list | None:
    """``shadow_params`` of a torch_ema ``ExponentialMovingAverage.state_dict()``, if ``obj`` is one."""
    shadow = obj.get("shadow_params")
    return list(shadow) if _is_tensor_list(shadow) and "decay" in obj else None


def _require_regular(path: Path) -> None:
    st = _stat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{display_name(path.name)}: {file_kind(st.st_mode)}, not a regular file: not opened",
                              status="unreadable")


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    _require_regular(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: a damaged header
        raise _corrupt(path, exc) from None


def _load_safetensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _require_regular(path)
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # noqa: BLE001 - safetensors never runs code; any failure is a bad file
        raise _corrupt(path, exc) from None


def _read_json(path: Path, limit: int = 64 * 2**20) -> Any:
    """A small JSON file, opened only if regular (a FIFO named trainer_state.json must not hang us)."""
    with open_regular(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError("too large")
    return json.loads(data)


def _hf_weights_file(folder: Path) -> Path | None:
    return next((folder / n for n in HF_WEIGHT_FILES if (folder / n).is_file()), None)


def _hf_folder_step(folder: Path) -> tuple[int | None, int | None]:
    """(step, epoch) from ``trainer_state.json``, else from the weights' safetensors metadata."""
    state_file = folder / "trainer_state.json"
    if state_file.is_file():
        try:
            state = _read_json(state_file)
            step, epoch = _steps_from_mapping(state) if isinstance(state, Mapping) else (None, None)
        except (OSError, ValueError):
            step, epoch = None, None
        if step is not None:
            return step, epoch
    weights = _hf_weights_file(folder)
    if weights is not None and weights.name == "model.safetensors":
        return _steps_from_mapping(_safetensors_metadata(weights))
    return None, None


def _read_hf_folder(folder: Path, map_location: Any, weights: str = "auto") -> LoadedCheckpoint:
    weights_file = _hf_weights_file(folder)
    name = display_name(folder.name)
    if weights_file is None:
        raise CheckpointError(
            f"{name}: no model weights inside (looked for {', '.join(HF_WEIGHT_FILES)})", status="no_weights"
        )
    files = _shard_files(weights_file) if weights_file.name.endswith(".index.json") else [weights_file]
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(_file_tensors(file, map_location))
    step, epoch = _hf_folder_step(folder)
    metadata = {"files": [display_name(f.name) for f in files]}
    return _choose(folder, [_WeightSet("raw", display_name(weights_file.name), state_dict)], weights, "hf_folder",
                   step, epoch, metadata)


def _shard_files(index: Path) -> list[Path]:
    try:
        weight_map = _read_json(index)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(index, exc) from None
    for name in names:
        # The index is untrusted: a shard is a file of this folder, never a path out of it.
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise CheckpointError(f"{display_name(index.parent.name)}/{display_name(index.name)}: weight_map names "
                                  f"{_safe_key(name)}, not a file of this folder: refused", status="corrupt")
    return [index.parent / name for name in names]


def _file_tensors(file: Path, map_location: Any) -> dict[str, torch.Tensor]:
    """All weights of one file inside an HF folder (shard or whole model)."""
    if not file.is_file():
        raise CheckpointError(f"{display_name(file.parent.name)}: missing weight file {display_name(file.name)}",
                              status="corrupt")
    try:
        if file.name.endswith(".safetensors"):
            return _load_safetensors(file, map_location)
        return _read(file, map_location, "raw", None).state_dict
    except CheckpointError as exc:  # name the folder too: every HF checkpoint has a model.safetensors
        raise CheckpointError(f"{display_name(file.parent.name)}/{exc}", status=exc.status) from None


def _safe_key(key: Any) -> str:
    """A dict key from a file, shown without str()ing arbitrary objects: strings (escaped,
    cut to 80 characters) and small numbers as themselves, anything else by its type."""
    if isinstance(key, str):
        shown = display_name(key)
        return shown if len(shown) <= 80 else shown[:77] + "..."
    if isinstance(key, (bool, float)) or (isinstance(key, int) and abs(key) < 10**12):
        return repr(key)
    return f"<{type(key).__name__}>"


def _preview(items: Sequence, limit: int = _PREVIEW_KEYS) -> str:
    shown = "[" + ", ".join(repr(_safe_key(x)) for x in items[:limit]) + "]"
    return shown if len(items) <= limit else f"{shown[:-1]}, ... +{len(items) - limit} more]"


# --------------------------------------------------------------------------- into a model


def load_into_model(model: torch.nn.Module, ckpt: LoadedCheckpoint, prefix: str | None = None) -> str | None:
    """Load ``ckpt`` into ``model`` (strict), matching key prefixes in either direction, then
    leave the model in ``eval()`` mode.

    ``prefix=None`` finds the transformation that makes the keys match when it is
    unambiguous: stripping a prefix from the checkpoint's keys (``module.`` from DDP,
    ``_orig_mod.`` from torch.compile, a Lightning attribute such as ``model.`` — other
    attributes of the LightningModule are then ignored — and combinations), or adding one
    the checkpoint lacks (published weights ``x`` for a model whose factory wraps the network
    as ``self.model``: ``model.x``). ``prefix="model."`` forces it: stripped from the
    checkpoint's keys if they carry it, else added. ``prefix=""`` takes the keys as stored.
    ``ckpt.ordered_params`` (torch_ema, NeMo EMAOptimizer) are mapped onto
    ``model.named_parameters()`` in order, shapes checked.

    A model may define ``upgrade_state_dict(state_dict) -> state_dict``: it is given the
    checkpoint's tensors as stored and returns them in its current layout (older key names
    or tensor orders of its own project, as SevenNet's backward-compatibility patches do; see
    :mod:`equiaudit.zoo.sevennet`). It sees tensors only; nothing from the file runs.

    The model is matched in train mode first, then in eval mode: some modules (escnn) have
    other state_dict keys in eval mode (cached ``filter``/``expanded_bias`` buffers) and a
    checkpoint saved during training has the train-mode keys. Returns a short description
    of what was done (``"stripped 'module.'"``, ``"added 'model.'; 12 parameters from ..."``),
    or ``None`` when the keys matched as stored. Raises ``CheckpointError("key_mismatch")``.
    """
    upgrade = getattr(model, "upgrade_state_dict", None)
    if callable(upgrade) and ckpt.state_dict:
        try:
            ckpt = replace(ckpt, state_dict=upgrade(dict(ckpt.state_dict)))
        except Exception as exc:  # noqa: BLE001 - the model's own code: its failure is this checkpoint's
            raise CheckpointError(f"the model's upgrade_state_dict failed: {type(exc).__name__}: {first_line(exc)}",
                                  status="key_mismatch") from None
    modes = {}
    for training in (True, False):
        model.train(training)
        modes[training] = list(model.state_dict())
    first_error: CheckpointError | None = None
    for training in (True, False):
        model.train(training)
        try:
            state, notes = _match(model, ckpt, prefix)
        except CheckpointError as exc:
            first_error = first_error or exc
            continue
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # e.g. a custom module's load hook rejecting a value
            model.eval()
            after = f" ({notes[0]})" if notes else ""
            raise CheckpointError(f"cannot load weights into the model: {damaged_reason(exc)}{after}",
                                  status="key_mismatch") from None
        if set(modes[True]) != set(modes[False]):
            notes.append(f"matched the model's {'train' if training else 'eval'}-mode keys")
        model.eval()
        return "; ".join(notes) or None
    model.eval()
    assert first_error is not None
    raise first_error


def _match(model: torch.nn.Module, ckpt: LoadedCheckpoint, prefix: str | None) -> tuple[dict, list[str]]:
    """The checkpoint's tensors renamed to the model's keys (in its current mode), and notes."""
    own = model.state_dict()
    keys = list(ckpt.state_dict)
    action, pre = _forced_transform(keys, prefix) if prefix is not None else _best_transform(keys, set(own))
    if action == "strip":
        state = {k[len(pre):]: v for k, v in ckpt.state_dict.items() if k.startswith(pre)}
    else:
        state = {pre + k: v for k, v in ckpt.state_dict.items()}
    notes = [f"{'stripped' if action == 'strip' else 'added'} '{pre}'"] if pre else []
    if ckpt.ordered_params is not None:
        state.update(_ordered_onto(model, ckpt))
        notes.append(f"{len(ckpt.ordered_params)} parameters from {ckpt.weights_source}")

    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"missing {_preview(missing)}"] if missing else []) + (
            [f"unexpected {_preview(unexpected)}"] if unexpected else []
        )
        hint = (" (a parameter-order list holds no buffers: they come from the training checkpoint)"
                if ckpt.ordered_params is not None and not ckpt.state_dict and missing else "")
        problems.append("keys do not match the model: " + "; ".join(parts) + hint)
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        k = shapes[0]
        more = f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""
        problems.append(
            f"shape mismatch for '{k}': checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}{more}"
        )
    if problems:
        after = f" (after {'stripping' if action == 'strip' else 'adding'} '{pre}')" if pre else ""
        raise CheckpointError("; ".join(problems) + after, status="key_mismatch")
    return state, notes


def _ordered_onto(model: torch.nn.Module, ckpt: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """``ckpt.ordered_params`` named by ``model.named_parameters()`` (the order torch_ema and
    optimizers see), after checking count and every shape."""
    params = list(model.named_parameters())
    tensors = ckpt.ordered_params or []
    if len(tensors) != len(params):
        raise CheckpointError(
            f"{ckpt.weights_source} holds {len(tensors)} tensors but the model has {len(params)} parameters",
            status="key_mismatch",
        )
    for i, ((key, param), tensor) in enumerate(zip(params, tensors)):
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{ckpt.weights_source}: tensor {i} has shape {tuple(tensor.shape)} but parameter '{key}' has "
                f"{tuple(param.shape)} (the list must follow model.parameters() order)",
                status="key_mismatch",
            )
    return {key: tensor for (key, _), tensor in zip(params, tensors)}


def _forced_transform(ckpt_keys: list[str], prefix: str) -> tuple[str, str]:
    if not prefix or any(k.startswith(prefix) for k in ckpt_keys):
        return "strip", prefix
    return "add", prefix


def _best_transform(ckpt_keys: list[str], model_keys: set[str]) -> tuple[str, str]:
    """The prefix to strip from (or add to) the checkpoint's keys that maps most of them onto model keys.

    Candidates are the leading 1-3 dotted components of checkpoint keys whose remainder is a
    model key (strip), and of model keys whose remainder is a checkpoint key (add). Ties go to
    fewer leftover keys, then to well-known wrapper prefixes (so ``model.`` wins over an
    ``ema.`` copy of the same network), then to the shorter prefix; a tie beyond that is
    ambiguous and raises (pass ``prefix=``).
    """
    ckpt_set = set(ckpt_keys)
    candidates = {("strip", "")}
    for keys, other, action in ((ckpt_keys, model_keys, "strip"), (model_keys, ckpt_set, "add")):
        for key in keys:
            parts = key.split(".")
            for i in range(1, min(len(parts), 4)):
                if ".".join(parts[i:]) in other:
                    candidates.add((action, ".".join(parts[:i]) + "."))

    def score(candidate: tuple[str, str]) -> tuple:
        action, prefix = candidate
        under = ({k[len(prefix):] for k in ckpt_keys if k.startswith(prefix)} if action == "strip"
                 else {prefix + k for k in ckpt_keys})
        known = prefix == "" or all(p + "." in KNOWN_PREFIXES for p in prefix[:-1].split("."))
        return (len(under & model_keys), -len(under - model_keys), known, -len(prefix))

    ranked = sorted(candidates, key=lambda c: (score(c), c), reverse=True)
    if len(ranked) > 1 and score(ranked[0]) == score(ranked[1]) and score(ranked[0])[0] > 0:
        options = " or ".join(f"{'adding' if a == 'add' else 'stripping'} '{p}'" for a, p in ranked[:2])
        raise CheckpointError(
            f"ambiguous key prefix: {options} match the model equally; "
            "set the prefix explicitly (checkpoints.prefix)",
            status="key_mismatch",
        )
    return ranked[0]


# --------------------------------------------------------------------------- inspect


def describe_checkpoint(path: Path | str, *, weights: str = "auto") -> dict:
    """Summary for ``equiaudit inspect``: format, step (and where it came from), which weight
    set was chosen and from where, the other sets present, tensor/parameter counts, prefix, dtypes.

    ``n_parameters`` counts elements of floating tensors (integer buffers such as
    ``num_batches_tracked`` excluded); ``prefix`` is the wrapper prefix shared by all keys.
    A file that reads but holds no usable weights (``no_weights`` / ``no_ema`` / ``no_raw``)
    gets ``problem`` and ``status`` entries and a bounded listing of its top-level ``contents``
    instead of raising; unreadable, unsafe or damaged files raise :class:`CheckpointError`.
    """
    path = Path(path)
    try:
        ckpt = read_checkpoint(path, weights=weights)
    except CheckpointError as exc:
        if exc.status not in ("no_weights", "no_ema", "no_raw"):
            raise
        return {"path": display_name(path), "status": exc.status, "problem": str(exc), "contents": _contents(path)}
    tensors = list(ckpt.state_dict.values()) if ckpt.state_dict else list(ckpt.ordered_params or [])
    dtypes: dict[str, int] = {}
    for tensor in tensors:
        name = str(tensor.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    sibling = _ema_partner_on_disk(path) if _stat(path) else None
    info = {
        "path": display_name(path),
        "format": ckpt.format,
        "step": ckpt.step,
        "step_source": ckpt.step_source,
        "epoch": ckpt.epoch,
        "weights": ckpt.weights,
        "weights_source": ckpt.weights_source,
        "weight_sets": list(ckpt.weight_sets) if sibling is None else sorted({*ckpt.weight_sets, "ema"}),
        "ema_file": display_name(sibling.name) if sibling is not None else None,
        "n_tensors": len(tensors),
        "n_parameters": sum(t.numel() for t in tensors if t.is_floating_point()),
        "prefix": _shared_prefix(list(ckpt.state_dict), lightning=ckpt.format == "lightning"),
        "dtypes": dtypes,
    }
    if ckpt.ordered_params is not None:
        info["n_ordered_params"] = len(ckpt.ordered_params)
    return info


def _contents(path: Path) -> list[str]:
    """One line per top-level entry (at most ``_MAX_LISTED``): key and what it holds, never
    the str() of an object from the file."""
    try:
        obj = _torch_load(path, "cpu", mmap=True) if not path.is_dir() else None
    except CheckpointError:
        return []
    if not isinstance(obj, Mapping):
        return [f"<{type(obj).__name__}>"]
    lines = [f"{_safe_key(k)}: {_kind_of(v)}" for k, v in list(obj.items())[:_MAX_LISTED]]
    return lines + ([f"... +{len(obj) - _MAX_LISTED} more"] if len(obj) > _MAX_LISTED else [])


def _kind_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        n_tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        key_types = "/".join(sorted({type(k).__name__ for k in list(value)[:1000]})) or "-"
        return f"dict of {len(value)} ({n_tensors} tensors; keys {key_types})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, (int, float, bool)) or value is None:
        return _safe_key(value) if value is not None else "None"
    if isinstance(value, str):
        return repr(_safe_key(value))
    return f"<{type(value).__name__}>"


def _shared_prefix(keys: list[str], lightning: bool) -> str | None:
    """Leading components shared by all keys that are wrappers (``module.``, ``_orig_mod.``, ...).

    Without the model we cannot tell a wrapper from a real top-level submodule, so only known
    wrapper names count — plus, for Lightning, whichever single attribute holds every key.
    """
    prefix = ""
    while keys:
        heads = {k[len(prefix):].split(".", 1)[0] + "." for k in keys}
        if len(heads) != 1 or any("." not in k[len(prefix):] for k in keys):
            break
        head = heads.pop()
        if head not in KNOWN_PREFIXES and not (lightning and prefix == ""):
            break
        prefix += head
    return prefix or None


def save_checkpoint(path: Path | str, state_dict: Mapping[str, torch.Tensor], *, step: int, averaged: bool = False,
                    **metadata: Any) -> Path:
    """Write a training dict ``{"model_state_dict", "step", **metadata}`` atomically.

    ``averaged``: ``state_dict`` is the weight average (EMA): the file says so
    (:data:`AVERAGED_MARKER`), and readers report its weights as ``ema``.

    Temp file + rename in the same folder, so a reader (``audit --watch``) never sees a
    half-written checkpoint. ``metadata`` must be plain numbers/strings (weights-only loadable).
    """
    payload = {"model_state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "step": int(step), **metadata}
    if averaged:
        payload[AVERAGED_MARKER] = True
    return atomic_write(path, lambda handle: torch.save(payload, handle))

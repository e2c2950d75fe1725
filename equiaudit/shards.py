"""Array-job shards: ``equiaudit audit CFG --shard I/N`` audits part I of N into ``OUT/shards/``,
``equiaudit merge OUT`` combines the N parts into what one process writes.

Shards never talk to each other and never open ``OUT/cache.sqlite`` (SQLite's locks are not
to be trusted across the nodes of a shared filesystem): each writes plain files, atomically
(:mod:`equiaudit.io.atomic`), under names no other shard uses, so the N parts may run at
the same time into one ``OUT``::

    OUT/shards/<checkpoint key>.<I>-of-<N>.pt   one per (shard, checkpoint): the statistics
                                                of the batches it evaluated, or its failure
    OUT/shards/shard-<I>-of-<N>.json            written last: the shard finished, with its
                                                settings and every checkpoint it considered

A ``.pt`` file is ``torch.save`` of plain values — ``{"format", "version", "meta": JSON
text, "stats": SampleStats.to_state() or None}`` — read back with ``weights_only=True``.
The checkpoint key hashes its path, size, modification time and the settings hash.

How the parts split the work is :func:`equiaudit.distributed.choose_mode`'s rule with N
parts: batches ``i ≡ I−1 (mod N)`` of every checkpoint (samples), or checkpoints
``j ≡ I−1 (mod N)`` whole (checkpoints). ``merge`` does not trust the split: it checks that
the batches of every checkpoint are covered exactly once, by shards of one split made
with the same settings, and names what is missing, duplicated or different (exit 2).
A shard rerun skips the checkpoints it already wrote (a preempted array task resumes).

What ``merge`` trusts: nothing inside ``OUT``. Part files are read weights-only and their
metadata checked field by field; manifests are checked field by field too (a missing or
mistyped field is one line naming the manifest and the field, exit 2). The model — the one
setting that runs code (``model.factory``, its ``kwargs``, the file it imports) — is never
taken from a manifest: a merge without ``--dynamics`` builds no model at all (the
statistics are in the parts), and one with ``--dynamics`` builds it from the user's own
config (``equiaudit merge OUT --config CFG``), refusing when the manifest's model section
differs from it (docs/safety.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from equiaudit.errors import ConfigError, first_line

__all__ = ["ShardSpec", "parse_shard", "run_shard", "merge_shards", "ShardError", "checkpoint_key", "SHARD_FORMAT"]

SHARD_FORMAT = "equiaudit-shard"
SHARD_VERSION = 1
_MANIFEST = re.compile(r"^shard-(\d+)-of-(\d+)\.json$")
_PART = re.compile(r"^([0-9a-f]{16})\.(\d+)-of-(\d+)\.pt$")


class ShardError(ConfigError):
    """Shards that cannot be merged: missing, duplicated, made with other settings, unreadable (exit 2)."""

    status = "bad_shards"


@dataclass(frozen=True)
class ShardSpec:
    """Part ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def part(self) -> int:
        return self.index - 1


def parse_shard(text: str) -> ShardSpec:
    """``"I/N"`` with ``1 ≤ I ≤ N`` (SLURM's ``$SLURM_ARRAY_TASK_ID/N`` with ``--array=1-N``)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ConfigError(f"--shard={text!r} must be I/N with 1 ≤ I ≤ N, e.g. --shard 2/8")
    return ShardSpec(int(match[1]), int(match[2]))


def checkpoint_key(ref, found, settings: Mapping[str, Any]) -> str:
    """16 hex digits naming one checkpoint file version (its EMA sibling's too) under one set
    of settings (the data and factory files included): the cache's :func:`~equiaudit.io.cache.result_key`, cut."""
    from equiaudit.io.cache import result_key

    return result_key(ref, found, settings)[:16]


def _manifest_name(shard: ShardSpec) -> str:
    return f"shard-{shard.index}-of-{shard.count}.json"


def _part_name(key: str, shard: ShardSpec) -> str:
    return f"{key}.{shard.index}-of-{shard.count}.pt"


def _ref_identity(ref, found) -> dict[str, Any]:
    return {"path": os.path.abspath(ref.path), "name": ref.name, "run": ref.run, "step": ref.step,
            "step_source": ref.step_source, "size": found.size if found else None,
            "mtime_ns": found.mtime_ns if found else None,
            "ema_path": os.path.abspath(ref.ema_path) if ref.ema_path is not None else None}


# ---------------------------------------------------------------------- one shard


def run_shard(audit, refs: Sequence, out, shard: ShardSpec, *, mode: str = "auto", events=None,
              on_mode: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Audit part ``shard`` of ``refs`` into ``OUT/shards`` (see the module docstring).

    Returns the manifest written. ``events`` (a :class:`~equiaudit.runner.RunEvents`):
    ``on_checkpoint``, ``on_batch``, ``on_error`` and ``on_result`` (called with a checkpoint's
    partial :class:`~equiaudit.runner.CheckpointShare`).
    """
    from equiaudit.distributed import choose_mode, owns_batch
    from equiaudit.io.atomic import atomic_write, atomic_write_text
    from equiaudit.io.cache import settings_identity, stamp
    from equiaudit.io.layout import OutputFolder
    from equiaudit.runner import RunEvents, evaluate_share

    if audit.plan.target_ci is not None:
        raise ConfigError("--target-ci does not combine with --shard: a shard cannot see the others' samples to stop; "
                          "use torchrun, or a fixed --samples")
    events = events or RunEvents()
    folder = OutputFolder(out)
    shards = folder.shards
    shards.mkdir(parents=True, exist_ok=True)
    config, plan = audit.config, audit.plan
    config_hash = config.settings_hash()
    settings = settings_identity(config)
    n_batches = plan.n_batches(len(audit.prepared))
    chosen, reason = choose_mode(mode, len(refs), n_batches, shard.count)
    if on_mode is not None:
        on_mode(chosen, reason)
    listed, written = [], []
    for number, ref in enumerate(refs):
        found = stamp(ref.path)
        identity = _ref_identity(ref, found)
        key = checkpoint_key(ref, found, settings)
        identity["key"] = key
        listed.append(identity)
        if chosen == "checkpoints":
            if not owns_batch(number, shard.part, shard.count):
                continue
            batches = None  # all of them
        else:
            batches = lambda i: owns_batch(i, shard.part, shard.count)  # noqa: E731
        target = shards / _part_name(key, shard)
        if found is not None and _finished(target):
            written.append(target.name)  # this shard ran before and wrote it: resume
            continue
        if events.on_checkpoint:
            events.on_checkpoint(ref)
        share = evaluate_share(audit, ref, batches=batches, piece=shard.part, on_batch=events.on_batch,
                               on_error=events.on_error)
        epoch = share.identity.get("epoch", ref.epoch) if share.ok else None
        meta = {
            "shard": shard.index, "of": shard.count, "mode": chosen, "config_hash": config_hash, "checkpoint": identity,
            "identity": share.identity, "batches": list(share.batches), "n_batches": n_batches, "status": share.status,
            "message": share.message, "seconds": share.seconds, "epoch": epoch,
        }
        state = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "meta": json.dumps(meta, default=str),
                 "stats": share.stats.to_state() if share.ok else None}
        atomic_write(target, lambda handle: torch.save(state, handle))
        written.append(target.name)
        if events.on_result:
            events.on_result(share)
    manifest = {
        "format": SHARD_FORMAT, "version": SHARD_VERSION, "shard": shard.index, "of": shard.count, "mode": chosen,
        "reason": reason, "config_hash": config_hash, "breakdown": plan.breakdown_identity(audit.prepared.data),
        "config": config.raw,
        "config_path": str(config.source.resolve()) if config.source else None, "cwd": os.getcwd(),
        "n_samples": len(audit.prepared), "batch_size": plan.batch_size, "n_batches": n_batches,
        "checkpoints": listed, "files": written, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(shards / _manifest_name(shard), json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def _finished(path: Path) -> bool:
    """A part file this shard wrote before, readable and successful (a failure is retried)."""
    try:
        meta, _ = _read_part(path)
    except ShardError:
        return False
    return meta.get("status") is None


# ---------------------------------------------------------------------- merging


def _weights_here(audit, ref, item: Mapping[str, Any], events) -> bool:
    """Load ``ref``'s weights into ``audit.model`` for ``--dynamics`` at merge time: only the
    file the shards audited (same size and mtime); otherwise a warning, and no dynamics rows
    for that checkpoint (its REE rows stand)."""
    from equiaudit.io.cache import stamp
    from equiaudit.runner import load_weights

    found = stamp(ref.path)
    if found is None or (found.size, found.mtime_ns) != (item.get("size"), item.get("mtime_ns")):
        reason = "it is gone" if found is None else "it changed since the shards ran"
        problem = f"cannot load {ref.name} here ({reason})"
    else:
        try:
            load_weights(audit, ref)
            return True
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - its REE rows still stand
            problem = f"cannot load {ref.name} here ({type(exc).__name__}: {first_line(exc)})"
    if events.on_warning:
        events.on_warning(f"--dynamics skipped for {ref.run}/{ref.name}: {problem}")
    return False


# ---------------------------------------------------------------------- field checks
# Manifests and part metadata are files inside OUT: anyone who can write there can write
# them, so every field merge uses is checked for presence and type before any is used.

_INT = (int,)
_OPTIONAL_INT = (int, type(None))
_TEXT = (str,)
_OPTIONAL_TEXT = (str, type(None))
_NUMBER = (int, float)
_KEY = re.compile(r"^[0-9a-f]{16}$")

_MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "shard": _INT, "of": _INT, "mode": _TEXT, "config_hash": _TEXT, "config": (dict,),
    "config_path": _OPTIONAL_TEXT, "cwd": _OPTIONAL_TEXT, "n_samples": _INT, "n_batches": _INT,
    "checkpoints": (list,), "files": (list,),
}
_CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "key": _TEXT, "path": _TEXT, "name": _TEXT, "run": _TEXT, "step": _OPTIONAL_INT, "step_source": _OPTIONAL_TEXT,
    "size": _OPTIONAL_INT, "mtime_ns": _OPTIONAL_INT, "ema_path": _OPTIONAL_TEXT,
}
_PART_FIELDS: dict[str, tuple[type, ...]] = {
    "config_hash": _TEXT, "identity": (dict,), "batches": (list,), "status": _OPTIONAL_TEXT,
    "message": _OPTIONAL_TEXT, "seconds": _NUMBER, "epoch": (int, float, type(None)),
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "text", dict: "a mapping", list: "a list", type(None): "null"}


def _field_error(path: Path, field: str, value: Any, allowed: tuple[type, ...], what: str) -> ShardError:
    wanted = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in allowed))
    shown = "missing" if value is _MISSING else f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"
    return ShardError(f"{path}: field '{field}' must be {wanted}, got {shown}: not a {what} this equiaudit wrote; "
                      "remove it and rerun its shard")


_MISSING = object()


def _check_fields(path: Path, data: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]], what: str,
                  prefix: str = "") -> None:
    for field, allowed in fields.items():
        value = data.get(field, _MISSING)
        # bool is an int to Python, never a count or a step here.
        if value is _MISSING or isinstance(value, bool) or not isinstance(value, allowed):
            raise _field_error(path, prefix + field, value, allowed, what)


def _check_manifest(path: Path, data: Mapping[str, Any]) -> None:
    """Every manifest field merge reads, present and of its type (:class:`ShardError` naming the first that is not)."""
    _check_fields(path, data, _MANIFEST_FIELDS, "manifest")
    if data["mode"] not in ("samples", "checkpoints"):
        raise ShardError(f"{path}: field 'mode' must be samples or checkpoints, got {str(data['mode'])[:40]!r}")
    for field in ("n_samples", "n_batches"):
        if data[field] < 0:
            raise ShardError(f"{path}: field '{field}' must be ≥ 0, got {data[field]}")
    for number, item in enumerate(data["checkpoints"]):
        if not isinstance(item, dict):
            raise _field_error(path, f"checkpoints[{number}]", item, (dict,), "manifest")
        _check_fields(path, item, _CHECKPOINT_FIELDS, "manifest", prefix=f"checkpoints[{number}].")
        if not _KEY.match(item["key"]):
            raise ShardError(f"{path}: field 'checkpoints[{number}].key' must be 16 hex digits, got {item['key'][:40]!r}")
    for number, name in enumerate(data["files"]):
        if not isinstance(name, str):
            raise _field_error(path, f"files[{number}]", name, _TEXT, "manifest")


def _check_part_meta(path: Path, meta: Any) -> None:
    if not isinstance(meta, dict):
        raise ShardError(f"{path}: its metadata is {type(meta).__name__}, not a mapping; remove it and rerun its shard")
    _check_fields(path, meta, _PART_FIELDS, "part file")
    for number, batch in enumerate(meta["batches"]):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise _field_error(path, f"batches[{number}]", batch, _INT, "part file")


def _read_part(path: Path) -> tuple[dict[str, Any], Any]:
    """``(meta, SampleStats or None)`` of one part file; :class:`ShardError` if it is not one."""
    from equiaudit.io.safe_load import load_weights_only
    from equiaudit.stats import SampleStats

    try:
        # The one weights-only loader: a part file is untrusted input too (size, pickle-work and regular-file bounds).
        state = load_weights_only(path, map_location="cpu")
        if not isinstance(state, dict) or state.get("format") != SHARD_FORMAT:
            raise ValueError("no equiaudit shard header")
        if state.get("version") != SHARD_VERSION:
            raise ValueError(f"shard format version {state.get('version')!r}; this equiaudit writes {SHARD_VERSION}")
        meta = json.loads(state["meta"])
        stats = None if state.get("stats") is None else SampleStats.from_state(state["stats"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is named, with why
        raise ShardError(f"{path}: not a readable shard file ({first_line(exc)}); remove it and rerun its shard") from None
    _check_part_meta(path, meta)
    return meta, stats


def _read_manifests(shards: Path) -> dict[tuple[int, int], dict[str, Any]]:
    manifests = {}
    for path in sorted(shards.glob("shard-*-of-*.json")):
        match = _MANIFEST.match(path.name)
        if not match:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != SHARD_FORMAT:
                raise ValueError("no equiaudit shard header")
        except (OSError, ValueError) as exc:
            raise ShardError(f"{path}: not a readable shard manifest ({first_line(exc)}); rerun its shard") from None
        _check_manifest(path, data)
        manifests[(int(match[1]), int(match[2]))] = data
    return manifests


def _names(parts) -> str:
    return ", ".join(f"{i}/{n}" for i, n in sorted(parts))


def _check_manifests(shards: Path, manifests: dict[tuple[int, int], dict[str, Any]]) -> int:
    """The split's N; :class:`ShardError` naming shards of several splits, other settings or missing ones."""
    if not manifests:
        pending = sorted(p.name for p in shards.glob("*.pt")) if shards.is_dir() else []
        hint = f" ({len(pending)} part file(s) but no finished shard: still running or killed?)" if pending else ""
        raise ShardError(f"no finished shards in {shards}{hint}: run `equiaudit audit CFG --shard I/N --out OUT` for I = 1..N first")
    hashes = defaultdict(list)
    for part, data in manifests.items():
        # The breakdown options change the statistics' columns, not the settings hash: both must agree.
        hashes[f"{data.get('config_hash')}, breakdown {data.get('breakdown')}"].append(part)
    if len(hashes) > 1:
        groups = "; ".join(f"{_names(parts)} (settings {h})" for h, parts in sorted(hashes.items(), key=lambda x: min(x[1])))
        raise ShardError(f"shards made with different settings in {shards}: {groups}; remove the stale ones and rerun")
    counts = {n for _, n in manifests}
    if len(counts) > 1:
        raise ShardError(f"duplicated shards in {shards}: parts of {len(counts)} different splits ({_names(manifests)}) "
                         "cover the same samples; remove the stale split's files")
    count = counts.pop()
    missing = [(i, count) for i in range(1, count + 1) if (i, count) not in manifests]
    if missing:
        raise ShardError(f"missing shard(s) {_names(missing)} in {shards} (not run, still running, or killed): "
                         f"run them, then merge again")
    return count


class _NoModel(torch.nn.Module):
    """Stands in for the model where merge needs none (no ``--dynamics``): building the
    model would run the factory's code, and nothing here evaluates it."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("merge built no model (it combines the shards' statistics)")


def _model_section(raw: Any) -> Any:
    return raw.get("model") if isinstance(raw, Mapping) else None


def merge_shards(out, *, config=None, events=None, device: str = "cpu"):
    """Combine the finished shards of ``OUT/shards`` into ``OUT``'s summary, breakdown,
    ``run.json`` and cache, through the runner's record path, as one process would have
    written them. Returns ``(audit, results, rows)``: the re-opened
    :class:`~equiaudit.runner.OpenAudit`, then as :meth:`~equiaudit.runner.Runner.run`.

    ``config``: the user's own :class:`~equiaudit.io.config.AuditConfig` (``--config``). The
    model is built only when ``--dynamics`` needs the weights, and then only from ``config``
    (never from a manifest: files in OUT are untrusted); a manifest whose ``model`` section
    differs from ``config``'s is refused. Without ``--dynamics`` no model is built and no
    user code runs.

    Raises :class:`ShardError` (one line, exit 2) for missing, duplicated, malformed or
    inconsistent shards before anything is written.
    """
    from equiaudit.io.cache import Stamp
    from equiaudit.io.checkpoints import CheckpointRef
    from equiaudit.io.config import parse_config
    from equiaudit.io.layout import OutputFolder
    from equiaudit.io.models import build_model
    from equiaudit.io.tables import merge_rows
    from equiaudit.runner import CheckpointShare, Runner, RunEvents, finish_checkpoint, open_audit

    events = events or RunEvents()
    folder = OutputFolder(out)
    shards = folder.shards
    manifests = _read_manifests(shards)
    count = _check_manifests(shards, manifests)
    first = manifests[(1, count)]
    # Every part file of a finished shard, by checkpoint key; parts of unfinished shards are ignored.
    parts: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for (index, _), data in sorted(manifests.items()):
        for name in data.get("files", []):
            match = _PART.match(name)
            if not match or (int(match[2]), int(match[3])) != (index, count):
                raise ShardError(f"{shards / _manifest_name(ShardSpec(index, count))}: lists {name!r}, not one of its part files")
            parts[match[1]].append((index, shards / name))
    # The checkpoints: every shard must have considered the same ones.
    seen: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for (index, _), data in sorted(manifests.items()):
        for item in data.get("checkpoints", []):
            if item["key"] not in seen:
                seen[item["key"]] = item
                order.append(item["key"])
    for key in order:
        without = [(i, count) for (i, _), data in manifests.items() if key not in {c["key"] for c in data["checkpoints"]}]
        if without:
            raise ShardError(f"{seen[key]['name']} ({seen[key]['path']}) was not seen by shard(s) {_names(without)} "
                             "(a checkpoint added or rewritten while the shards ran?): rerun those shards")
    loaded: dict[str, list[tuple[dict, Any]]] = {}
    n_batches = int(first["n_batches"])
    for key in order:
        coverage: dict[int, list[int]] = defaultdict(list)
        pieces = []
        for index, path in sorted(parts.get(key, [])):
            meta, stats = _read_part(path)
            if meta.get("config_hash") != first["config_hash"]:
                raise ShardError(f"{path}: made with other settings ({meta.get('config_hash')} vs {first['config_hash']}); "
                                 "remove it and rerun its shard")
            for batch in meta["batches"]:
                coverage[int(batch)].append(index)
            pieces.append((meta, stats))
        name = seen[key]["name"]
        doubled = {b: owners for b, owners in coverage.items() if len(owners) > 1}
        if doubled:
            batch, owners = min(doubled.items())
            raise ShardError(f"duplicated shards: batch {batch} of {name} is in shards {_names((i, count) for i in owners)} "
                             f"({len(doubled)} batch(es) doubled); remove the stale files and rerun those shards")
        absent = [b for b in range(n_batches) if b not in coverage]
        if absent:
            shown = ", ".join(map(str, absent[:5])) + (" …" if len(absent) > 5 else "")
            owners = sorted({b % count + 1 for b in absent}) if first["mode"] == "samples" else [order.index(key) % count + 1]
            who = f" (shard(s) {_names((i, count) for i in owners)} by the {first['mode']} split)"
            raise ShardError(f"missing shards: {name} lacks batch(es) {shown} of {n_batches}{who}; rerun them")
        loaded[key] = pieces
    # Re-open the audit the shards ran (same raw settings) to summarize. Paths (the data)
    # resolve from the user's config when given, else from the folder the shards ran in.
    first_path = shards / _manifest_name(ShardSpec(1, count))
    user = config
    raw_source = first.get("config_path") if user is None else (str(user.source) if user.source else None)
    try:
        config = parse_config(first["config"], Path(raw_source) if raw_source else None)
    except ConfigError as exc:
        raise ShardError(f"{first_path}: field 'config': {first_line(exc)}") from None
    if config.settings_hash() != first["config_hash"]:
        raise ShardError(f"the shards' settings do not parse back to their hash {first['config_hash']} "
                         "(a different equiaudit version?): rerun the shards with this one")
    if user is not None and _model_section(first["config"]) != _model_section(user.raw):
        shown = json.dumps(_model_section(first["config"]), sort_keys=True, default=str)[:120]
        raise ShardError(f"{first_path}: field 'config.model' ({shown}) differs from the model section of your config "
                         f"{user.source or ''}: merge builds only the model your own config names; rerun the shards with it")
    cwd = first.get("cwd") if user is None else None
    with contextlib.chdir(cwd) if cwd and Path(cwd).is_dir() else contextlib.nullcontext():
        audit = open_audit(config, device=device, model=_NoModel())
    if audit.plan.n_batches(len(audit.prepared)) != n_batches:
        raise ShardError(f"the data now gives {len(audit.prepared)} samples, the shards had {first['n_samples']}: "
                         "the data file changed since the shards ran; rerun them")
    results = []
    # Twirling comes from the statistics; everything else --dynamics computes needs the weights.
    options = audit.plan.dynamics
    dynamics = options is not None and bool(options.gradients or options.hessian or options.landscape or options.track_params)
    if dynamics:
        if user is None:
            raise ShardError("--dynamics at merge loads each checkpoint into the model, and merge never builds a model "
                             f"that a file inside OUT names: pass your own config, `equiaudit merge {out} --config CFG`")
        # The user's factory, resolved from the user's config's folder (outside the chdir above).
        model = build_model(user.model.factory, user.model.kwargs, user.source.parent if user.source else None)
        audit.model = model.to(device=audit.plan.device, dtype=audit.plan.model_dtype)
    if dynamics and events.on_warning:
        events.on_warning(f"--dynamics: merge loads each of the {len(order)} checkpoint(s) and computes its gradient "
                          "split, curvature and landscape here (the shards carry statistics, not gradients)")
    with Runner(audit, folder, force=True, events=events) as runner:
        runner.metadata_extra["shards"] = {"count": count, "mode": first["mode"], "reason": first.get("reason"),
                                           "files": sum(len(p) for p in loaded.values())}
        for key in order:
            item = seen[key]
            ema = item.get("ema_path")
            ref = CheckpointRef(Path(item["path"]), item["name"], item["run"], item["step"], item.get("step_source"),
                                ema_path=Path(ema) if ema else None)
            shares = [CheckpointShare(meta["identity"], tuple(meta["batches"]), stats, meta["status"], meta["message"],
                                      float(meta["seconds"])) for meta, stats in loaded[key]]
            # The REE comes from the shards' statistics; --dynamics (gradients, curvature,
            # landscape) needs the weights, so this process loads them and computes it.
            model_loaded = dynamics and all(share.ok for share in shares) and _weights_here(audit, ref, item, events)
            result = finish_checkpoint(audit, shares, ref=ref, on_error=events.on_error, model_loaded=model_loaded)
            epoch = next((meta["epoch"] for meta, _ in loaded[key] if meta.get("epoch") is not None), None)
            result = result.with_identity(epoch=epoch)
            found = Stamp(item["size"], item["mtime_ns"]) if item.get("size") is not None else None
            cache_key = runner.cache.key(ref, found) if runner.cache is not None and found is not None else None
            result = runner.complete(ref, found, cache_key, result)
            runner.record([result], [ref])
            results.append(result)
            if events.on_result:
                events.on_result(result)
    return audit, results, merge_rows([], [row for r in results for row in r.rows()])

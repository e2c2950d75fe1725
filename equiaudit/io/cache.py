"""Incremental auditing: which checkpoints are already audited, and which have settled.

Results live in ``OUT/cache.sqlite`` (SQLite, from the standard library), one row per
audited checkpoint, keyed by a hash of the checkpoint's identity (absolute path, size,
modification time) and of everything else that changes the numbers (config hash, which
covers seed, K, samples and group; the data and model-factory files; the tool version).

Why SQLite rather than one file per result: each checkpoint's result is one committed
transaction, so an audit killed at any instant (Ctrl-C, SIGKILL, power loss) leaves the
store as it was before or after that checkpoint, never torn; readers running beside a
``--watch`` audit see a consistent state; and it is a single file with no dependency.
``summary.csv`` stays the user-facing record and is rebuilt from these rows, so the two
cannot drift apart; so is ``breakdown.csv``, from each checkpoint's breakdown rows, stored
with the options that shaped them (a run asking for a split they lack re-audits the
checkpoint). Only successful results are stored: a failure is retried next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equiaudit import __version__
from equiaudit.io.checkpoints import CheckpointRef
from equiaudit.io.config import AuditConfig, resolve_path
from equiaudit.schema import BREAKDOWN, DYNAMICS, SUMMARY, TWIRL

__all__ = ["CACHE_FILE", "Stamp", "stamp", "settings_identity", "result_key", "CachedResult", "ResultCache", "SettleTracker"]

CACHE_FILE = "cache.sqlite"
SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,      -- hash of checkpoint identity + settings
    path TEXT NOT NULL,
    run TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    version TEXT NOT NULL,
    rows TEXT NOT NULL,        -- JSON list of summary.csv rows
    breakdown TEXT NOT NULL,   -- JSON list of breakdown.csv rows
    breakdown_options TEXT NOT NULL,  -- identity of the options those rows were made with
    extra TEXT NOT NULL,       -- JSON {"dynamics": [...], "twirl": [...], "landscape": {...}} (--dynamics)
    created REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Stamp:
    """Size and newest modification time of a checkpoint file, or of all files of a folder."""

    size: int
    mtime_ns: int

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9


def stamp(path: Path) -> Stamp | None:
    """The :class:`Stamp` of ``path``; ``None`` when it does not exist (any more)."""
    try:
        if not path.is_dir():
            st = path.stat()
            return Stamp(st.st_size, st.st_mtime_ns)
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return Stamp(sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))
    except OSError:  # removed while we looked
        return None


def _data_identity(path: Path | None, file_identity) -> Any:
    """The data file's identity; for a folder or list file of structures (PDB/mmCIF), every
    file's: editing one in place changes neither the folder's nor the list's own stamp."""
    if path is None:
        return None
    from equiaudit.io.data_structures import LIST_SUFFIXES, STRUCTURE_SUFFIXES, structure_files

    if (path.is_dir() and any(p.name.lower().removesuffix(".gz").endswith(STRUCTURE_SUFFIXES) for p in path.iterdir())) \
            or (path.is_file() and path.suffix.lower() in LIST_SUFFIXES):
        try:
            return [file_identity(path), *(file_identity(p) for p in structure_files(path))]
        except Exception:  # an unreadable list: the audit reports it; the stamp stays what it can be
            return file_identity(path)
    return file_identity(path)


def settings_identity(config: AuditConfig) -> dict[str, Any]:
    """Everything besides the checkpoint that changes the numbers."""

    def file_identity(path: Path) -> list | str:
        found = stamp(path)
        return [str(path.resolve()), found.size, found.mtime_ns] if found else str(path)

    if config.model.family is not None:  # the architecture comes from the checkpoint the family builds from
        source = config.model.source
        factory = [f"family:{config.model.family}", file_identity(source) if source is not None else None]
    else:
        target = config.model.factory.rpartition(":")[0]
        factory = (
            file_identity(resolve_path(target, config.source.parent if config.source else None))
            if target.endswith(".py") else target
        )
    return {
        "config_hash": config.settings_hash(),
        "version": __version__,
        "data": _data_identity(config.data.path, file_identity),
        "factory": factory,
    }


def result_key(ref: CheckpointRef, found: Stamp | None, settings: Mapping[str, Any]) -> str:
    """The identity of one checkpoint's result, 64 hex digits: the checkpoint's path, size and
    mtime (and its EMA sibling's, whose change must re-audit it) and ``settings``
    (:func:`settings_identity`: the config hash, version, data and factory files). The cache
    and the array-job shards' part files are keyed by it."""
    sibling = stamp(ref.ema_path) if ref.ema_path is not None else None
    identity = [_path_text(ref.path), found.size if found else None, found.mtime_ns if found else None, settings,
                [_path_text(ref.ema_path), sibling.size, sibling.mtime_ns] if sibling is not None else None]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _jsonable(value):
    """Tensors (landscape grids) as nested lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _path_text(path: Path) -> str:
    """An absolute path as text SQLite and JSON can store: bytes that are not UTF-8 (a file
    name with ``0xff``) are written as ``\\xff`` escapes (``backslashreplace``)."""
    return os.fsencode(os.path.abspath(path)).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class CachedResult:
    """One audited checkpoint as stored: its summary rows, breakdown rows, the identity of the
    options that shaped the extra rows, and the extra rows (dynamics, twirl, landscape)."""

    rows: list[dict]
    breakdown: list[dict]
    breakdown_options: str
    extra: dict = field(default_factory=dict)

    def tables(self) -> dict[str, list[dict]]:
        """The stored rows of every per-checkpoint output table, by file name, as
        :meth:`equiaudit.result.AuditResult.tables` gives them."""
        return {SUMMARY: self.rows, BREAKDOWN: self.breakdown,
                DYNAMICS: self.extra.get("dynamics", []), TWIRL: self.extra.get("twirl", [])}


class ResultCache:
    """Audited rows keyed by checkpoint identity and settings (see the module docstring)."""

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = settings
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError:
            # Not a database (e.g. overwritten by hand): it only saves time, so start afresh.
            self.path.unlink(missing_ok=True)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    db.execute("DROP TABLE IF EXISTS results")
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute(_SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def key(self, ref: CheckpointRef, found: Stamp) -> str:
        """The result's key (:func:`result_key` under this cache's settings)."""
        return result_key(ref, found, self.settings)

    def get(self, key: str) -> CachedResult | None:
        """What is stored under ``key``, exactly as it was written, or ``None`` (also for an
        entry that cannot be decoded: it is audited again and overwritten)."""
        hit = self._db.execute("SELECT rows, breakdown, breakdown_options, extra FROM results WHERE key = ?", (key,)).fetchone()
        if not hit:
            return None
        try:
            return CachedResult(json.loads(hit[0]), json.loads(hit[1]), hit[2], json.loads(hit[3]))
        except ValueError:
            return None

    def _all(self, column: str) -> list[dict]:
        out = []
        for (text,) in self._db.execute(f"SELECT {column} FROM results ORDER BY created"):
            try:
                out.extend(json.loads(text))
            except ValueError:
                continue
        return out

    def all_rows(self) -> list[dict]:
        """The summary rows of every stored result, whatever its settings (to rebuild a damaged summary.csv)."""
        return self._all("rows")

    def all_breakdown(self) -> list[dict]:
        """The breakdown rows of every stored result (to rebuild a damaged breakdown.csv)."""
        return self._all("breakdown")

    def all_extra(self, name: str) -> list[dict]:
        """The ``name`` rows (``dynamics``, ``twirl``) of every stored result."""
        out = []
        for (text,) in self._db.execute("SELECT extra FROM results ORDER BY created"):
            try:
                out.extend(json.loads(text).get(name, []))
            except (ValueError, AttributeError):
                continue
        return out

    def put(self, key: str, ref: CheckpointRef, rows: Sequence[dict], breakdown: Sequence[dict] = (),
            breakdown_options: str = "", extra: dict | None = None) -> None:
        """Store one checkpoint's rows (breakdown and extra rows) in a single transaction."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, _path_text(ref.path), ref.run, ref.name, self.settings["config_hash"], __version__,
                 json.dumps(list(rows)), json.dumps(list(breakdown)), breakdown_options,
                 json.dumps(extra or {}, default=_jsonable), time.time()),
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SettleTracker:
    """Tells when a checkpoint that training may still be writing is ready to audit.

    Ready once its stamp is unchanged between two polls, or its newest file is at least
    ``settle_s`` old. A failure counts only when it repeats on an unchanged stamp: a file
    caught half-written fails once, then is retried rather than reported as corrupt.
    """

    def __init__(self, settle_s: float):
        self.settle_s = settle_s
        self._seen: dict[Path, Stamp] = {}
        self._failed: dict[Path, Stamp] = {}

    def ready(self, path: Path, found: Stamp, now: float | None = None) -> bool:
        previous, self._seen[path] = self._seen.get(path), found
        now = time.time() if now is None else now
        return previous == found or now - found.mtime >= self.settle_s

    def confirm_failure(self, path: Path, found: Stamp) -> bool:
        """Record a failure; ``True`` when the same, unchanged checkpoint failed before."""
        previous, self._failed[path] = self._failed.get(path), found
        return previous == found

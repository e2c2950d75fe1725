"""The output folder ``OUT``: the one place its file names are spelled, and how it is written.

::

    OUT/summary.csv       one row per checkpoint × head (the record; rebuilt from the cache if damaged)
    OUT/breakdown.csv     one row per checkpoint × split × head × bin
    OUT/run.json          the settings, environment and every checkpoint seen
    OUT/trajectory.png    REE and losses against step
    OUT/dynamics.csv      gradient split and curvature per checkpoint × head (dynamics.png)
    OUT/correlations.csv  correlations of log REE with the dynamics' figures, per run × head
    OUT/twirl.csv         test-time twirling: loss of the k-rotation average per checkpoint × head × k (twirl.png)
    OUT/landscape/        <checkpoint>.csv (L_sym and EE on an α, β grid) and <checkpoint>.json
    OUT/report.html       one self-contained page of everything above
    OUT/cache.sqlite      audited results, keyed by checkpoint identity and settings
    OUT/shards/           array-job shards (``--shard I/N``), merged by ``equiaudit merge``
    OUT/.equiaudit.lock   held while the CSVs and run.json are merged and rewritten

Several audits may write into one ``OUT`` at once (two halves of a run, a ``--watch``
beside a manual audit): every update takes the folder's lock, re-reads what is there,
merges its own rows in and rewrites the files atomically, so no row is ever lost. A
``summary.csv`` or ``breakdown.csv`` that cannot be parsed (a torn row, garbage) is
reported and rebuilt from ``cache.sqlite`` rather than blocking every later run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from equiaudit import schema
from equiaudit.io.atomic import atomic_write_text
from equiaudit.io.tables import FORMULA_STARTS, DamagedCSV, csv_cell, csv_text, merge_rows, read_csv, write_rows

__all__ = ["OutputFolder", "DamagedCSV", "read_csv", "csv_cell", "csv_text", "FORMULA_STARTS"]


class OutputFolder:
    """``OUT`` of an audit, compare or merge (see the module docstring)."""

    SUMMARY = schema.SUMMARY
    BREAKDOWN = schema.BREAKDOWN
    RUN = "run.json"
    PLOT = "trajectory.png"
    CACHE = "cache.sqlite"
    SHARDS = "shards"
    LOCK = ".equiaudit.lock"
    COMPARE = "compare.csv"
    COMPARE_PLOT = "compare.png"
    EFFICIENCY = "efficiency.csv"
    EFFICIENCY_PLOT = "efficiency.png"
    AUDITS = "audits"
    DYNAMICS = schema.DYNAMICS
    TWIRL = schema.TWIRL
    LANDSCAPE = "landscape"
    REPORT = "report.html"
    CORRELATIONS = "correlations.csv"
    DYNAMICS_PLOT = "dynamics.png"
    TWIRL_PLOT = "twirl.png"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def breakdown(self) -> Path:
        return self.path / self.BREAKDOWN

    @property
    def run_json(self) -> Path:
        return self.path / self.RUN

    @property
    def plot(self) -> Path:
        return self.path / self.PLOT

    @property
    def cache_path(self) -> Path:
        return self.path / self.CACHE

    @property
    def shards(self) -> Path:
        return self.path / self.SHARDS

    def create(self) -> OutputFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (``flock`` on :attr:`LOCK`; other audits of this folder wait)."""
        self.create()
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _rows(path: Path, required, rebuild, warn) -> list[dict]:
        try:
            return read_csv(path, required)
        except DamagedCSV as exc:
            if warn is not None:
                warn(f"{exc.path} is damaged ({exc.reason}): rebuilt from {exc.path.parent / OutputFolder.CACHE}")
            return rebuild() if rebuild is not None else []

    def table_spec(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
        """``(column order, required columns, total first)`` of one of the folder's row files
        (:data:`equiaudit.schema.TABLES`)."""
        spec = schema.TABLES[name]
        return spec.columns, spec.required, spec.total_first

    def rows(self, name: str, rebuild: Callable[[], list[dict]] | None = None, warn: Callable[[str], None] | None = None) -> list[dict]:
        """Rows of one of the folder's CSVs (:meth:`table_spec`); a damaged one is reported
        through ``warn`` and replaced by ``rebuild()`` (the cache's rows), or by nothing."""
        return self._rows(self.path / name, self.table_spec(name)[1], rebuild, warn)

    def record(self, tables: Mapping[str, Sequence[dict]], *, metadata: dict[str, Any] | None = None,
               landscapes: Sequence[tuple[dict, dict[str, Any]]] = (),
               rebuild: Callable[[str], list[dict]] | None = None,
               warn: Callable[[str], None] | None = None) -> None:
        """Merge rows into the folder's CSVs — ``tables`` maps a file name (:attr:`SUMMARY`,
        :attr:`BREAKDOWN`, :attr:`DYNAMICS`, :attr:`TWIRL`) to new rows; rows of the same run,
        checkpoint and settings are replaced, others kept — write each landscape
        (``(identity row, grid)``) under :attr:`LANDSCAPE`, and ``metadata`` as ``run.json``,
        all under the folder's lock. ``rebuild(name)`` gives the rows to start from when a
        CSV is damaged (the cache's). Files whose table is empty and absent are not created."""
        with self.locked():
            for name, new in tables.items():
                path = self.path / name
                if not new and not path.is_file() and name != self.SUMMARY:
                    continue
                columns, _, total_first = self.table_spec(name)
                existing = self.rows(name, (lambda n=name: rebuild(n)) if rebuild else None, warn)
                write_rows(path, merge_rows(existing, new, total_first=total_first), columns)
            for identity, grid in landscapes:
                self.write_landscape(identity, grid)
            if metadata is not None:
                self.write_run_json(metadata)

    def landscape_stem(self, run: str, checkpoint: str) -> Path:
        """``OUT/landscape/<run>--<checkpoint>`` (path separators and control characters replaced)."""
        safe = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in f"{run}--{checkpoint}")
        return self.path / self.LANDSCAPE / safe

    def write_landscape(self, identity: dict, grid: dict[str, Any]) -> Path:
        """``<stem>.csv`` (``alpha, beta, loss_sym, equiv_error``, the N×N grid in long format)
        and ``<stem>.json`` (checkpoint, step, directions, eigenvalues, span, R² of each surface)."""
        stem = self.landscape_stem(identity["run"], identity["checkpoint"])
        alpha, beta = grid["alpha"].tolist(), grid["beta"].tolist()
        sym, equiv = grid["loss_sym"].tolist(), grid["equiv_error"].tolist()
        rows = [{"alpha": a, "beta": b, "loss_sym": sym[i][j], "equiv_error": equiv[i][j]}
                for i, a in enumerate(alpha) for j, b in enumerate(beta)]
        write_rows(stem.parent / f"{stem.name}.csv", rows, schema.LANDSCAPE_COLUMNS)
        meta = {"run": identity["run"], "checkpoint": identity["checkpoint"], "step": identity.get("step"),
                "config_hash": identity.get("config_hash"),
                **{k: v for k, v in grid.items() if k not in ("alpha", "beta", "loss_sym", "equiv_error")}}
        # Strict JSON: a figure not measured (NaN, ∞) is null, not the non-standard NaN token.
        meta = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in meta.items()}
        atomic_write_text(stem.parent / f"{stem.name}.json", json.dumps(meta, indent=2, default=str) + "\n")
        return stem

    def read_run_json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.run_json.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def write_run_json(self, metadata: dict[str, Any]) -> None:
        atomic_write_text(self.run_json, json.dumps(metadata, indent=2, default=str) + "\n")

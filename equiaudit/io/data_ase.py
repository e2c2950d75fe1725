"""ASE databases: ``.db`` (SQLite, ``equiaudit[ase]``) and ``.aselmdb`` (LMDB, through
``ase-db-backends``, ``equiaudit[aselmdb]``), read with ``ase.db.connect``.

One row is one sample; rows come in row-id order, and a sample's index in the file is
its position in that order (row id − 1 when no row was deleted). Fields (units as
stored, ASE's are Å and eV):

* ``pos``, ``z`` <- the row's positions and numbers (padded to the largest row, with
  ``mask``);
* ``energy``, ``forces`` and the other calculator results ASE stores (``free_energy``,
  ``stress``, ``dipole``, ``charges``, ``magmom``, ``magmoms``) when every row read has
  them;
* every numeric ``key_value_pairs`` entry that every row read has, under its key;
* ``data`` entries named by ``keys`` (per atom: padded ``(N, A, ...)``; otherwise one
  shape for every row: stacked ``(N, ...)``).

Cheap selection: with ``samples`` smaller than the database only those rows are read
(by id, in the order of a full read); the count and the id order come from the
database's index, not from reading rows.

Safety (verified in ASE's source, ``ase/db/sqlite.py``, ``ase/db/core.py``,
``ase/io/jsonio.py`` and ``ase_db_backends/aselmdb.py``): rows, ``key_value_pairs``,
``data`` and metadata are JSON (text, or ASE's binary form: JSON plus raw array bytes
read with ``np.frombuffer``), decoded by ``json`` with an object hook that builds only
ndarrays, complex numbers, datetimes and a fixed list of ASE objects; nothing in
``ase.db`` unpickles. This reader never touches ``row.constraints`` (ASE builds
constraint objects from them) nor the database's metadata, and opens SQLite files only
after checking they already are ASE databases (ASE would otherwise add its tables to
the file); ``.aselmdb`` files are opened read-only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError, first_line
from equiaudit.io.data_common import Table, missing_extra, numeric, pad, stack_or_pad

__all__ = ["read_ase_db"]

# Calculator results ASE stores in a row besides energy and forces (ase.db.row.atoms2dict).
_CALC_RESULTS = ("free_energy", "stress", "dipole", "charges", "magmom", "magmoms")


def read_ase_db(path: Path, keys: dict[str, str], pick: Callable) -> Table:
    """An ASE database -> :class:`Table` of the rows ``pick`` keeps (see the module docstring)."""
    lmdb = path.suffix.lower() == ".aselmdb"
    try:
        import ase.db  # noqa: F401
    except ImportError:
        raise missing_extra("ASE databases", "ase", "ASE") from None
    if not lmdb:
        _check_ase_sqlite(path)
    db = _connect(path, lmdb)
    try:
        n = db.count()
        if n == 0:
            raise DataError(f"{path} holds no rows")
        index = pick(n)
        if index is None:
            # sort by id: SQLite's primary key order (free); LMDB iterates its ids in order.
            rows = list(db.select() if lmdb else db.select(sort="id"))
            file_index = torch.arange(len(rows))
        else:
            ids = _row_ids(db, n, lmdb)
            rows = [db.get(id=ids[i]) for i in index.tolist()]
            file_index = index
        ids_read = [int(row.id) for row in rows]
        table = _table(rows, keys, path)
    except DataError:
        raise
    except Exception as e:  # sqlite3 / lmdb / JSON errors, a newer db format, ...
        raise DataError(f"cannot read {path} with ASE: {first_line(e)}") from None
    finally:
        if lmdb:
            db.close()
    table.index = file_index
    id_of = dict(zip(file_index.tolist(), ids_read))
    table.where = lambda i: f"row id {id_of[i]}" if i in id_of else ""
    return table


def _check_ase_sqlite(path: Path) -> None:
    """Refuse a file that is not already an ASE SQLite database, read-only (ASE's connect
    would create its tables in an empty or foreign SQLite file)."""
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = con.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name='systems'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise DataError(f"cannot read {path} as an ASE database: {first_line(e)}") from None
    if not found:
        raise DataError(f"cannot read {path} as an ASE database: it has no 'systems' table (not written by ase.db)")


def _connect(path: Path, lmdb: bool):
    import ase.db

    try:
        if not lmdb:
            return ase.db.connect(str(path), type="db", use_lock_file=False, create_indices=False)
        try:
            import ase_db_backends.aselmdb  # noqa: F401
        except ImportError:
            raise missing_extra(".aselmdb databases", "aselmdb", "ase-db-backends") from None
        try:
            return ase.db.connect(str(path), type="aselmdb", readonly=True, use_lock_file=False)
        except ValueError as e:  # an ASE before the aselmdb type: use the backend directly
            if "Unknown database type" not in str(e):
                raise
            from ase_db_backends.aselmdb import LMDBDatabase

            return LMDBDatabase(str(path), readonly=True, use_lock_file=False)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path} as an ASE database: {first_line(e)}") from None


def _row_ids(db, n: int, lmdb: bool) -> list[int]:
    """Row ids in the order of a full read, without reading the rows' contents."""
    if lmdb:
        return list(db.ids)  # the backend keeps them (1..nextid minus deleted ones)
    last = next(db.select(sort="-id", limit=1, include_data=False, columns=["id"])).id
    if last == n:  # ids are unique positive integers: exactly 1..n
        return list(range(1, n + 1))
    return [row.id for row in db.select(sort="id", include_data=False, columns=["id"])]


def _table(rows: list, keys: dict[str, str], path: Path) -> Table:
    counts = [len(row.numbers) for row in rows]
    a_max = max(counts)
    arrays: dict[str, Any] = {
        "pos": pad([np.asarray(row.positions, dtype=np.float64).reshape(-1, 3) for row in rows], a_max),
        "z": pad([np.asarray(row.numbers, dtype=np.int64) for row in rows], a_max),
        "mask": np.arange(a_max)[None, :] < np.asarray(counts)[:, None],
    }
    for name in ("energy", "forces", *_CALC_RESULTS):
        values = [row.get(name) for row in rows]
        if all(v is not None for v in values):
            stacked = stack_or_pad(values, counts)
            if stacked is not None:
                arrays[name] = stacked

    # Numeric key-value pairs every row has (strings are metadata).
    kvp_names = set(rows[0].key_value_pairs)
    for row in rows[1:]:
        kvp_names &= set(row.key_value_pairs)
    for name in sorted(kvp_names):
        values = [numeric(row.key_value_pairs[name]) for row in rows]
        if name not in arrays and all(v is not None and v.ndim == 0 for v in values):
            arrays[name] = np.stack(values)

    names = set(arrays) - {"mask"}
    wanted = [key for key in dict.fromkeys(keys.values()) if key not in arrays]
    if wanted:  # row.data is decoded only when keys asks for something in it
        data = [row.data for row in rows]
        names |= set(data[0])
        for key in wanted:
            if not all(key in d for d in data):
                if any(key in d for d in data):
                    first = next(row.id for row, d in zip(rows, data) if key not in d)
                    raise DataError(f"{path}: data entry '{key}' is missing from row id {first}; every row needs it")
                continue  # selection reports the missing key with the keys there are
            stacked = stack_or_pad([d[key] for d in data], counts)
            if stacked is None:
                raise DataError(
                    f"{path}: data entry '{key}' is not numeric with one shape per row or one row per atom"
                )
            arrays[key] = stacked
    return Table(arrays, structured=True, names=sorted(names))

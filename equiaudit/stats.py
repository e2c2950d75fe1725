"""Per-sample statistics of an audit: what batches produce and every summary is made of. Pure.

An audit's figures (REE and its interval, floors, the local metric, every breakdown) are
reductions of small per-sample values. They are collected here, batch by batch, in
:class:`SampleStats`: a few :class:`Table` s whose rows are samples (or atoms, channels)
tagged with the sample's ``id``. Because nothing else is kept, statistics made in any
number of pieces — batches of a validation loader, ranks of a ``torch.distributed`` job,
shards of an array job — combine by concatenation (:meth:`SampleStats.merge`), and
:meth:`SampleStats.finalized` puts them in id order, so the reductions see exactly the
numbers one process would have seen.

Every row also carries an ``origin``, unique over the pieces (``piece << 40 | row``):
when the same sample id was evaluated twice (a ``DistributedSampler`` pads its ranks with
repeated samples), the first evaluation is kept, in every table alike.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

__all__ = ["Table", "SampleStats", "ORIGIN_SHIFT", "with_total"]

ORIGIN_SHIFT = 40  # rows per piece: up to 2⁴⁰


class Table:
    """Columns of tensors with a common leading axis, appended batch by batch (on the CPU)."""

    def __init__(self, parts: Mapping[str, list[torch.Tensor]] | None = None):
        self._parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, values in (parts or {}).items():
            self._parts[name].extend(values)

    def add(self, **columns: torch.Tensor) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of one batch must have the same length, got {sorted(lengths)}")
        for name, value in columns.items():
            self._parts[name].append(value.detach().cpu())

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def __len__(self) -> int:
        parts = self._parts.get("id")
        return sum(len(p) for p in parts) if parts else 0

    def names(self) -> list[str]:
        return list(self._parts)

    def column(self, name: str) -> torch.Tensor:
        return torch.cat(self._parts[name]) if self._parts[name] else torch.empty(0)

    def columns(self) -> dict[str, torch.Tensor]:
        return {name: self.column(name) for name in self._parts}

    @classmethod
    def concat(cls, tables: Iterable[Table]) -> Table:
        out = cls()
        for table in tables:
            for name, values in table._parts.items():
                out._parts[name].extend(values)
        return out

    def select(self, keep: torch.Tensor, order: torch.Tensor | None = None, names: Iterable[str] | None = None) -> Table:
        """A one-part table of the rows where ``keep`` (bool, rows) holds, in ``order`` if given;
        only the columns ``names`` when given."""
        columns = self.columns() if names is None else {name: self.column(name) for name in names if name in self}
        index = keep.nonzero().squeeze(1) if order is None else order[keep[order]]
        return Table({name: [value[index]] for name, value in columns.items()})


class SampleStats:
    """The per-sample statistics of (part of) an audit.

    Tables (every row has ``id`` (sample id, int64) and ``origin`` (int64)):

    * ``samples``: one row per sample — per head ``loss_aug/<h>``, ``equiv_error/<h>``
      ``(N,)``, ``loss_rot/<h>``, ``error_rot/<h>`` ``(N, K)``; ``interp/<h>``,
      ``local_error/<h>``, ``local_scale/<h>`` when measured; breakdown fields
      (``angle`` ``(N, K)``, ``n_atoms``, ``field/<name>``, ``index`` in the data file);
      ``cluster`` (the sample a row comes from) when the task evaluates a sample on several
      rows (``flow.t``): the summary then resamples clusters, not rows;
    * ``floor``: one row per sample of the float floor's subset — ``floor/<h>`` ``(M,)``;
    * ``units``: one row per (sample, atom or channel) of each head with an axis 1 —
      ``head`` (index into :attr:`heads`), ``unit``, ``label``, ``loss``, ``error``, ``weight``.
    """

    TABLES = ("samples", "floor", "units")

    def __init__(self, heads: Iterable[str], piece: int = 0):
        self.heads = list(heads)
        self.piece = piece
        self.tables = {name: Table() for name in self.TABLES}
        self._rows = 0

    def origins(self, n: int) -> torch.Tensor:
        """Fresh origins for ``n`` new sample rows of this piece."""
        start = self._rows
        self._rows += n
        return (self.piece << ORIGIN_SHIFT) + torch.arange(start, start + n, dtype=torch.int64)

    @property
    def n_samples(self) -> int:
        return len(self.tables["samples"])

    @classmethod
    def merge(cls, pieces: Iterable[SampleStats]) -> SampleStats:
        pieces = list(pieces)
        out = cls(pieces[0].heads if pieces else [])
        for name in cls.TABLES:
            out.tables[name] = Table.concat(p.tables[name] for p in pieces)
        out._rows = sum(p._rows for p in pieces)
        return out

    def finalized(self, columns: Iterable[str] | None = None) -> SampleStats:
        """Tables in sample-id order (units: by id, then head, then unit), each sample id
        once (its first evaluation, by origin). ``columns``: only those columns of
        ``samples`` and no other table, the cheap view ``--target-ci`` checks after every batch."""
        samples = self.tables["samples"]
        out = SampleStats(self.heads, self.piece)
        if len(samples) == 0:
            return out
        ids, origins = samples.column("id"), samples.column("origin")
        order = torch.from_numpy(_lexsort(ids, origins))
        first = torch.ones(len(ids), dtype=torch.bool)
        sorted_ids = ids[order]
        first[order[1:]] = sorted_ids[1:] != sorted_ids[:-1]
        kept = origins[first]
        out.tables["samples"] = samples.select(first, order, names=None if columns is None else ["id", "origin", *columns])
        if columns is not None:
            out._rows = self._rows
            return out
        for name in ("floor", "units"):
            table = self.tables[name]
            if len(table) == 0:
                continue
            keep = torch.isin(table.column("origin"), kept)
            keys = [table.column("id")] + ([table.column("head"), table.column("unit")] if name == "units" else [])
            out.tables[name] = table.select(keep, torch.from_numpy(_lexsort(*keys)))
        out._rows = self._rows
        return out


    def select_ids(self, keep) -> SampleStats:
        """The rows (of every table) whose sample id satisfies ``keep(ids) -> bool mask``:
        e.g. the first n samples, for ``--target-ci``'s prefix of a gathered round."""
        out = SampleStats(self.heads, self.piece)
        for name, table in self.tables.items():
            if len(table):
                out.tables[name] = table.select(keep(table.column("id")))
        out._rows = self._rows
        return out

    # ------------------------------------------------------------------ plain state (shard files)

    def to_state(self) -> dict:
        """A plain form for ``torch.save``, loadable with ``torch.load(..., weights_only=True)``:
        ``{"heads": [str], "piece": int, "rows": int, "tables": {table: {column: tensor}}}``
        (each column one tensor, its parts concatenated)."""
        return {
            "heads": list(self.heads),
            "piece": int(self.piece),
            "rows": int(self._rows),
            "tables": {name: {col: value.contiguous() for col, value in table.columns().items()}
                       for name, table in self.tables.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping) -> SampleStats:
        """The inverse of :meth:`to_state` (checks the layout: a shard file is untrusted input)."""
        if not isinstance(state, Mapping) or not {"heads", "piece", "rows", "tables"} <= set(state):
            raise ValueError("not a SampleStats state: expected keys heads, piece, rows, tables")
        heads, tables = state["heads"], state["tables"]
        if not (isinstance(heads, list) and all(isinstance(h, str) for h in heads)) or not isinstance(tables, Mapping):
            raise ValueError("not a SampleStats state: heads must be a list of names, tables a mapping")
        out = cls(heads, int(state["piece"]))
        out._rows = int(state["rows"])
        for name, columns in tables.items():
            if name not in cls.TABLES or not isinstance(columns, Mapping):
                raise ValueError(f"not a SampleStats state: unknown table {name!r}")
            if not all(isinstance(v, torch.Tensor) for v in columns.values()):
                raise ValueError(f"not a SampleStats state: table {name!r} has a column that is not a tensor")
            lengths = {len(v) for v in columns.values()}
            if len(lengths) > 1 or (columns and "id" not in columns):
                raise ValueError(f"not a SampleStats state: table {name!r} has ragged columns or no id")
            out.tables[name] = Table({col: [value] for col, value in columns.items()})
        return out


def with_total(per_head: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """``{"total": Σ_h w_h · per_head[h], **per_head}``: the weighted total of the loss
    ``ℓ = Σ_h w_h ℓ_h`` (not divided by Σ w), for any per-sample (or per-rotation) value."""
    return {"total": sum(weights[h] * per_head[h] for h in weights), **per_head}


def _lexsort(*keys: torch.Tensor):
    """Stable row order sorting by the first key, then the next ones (numpy's lexsort takes the last key first)."""
    import numpy as np

    return np.lexsort([k.numpy() for k in reversed(keys)]).astype(np.int64)

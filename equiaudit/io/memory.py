"""Data the caller holds in memory: a mapping of arrays, or batches of them (Python API).

Everything goes through :func:`equiaudit.io.data.canonical_dataset`, the same rules as a
file (``data.keys``, layouts, masks, padding, dtypes, checks), so an in-memory audit and a
file audit of the same arrays see the same dataset. Nothing here reads a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from equiaudit.errors import DataError
from equiaudit.io.data import canonical_dataset

__all__ = ["concatenate", "as_dataset"]

# Canonical per-atom fields (axis 1 is the atom axis); other fields with that axis are found by shape.
_PER_ATOM = ("pos", "z", "forces", "mask")


def concatenate(batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Canonical batches → one dataset; per-atom fields are zero-padded along axis 1 to the
    largest batch's atom count (the mask marks the padding)."""
    batches = list(batches)
    if not batches:
        raise DataError("data: the iterable of batches is empty")
    names = list(batches[0])
    for number, batch in enumerate(batches[1:], start=2):
        if list(batch) != names:
            raise DataError(f"data: batch {number} has fields {sorted(batch)}, the first batch {sorted(names)}")
    atoms = [b["mask"].shape[1] if "mask" in b else None for b in batches]
    width = max((a for a in atoms if a is not None), default=None)
    out = {}
    for name in names:
        parts = []
        for batch, count in zip(batches, atoms):
            value = batch[name]
            per_atom = count is not None and value.dim() >= 2 and value.shape[1] == count and (name in _PER_ATOM or len(set(atoms)) > 1)
            if per_atom and count < width:
                pad = torch.zeros(value.shape[0], width - count, *value.shape[2:], dtype=value.dtype)
                value = torch.cat([value, pad], 1)
            parts.append(value)
        try:
            out[name] = torch.cat(parts)
        except RuntimeError as exc:
            raise DataError(f"data: field {name!r} has different shapes across batches ({exc})") from None
    return out


def as_dataset(data: Any, keys: Mapping[str, str] | None) -> dict[str, torch.Tensor]:
    """A mapping (field → ``(N, ...)``) or an iterable of such batches → the canonical dataset."""
    if isinstance(data, Mapping):
        return canonical_dataset(data, keys, origin="data")
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(f"data must be a mapping of arrays, a data file path or an iterable of batches; got {type(data).__name__}")
    batches = []
    for number, batch in enumerate(data, start=1):
        if not isinstance(batch, Mapping):
            raise DataError(f"data: batch {number} is a {type(batch).__name__}, not a mapping of arrays")
        batches.append(canonical_dataset(batch, keys, origin=f"data batch {number}"))
    return concatenate(batches)

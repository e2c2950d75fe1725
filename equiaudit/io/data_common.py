"""Shared pieces of the dataset readers (``data.py`` and the optional-library readers).

A reader turns one file into a :class:`Table`: arrays keyed by name with a leading
sample axis, plus what the selection step needs to know about them. Readers never
build tensors or masks themselves beyond what their format dictates; the canonical
rules (keys, mask, padding, dtypes, value checks) live in :mod:`equiaudit.io.data`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError

__all__ = ["Table", "NotNumeric", "STRUCTURED_FIELDS", "pad", "stack_or_pad", "numeric", "missing_extra"]

#: The fields a structured reader (ASE db, HDF5 in the SPICE layout, PyG) provides under
#: canonical names; with no ``keys`` only these are loaded.
STRUCTURED_FIELDS = ("pos", "z", "energy", "forces", "mask")


@dataclass
class Table:
    """What a reader found in one file.

    Attributes:
        arrays: key -> array (numpy or torch) with a leading sample axis, or a
            :class:`NotNumeric` placeholder (metadata: skipped, or refused when mapped).
        index: file indices of the rows in ``arrays`` when the reader already took the
            subset (ASE databases, HDF5 and PyG read only the rows asked for); ``None``
            when ``arrays`` holds every sample and the subset is taken afterwards.
        structured: the format has its own layout (ASE db, SPICE HDF5, PyG): canonical
            fields arrive under canonical names and, with no ``keys``, only those are
            loaded (no layout detection, no pass-through of everything else).
        names: every key the file offers (for "has no key" messages); default: ``arrays``.
        sources: canonical key -> where it came from in the file (e.g. ``{"forces":
            "-dft_total_gradient"}``), for error messages.
        where: file index -> where that sample is in the file (e.g. ``"row id 18"``),
            added to error messages that name a sample.
    """

    arrays: dict[str, Any]
    index: torch.Tensor | None = None
    structured: bool = False
    names: Sequence[str] | None = None
    sources: dict[str, str] = field(default_factory=dict)
    where: Callable[[int], str] | None = None


class NotNumeric:
    """Placeholder for an entry that is not a numeric array (strings, objects, ...):
    skipped as metadata, refused with this description when ``keys`` maps it."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return self.what


def missing_extra(what: str, extra: str, package: str) -> DataError:
    """The one-line error for an optional dependency that is not installed."""
    return DataError(f"reading {what} needs {package}: pip install 'equiaudit[{extra}]'")


def numeric(value: Any) -> np.ndarray | None:
    """``value`` as a numeric (bool/int/float) numpy array, or None when it is not one."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_complex():
            return None
        return value.numpy()
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return np.asarray(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    return None


def pad(per_sample: Sequence[np.ndarray], a_max: int) -> np.ndarray:
    """``[(A_i, ...)]`` -> ``(N, a_max, ...)`` zero-padded (numpy arrays, one common dtype)."""
    first = per_sample[0]
    out = np.zeros((len(per_sample), a_max, *first.shape[1:]), dtype=np.result_type(*per_sample))
    for i, v in enumerate(per_sample):  # reader-side assembly, once per file
        out[i, : len(v)] = v
    return out


def stack_or_pad(values: Sequence[Any], counts: Sequence[int]) -> np.ndarray | None:
    """Per-sample values -> one array with a leading sample axis, or None when they have
    no common form (or are not numeric).

    Equal shapes are stacked (``(N, ...)``, e.g. a per-molecule dipole ``(3,)``); values
    whose first axis is the sample's atom count and whose other axes agree are per-atom
    and are zero-padded to ``(N, max(counts), ...)``.
    """
    arrays = [numeric(v) for v in values]
    if not arrays or any(a is None for a in arrays):
        return None
    shapes = {a.shape for a in arrays}
    if len(shapes) == 1:
        return np.stack(arrays)
    per_atom = all(a.ndim >= 1 and a.shape[0] == c for a, c in zip(arrays, counts))
    if per_atom and len({a.shape[1:] for a in arrays}) == 1:
        return pad(arrays, max(counts))
    return None

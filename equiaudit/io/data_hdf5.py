"""HDF5 files (``.h5``/``.hdf5``/``.hdf``, ``equiaudit[hdf5]``), read with ``h5py``.

Two layouts, told apart by the file's top level:

* **SPICE** (openmm/spice-dataset: one group per molecule, every top-level item a
  group). Each group holds ``atomic_numbers (A,)`` and ``conformations (C, A, 3)``;
  every conformation is one sample, molecules in the file's group order (h5py's
  iteration order: by name unless the file tracks creation order), then conformations
  in order; a sample's index in the file counts across molecules. Fields:

  - ``pos`` <- ``conformations``, ``z`` <- ``atomic_numbers`` (padded to the largest
    molecule, with ``mask``);
  - ``energy`` <- ``dft_total_energy`` (C,), ``forces`` <- ``−dft_total_gradient``
    (C, A, 3), when every molecule read has them;
  - any other per-conformation dataset that ``keys`` names, under its own name and as
    stored (e.g. ``{energy: formation_energy}``, ``{charges: mbis_charges}``; a gradient
    named this way is not negated): ``(C,)`` -> ``(N,)``, ``(C, A, ...)`` -> padded
    ``(N, A, ...)``, ``(C, ...)`` of one shape -> ``(N, ...)``.

  String datasets (``subset``, ``smiles``) are metadata and ignored. **Units stay as
  stored**: SPICE stores bohr (positions), hartree (energies) and hartree/bohr
  (gradients); nothing is converted, so a model trained in Å / eV needs converted data.
  Only the conformations kept by ``samples`` are read.

* **flat** (every top-level item a dataset): each dataset is an array ``(N, ...)`` (or
  ``(A,)`` atom types shared by all samples), read like the arrays of an ``.npz``,
  including the MD17 layouts; string datasets are metadata.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError, first_line
from equiaudit.io.data_common import NotNumeric, Table, missing_extra

__all__ = ["read_hdf5"]

_ENERGY = "dft_total_energy"
_GRADIENT = "dft_total_gradient"
_SPICE_NEEDS = "every molecule group needs atomic_numbers (atoms,) and conformations (conformations, atoms, 3)"


def read_hdf5(path: Path, keys: dict[str, str], pick: Callable) -> Table:
    try:
        import h5py
    except ImportError:
        raise missing_extra("HDF5 files", "hdf5", "h5py") from None
    try:
        handle = h5py.File(path, "r")
    except Exception as e:  # OSError: not an HDF5 file, truncated, ...
        raise DataError(f"cannot read {path} as HDF5: {first_line(e)}") from None
    try:
        with handle:
            items = list(handle.items())
            groups = [name for name, item in items if isinstance(item, h5py.Group)]
            datasets = [name for name, item in items if isinstance(item, h5py.Dataset)]
            if not items:
                raise DataError(f"{path} holds no datasets")
            if groups and datasets:
                raise DataError(
                    f"{path} mixes groups ({groups[0]}, ...) and datasets ({datasets[0]}, ...) at its top level; "
                    "expected one group per molecule (SPICE layout) or only datasets (a flat file)"
                )
            if datasets:
                return Table({name: _read_flat(handle[name]) for name in datasets})
            return _read_spice(handle, groups, keys, pick, path)
    except DataError:
        raise
    except Exception as e:  # h5py errors while reading a damaged file
        raise DataError(f"cannot read {path} as HDF5: {first_line(e)}") from None


def _read_flat(dataset) -> Any:
    if dataset.dtype.kind not in "biuf":
        return NotNumeric(f"HDF5 dtype {dataset.dtype}")
    return dataset[()]


class _Molecule:
    def __init__(self, name: str, group, path: Path):
        self.name = name
        self.group = group
        for key in ("atomic_numbers", "conformations"):
            if key not in group or not hasattr(group[key], "shape"):
                raise DataError(f"{path}: molecule group '{name}' has no '{key}' dataset; {_SPICE_NEEDS}")
        shape = group["conformations"].shape
        numbers = group["atomic_numbers"].shape
        if len(shape) != 3 or shape[2] != 3 or numbers != (shape[1],):
            raise DataError(
                f"{path}: molecule group '{name}' has conformations {shape} and atomic_numbers {numbers}; {_SPICE_NEEDS}"
            )
        self.n_conf, self.n_atoms = int(shape[0]), int(shape[1])

    def per_conformation(self, key: str, local: np.ndarray | None, path: Path) -> np.ndarray | None:
        """Dataset ``key`` for the kept conformations, or None when the group lacks it."""
        if key not in self.group:
            return None
        ds = self.group[key]
        if not hasattr(ds, "shape") or ds.dtype.kind not in "biuf":
            raise DataError(f"{path}: '{key}' in molecule group '{self.name}' is not a numeric dataset")
        if len(ds.shape) == 0 or ds.shape[0] != self.n_conf:
            raise DataError(
                f"{path}: '{key}' in molecule group '{self.name}' has shape {ds.shape}, "
                f"not one entry per conformation ({self.n_conf})"
            )
        return ds[()] if local is None else ds[local]  # h5py: increasing indices, read only those


def _read_spice(handle, groups: list[str], keys: dict[str, str], pick: Callable, path: Path) -> Table:
    molecules = [_Molecule(name, handle[name], path) for name in groups]
    starts = np.cumsum([0] + [m.n_conf for m in molecules])
    n = int(starts[-1])
    if n == 0:
        raise DataError(f"{path} holds no conformations")
    index = pick(n)
    file_index = torch.arange(n) if index is None else index
    flat = file_index.numpy()
    which = np.searchsorted(starts, flat, side="right") - 1  # molecule of each kept sample
    kept = np.unique(which)

    # Per kept molecule: its rows in the output and its local conformation indices.
    parts = []
    for m in kept.tolist():
        rows = np.nonzero(which == m)[0]
        local = flat[rows] - starts[m]
        whole = len(local) == molecules[m].n_conf
        parts.append((molecules[m], rows, None if whole else local))
    counts = np.zeros(len(flat), dtype=np.int64)
    for mol, rows, _ in parts:
        counts[rows] = mol.n_atoms
    a_max = int(counts.max())

    def gather(key: str, transform=None) -> np.ndarray | None:
        """Dataset ``key`` of every kept molecule -> (N, ...) array (per atom: padded)."""
        blocks = []
        for mol, rows, local in parts:
            block = mol.per_conformation(key, local, path)
            if block is None:
                return None
            blocks.append((mol, rows, block))
        return _assemble(key, blocks, len(flat), a_max, path, transform)

    arrays: dict[str, Any] = {"mask": np.arange(a_max)[None, :] < counts[:, None]}
    arrays["pos"] = gather("conformations")
    z = np.zeros((len(flat), a_max), dtype=np.int64)
    for mol, rows, _ in parts:
        z[rows, : mol.n_atoms] = mol.group["atomic_numbers"][()]
    arrays["z"] = z
    sources = {"pos": "conformations", "z": "atomic_numbers"}
    energy = gather(_ENERGY)
    if energy is not None:
        arrays["energy"], sources["energy"] = energy, _ENERGY
    forces = gather(_GRADIENT, transform=np.negative)
    if forces is not None:
        arrays["forces"], sources["forces"] = forces, f"-{_GRADIENT}"

    for key in dict.fromkeys(keys.values()):
        if key in arrays:
            continue
        value = gather(key)
        if value is None:
            if any(key in mol.group for mol, _, _ in parts):
                first = next(mol.name for mol, _, _ in parts if key not in mol.group)
                raise DataError(f"{path}: molecule group '{first}' has no '{key}'; every molecule read needs it")
            continue  # selection reports the missing key with the keys there are
        arrays[key] = value

    names = sorted(
        (set(arrays) - {"mask"})
        | {k for k, v in molecules[0].group.items() if hasattr(v, "dtype") and v.dtype.kind in "biuf"}
    )
    names_of = [m.name for m in molecules]

    def where(i: int) -> str:
        m = bisect.bisect_right(starts.tolist(), i) - 1
        return f"molecule '{names_of[m]}' conformation {i - int(starts[m])}" if 0 <= m < len(molecules) else ""

    return Table(arrays, index=file_index, structured=True, names=names, sources=sources, where=where)


def _assemble(key: str, blocks: list, n: int, a_max: int, path: Path, transform) -> np.ndarray:
    """[(molecule, output rows, (C_kept, ...) block)] -> (n, ...) or padded (n, a_max, ...)."""
    trailing = {block.shape[1:] for _, _, block in blocks}
    per_atom = all(block.ndim >= 2 and block.shape[1] == mol.n_atoms for mol, _, block in blocks) and (
        len({block.shape[2:] for _, _, block in blocks}) == 1
    )
    dtype = np.result_type(*(block.dtype for _, _, block in blocks))
    if per_atom:  # (C, A, ...): pad the atom axis (a no-op when every molecule has a_max atoms)
        out = np.zeros((n, a_max, *blocks[0][2].shape[2:]), dtype=dtype)
        for mol, rows, block in blocks:
            out[rows, : mol.n_atoms] = block
    elif len(trailing) == 1:
        out = np.zeros((n, *blocks[0][2].shape[1:]), dtype=dtype)
        for _, rows, block in blocks:
            out[rows] = block
    else:
        raise DataError(f"{path}: '{key}' has no common shape across molecules (neither per conformation nor per atom)")
    return transform(out) if transform is not None else out

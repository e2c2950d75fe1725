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

Files an HDF5 file pulls in: before any object is opened, every link of the file is walked
without being followed, and every other file it names — an ``ExternalLink``'s target, a
dataset's raw ``external=`` storage, a virtual dataset's sources — is checked, recursively
(a linked file's own links too) with :func:`_external_candidates`' idea of where HDF5 looks:

* it must be a **regular file**, whatever the options: a FIFO, socket or device (``/dev/zero``)
  would hang or never end the read; every place HDF5 may look for it is checked;
* it must lie in the **data file's folder** (or below), symlinks resolved: an external link or
  virtual source leaving it (``../outside/secret.h5``, an absolute path elsewhere) is refused
  unless ``data.follow_external: true``, and then each one followed is said
  (:class:`ExternalDataWarning`). Raw external storage is held to the same folder rule.
"""

from __future__ import annotations

import bisect
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError, DataWarning, first_line
from equiaudit.io.data_common import NotNumeric, Table, missing_extra
from equiaudit.io.safe_load import file_kind

__all__ = ["read_hdf5", "ExternalDataWarning", "check_references"]

_ENERGY = "dft_total_energy"
_GRADIENT = "dft_total_gradient"
_SPICE_NEEDS = "every molecule group needs atomic_numbers (atoms,) and conformations (conformations, atoms, 3)"


class ExternalDataWarning(DataWarning):
    """An HDF5 file read data from outside its folder (``data.follow_external: true``)."""


# How deep external links may chain (file → file → ...), and how many links one check may visit.
_MAX_DEPTH = 8
_MAX_LINKS = 10_000_000


def _external_candidates(name: str, folder: Path, kind: str) -> list[Path]:
    """Every path HDF5 may open for a file ``name`` referenced from a file in ``folder``, in
    its search order (H5Lcreate_external, H5Pset_virtual_prefix, H5Pset_efile_prefix):
    links and virtual sources try an absolute name as is, then (absolute or not) the name
    under the environment's prefix, the referring file's folder and the working directory;
    raw external storage tries its prefix, else the working directory."""
    env = {"link": "HDF5_EXT_PREFIX", "virtual": "HDF5_VDS_PREFIX", "raw": "HDF5_EXTFILE_PREFIX"}[kind]
    prefixes = [p.replace("${ORIGIN}", str(folder)) for p in os.environ.get(env, "").split(os.pathsep) if p]
    given = Path(name)
    if kind == "raw":
        if given.is_absolute():
            return [given]
        return [Path(p) / given for p in prefixes] + [Path.cwd() / given]
    relative = Path(given.name) if given.is_absolute() else given
    return ([given] if given.is_absolute() else []) + [Path(p) / relative for p in prefixes] + [folder / relative, Path.cwd() / relative]


def _inside(path: Path, folder: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep)


def _check_target(name: str, referrer: Path, home: Path, kind: str, what: str, follow_external: bool) -> Path | None:
    """The file HDF5 would open for ``name`` (None when none exists), after the two rules:
    regular file (every candidate), inside ``home`` (the one opened) unless ``follow_external``."""
    found = None
    for candidate in _external_candidates(name, referrer.parent, kind):
        try:
            mode = os.stat(candidate).st_mode  # follows symlinks: the file HDF5 would read
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            raise DataError(f"{referrer}: {what} names {candidate}, {file_kind(mode)}, not a regular file: not opened")
        found = found or candidate
    found = Path(os.path.normpath(found)) if found is not None else None
    if found is not None and not _inside(found, home):
        if not follow_external:
            raise DataError(f"{referrer}: {what} reads {found}, outside the data file's folder {home}: refused "
                            "(set data.follow_external: true to follow it)")
        warnings.warn(f"{referrer}: {what} reads {found}, outside the data file's folder (data.follow_external: true)",
                      ExternalDataWarning, stacklevel=2)
    return found


def _links(group, seen: set) -> Iterator[tuple[str, Any, Any]]:
    """(name, link, object or None) of every link under ``group``, depth first, never following
    an external link; hard-linked groups are entered once."""
    import h5py

    stack = [group]
    while stack:
        current = stack.pop()
        for name in current.keys():  # link names: nothing resolved
            link = current.get(name, getlink=True)
            full = f"{current.name.rstrip('/')}/{name}"
            if isinstance(link, h5py.ExternalLink):
                yield full, link, None
            elif isinstance(link, h5py.HardLink):
                item = current.get(name)
                if isinstance(item, h5py.Group):
                    if item.id not in seen:
                        seen.add(item.id)
                        stack.append(item)
                yield full, link, item
            # a soft link names a path in this file, whose every link is walked here


def check_references(handle, path: Path, *, follow_external: bool = False, home: Path | None = None, depth: int = 0,
                     visited: set | None = None) -> None:
    """Apply the two rules of the module docstring to every file ``handle`` (an open
    ``h5py.File`` at ``path``) pulls in, recursively; :class:`DataError` names the first
    breach. ``home``: the folder of the data file the user named."""
    import h5py

    home = path.parent if home is None else home
    visited = set() if visited is None else visited
    visited.add(os.path.realpath(path))
    count = 0
    for name, link, item in _links(handle, set()):
        count += 1
        if count > _MAX_LINKS:
            raise DataError(f"{path}: more than {_MAX_LINKS:,} links; refused")
        if isinstance(link, h5py.ExternalLink):
            target = _check_target(link.filename, path, home, "link", f"external link '{name}'", follow_external)
            if target is not None and os.path.realpath(target) not in visited:
                if depth >= _MAX_DEPTH:
                    raise DataError(f"{path}: external links chain deeper than {_MAX_DEPTH} files; refused")
                try:
                    inner = h5py.File(target, "r")
                except Exception as e:  # noqa: BLE001 - HDF5 names what is wrong
                    raise DataError(f"{path}: external link '{name}' leads to {target}, not readable as HDF5: {first_line(e)}") from None
                with inner:
                    check_references(inner, Path(target), follow_external=follow_external, home=home, depth=depth + 1,
                                     visited=visited)
            continue
        if not isinstance(item, h5py.Dataset):
            continue
        for file_name, _, _ in item.external or ():
            _check_target(os.fsdecode(file_name), path, home, "raw", f"dataset '{name}' (raw external storage)", follow_external)
        if item.is_virtual:
            for source in item.virtual_sources():
                if source.file_name == ".":
                    continue  # this same file
                target = _check_target(source.file_name, path, home, "virtual", f"virtual dataset '{name}'", follow_external)
                if target is not None and os.path.realpath(target) not in visited:
                    if depth >= _MAX_DEPTH:
                        raise DataError(f"{path}: virtual sources chain deeper than {_MAX_DEPTH} files; refused")
                    try:
                        inner = h5py.File(target, "r")
                    except Exception as e:  # noqa: BLE001
                        raise DataError(f"{path}: virtual dataset '{name}' reads {target}, not readable as HDF5: {first_line(e)}") from None
                    with inner:
                        check_references(inner, Path(target), follow_external=follow_external, home=home, depth=depth + 1,
                                         visited=visited)


def read_hdf5(path: Path, keys: dict[str, str], pick: Callable, *, follow_external: bool = False) -> Table:
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
            # Before any object is opened (items() follows external links): what else would be read.
            check_references(handle, Path(path), follow_external=follow_external)
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

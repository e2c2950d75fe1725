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

Files an HDF5 file pulls in — an ``ExternalLink``'s target, a dataset's raw ``external=``
storage, a virtual dataset's sources — are checked before HDF5 may open them (external links
up front, walked without being followed, a linked file's own links too; a dataset's storage
before the dataset is read), everywhere :func:`_external_candidates` says HDF5 looks:

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError, DataWarning, first_line
from equiaudit.io.data_common import NotNumeric, Table, missing_extra
from equiaudit.io.safe_load import file_kind

__all__ = ["read_hdf5", "ExternalDataWarning"]

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


class _Guard:
    """The two rules of the module docstring, for one data file the user named (its folder: ``home``).

    External links are checked up front (:meth:`links`: h5py follows them whenever a group is
    listed); a dataset's own storage — raw external files, virtual sources — is checked when
    the reader touches that dataset (:meth:`dataset`), before its shape or values are read:
    HDF5 opens those files only to read (a FIFO there blocks the read, not the open), and a
    SPICE file holds ~10⁶ datasets, most never read."""

    def __init__(self, home: Path, follow_external: bool):
        self.home, self.follow_external = home, follow_external
        self.visited: set[str] = set()  # files whose links were checked (real paths)

    def links(self, handle, path: Path, depth: int = 0) -> None:
        """Every external link of ``handle`` (an open ``h5py.File`` at ``path``), and of the
        files they lead to, recursively: ``H5Lvisit`` lists every link with its type and
        recurses through hard links only (an external link is listed, never followed)."""
        import h5py
        from h5py import h5l

        self.visited.add(os.path.realpath(path))
        found: list[tuple[str, str]] = []
        root = handle.id

        def on_link(name: bytes, info) -> None:
            if info.type == h5l.TYPE_EXTERNAL:
                found.append((os.fsdecode(name), os.fsdecode(root.links.get_val(name)[0])))
            if len(found) > _MAX_LINKS:
                return True  # stop: refused below

        root.links.visit(on_link, info=True)
        if len(found) > _MAX_LINKS:
            raise DataError(f"{path}: more than {_MAX_LINKS:,} external links; refused")
        for name, file_name in found:
            what = f"external link '/{name}'"
            target = _check_target(file_name, path, self.home, "link", what, self.follow_external)
            if target is None or os.path.realpath(target) in self.visited:
                continue
            with self._open(target, path, what, depth) as inner:
                self.links(inner, target, depth + 1)

    def dataset(self, dataset, depth: int = 0) -> None:
        """``dataset``'s raw external files and virtual sources, before it is read (recursively:
        a virtual source's file has its links checked and its source dataset's storage too)."""
        import h5py
        from h5py import h5d

        plist = dataset.id.get_create_plist()  # the one query for the ~all datasets that name no file
        virtual = plist.get_layout() == h5d.VIRTUAL
        if not virtual and plist.get_external_count() == 0:
            return
        path = Path(dataset.file.filename)
        for i in range(plist.get_external_count()):
            _check_target(os.fsdecode(plist.get_external(i)[0]), path, self.home, "raw",
                          f"dataset '{dataset.name}' (raw external storage)", self.follow_external)
        if not virtual:
            return
        for i in range(plist.get_virtual_count()):
            file_name, source = os.fsdecode(plist.get_virtual_filename(i)), plist.get_virtual_dsetname(i)
            if file_name == ".":
                inner_name = os.fsdecode(source)
                if depth >= _MAX_DEPTH:
                    raise DataError(f"{path}: virtual dataset '{dataset.name}' chains sources deeper than {_MAX_DEPTH}; refused")
                if inner_name in dataset.file:
                    self.dataset(dataset.file[inner_name], depth + 1)
                continue
            what = f"virtual dataset '{dataset.name}'"
            target = _check_target(file_name, path, self.home, "virtual", what, self.follow_external)
            if target is None:
                continue
            with self._open(target, path, what, depth) as inner:
                if os.path.realpath(target) not in self.visited:
                    self.links(inner, target, depth + 1)
                name = os.fsdecode(source)
                if name in inner and isinstance(inner[name], h5py.Dataset):
                    self.dataset(inner[name], depth + 1)

    @staticmethod
    def _open(target: Path, referrer: Path, what: str, depth: int):
        import h5py

        if depth >= _MAX_DEPTH:
            raise DataError(f"{referrer}: {what} chains files deeper than {_MAX_DEPTH}; refused")
        try:
            return h5py.File(target, "r")
        except Exception as e:  # noqa: BLE001 - HDF5 names what is wrong
            raise DataError(f"{referrer}: {what} leads to {target}, not readable as HDF5: {first_line(e)}") from None


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
            # Before any object is opened (items() follows external links): the files linked.
            guard = _Guard(Path(path).parent, follow_external)
            guard.links(handle, Path(path))
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
                return Table({name: _read_flat(handle[name], guard) for name in datasets})
            return _read_spice(handle, groups, keys, pick, path, guard)
    except DataError:
        raise
    except Exception as e:  # h5py errors while reading a damaged file
        raise DataError(f"cannot read {path} as HDF5: {first_line(e)}") from None


def _read_flat(dataset, guard: _Guard) -> Any:
    if dataset.dtype.kind not in "biuf":
        return NotNumeric(f"HDF5 dtype {dataset.dtype}")
    guard.dataset(dataset)
    return dataset[()]


class _Molecule:
    def __init__(self, name: str, group, path: Path, guard: _Guard):
        self.name = name
        self.group = group
        self.guard = guard
        for key in ("atomic_numbers", "conformations"):
            if key not in group or not hasattr(group[key], "shape"):
                raise DataError(f"{path}: molecule group '{name}' has no '{key}' dataset; {_SPICE_NEEDS}")
            guard.dataset(group[key])  # before its shape (an unlimited virtual dataset's opens its sources)
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
        self.guard.dataset(ds)
        if len(ds.shape) == 0 or ds.shape[0] != self.n_conf:
            raise DataError(
                f"{path}: '{key}' in molecule group '{self.name}' has shape {ds.shape}, "
                f"not one entry per conformation ({self.n_conf})"
            )
        return ds[()] if local is None else ds[local]  # h5py: increasing indices, read only those


def _read_spice(handle, groups: list[str], keys: dict[str, str], pick: Callable, path: Path, guard: _Guard) -> Table:
    molecules = [_Molecule(name, handle[name], path, guard) for name in groups]
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

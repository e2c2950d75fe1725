"""Read molecular datasets into memory, and write them (``save_npz``).

The in-memory dataset is a ``dict[str, torch.Tensor]`` whose tensors share a leading
sample axis ``N``: floats become float64, integers int64, bools stay bool. Canonical
fields:

* ``pos``    (N, A, 3) float64, positions; 0 at padded atoms
* ``z``      (N, A)    int64, atomic numbers; 0 at padded atoms
* ``energy`` (N,)      float64
* ``forces`` (N, A, 3) float64; 0 at padded atoms
* ``mask``   (N, A)    bool, True at valid atoms (added whenever ``pos`` or ``z`` is present)

Any other array passes through under its own (or mapped) name, e.g. voxel grids
``(N, C, D, H, W)``. Molecules of different sizes are padded to the largest one.
Units are never converted: values stay in the units the file stores them in.

Array formats: ``.npz`` (never unpickles), ``.safetensors``, ``.pt``/``.pth`` holding a
dict of tensors (``weights_only=True``: pickled code is refused, never run), a flat
HDF5 file of ``(N, ...)`` datasets (``h5py``, ``equiaudit[hdf5]``), ``.xyz``/``.extxyz``
and ASE's ``.traj`` trajectories (ASE, ``equiaudit[ase]``; ``.traj`` is ASE's binary ULM
format, which ASE reads without unpickling: an old pickle-based trajectory is refused by ASE
itself, nothing in it runs). Structured formats, each read with the
field's own library (see their modules for the rules):

* ASE databases ``.db`` (``equiaudit[ase]``) and ``.aselmdb`` (``equiaudit[aselmdb]``):
  one sample per row, :mod:`equiaudit.io.data_ase`;
* HDF5 in the SPICE layout (one group per molecule, ``equiaudit[hdf5]``): one sample
  per conformation, forces = −gradient, :mod:`equiaudit.io.data_hdf5`;
* PyTorch Geometric (``equiaudit[pyg]``): an ``InMemoryDataset`` folder or file, or a
  ``.pt`` list of ``Data``; one sample per graph, :mod:`equiaudit.io.data_pyg`.

Which arrays are loaded (``keys`` maps field name -> key in the file):

* ``keys`` empty: a revised-MD17 file (``nuclear_charges``, ``coords``, ``energies``,
  ``forces``) or an original-MD17 file (``z``, ``R``, ``E``, ``F``) is recognised and
  only its known fields are loaded, under canonical names (a file with three of a
  layout's four keys is taken for that layout, so a missing position or atom-type key
  is named); a structured format gives its canonical fields; any other file gives
  every numeric array under its own name (non-numeric or 0-d entries, i.e. metadata,
  are skipped).
* ``keys`` given: the mapped fields, plus the canonical fields the file provides on
  its own (through the layouts above or under the canonical name itself: ``pos``,
  ``z``, ``energy``, ``forces``, ``mask``, ``n_atoms``) unless ``keys`` already uses
  that file key. Nothing else.

Checks on the values of the samples kept (vectorised, on valid atoms only): every
float field must be finite and at most ``1e150`` in magnitude (a larger value's square
overflows float64, which made losses inf or REE meaningless); atomic numbers must not
be negative (0 marks padding). A failure names the field, the sample's index in the
file and the atom.

Every failure raises :class:`equiaudit.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError, first_line
from equiaudit.io.atomic import atomic_write
from equiaudit.io.config import MAX_ATOMS
from equiaudit.io.data_common import STRUCTURED_FIELDS, NotNumeric, Table, missing_extra, pad
from equiaudit.io.safe_load import DamagedFile, RefusedPickle, file_kind, load_weights_only

__all__ = ["load_dataset", "canonical_dataset", "select", "subset_index", "save_npz", "CANONICAL_FIELDS", "VALUE_LIMIT"]

CANONICAL_FIELDS = ("pos", "z", "energy", "forces", "mask", "n_atoms")

# Known file layouts: canonical field -> key in the file. A layout is recognised when
# its positions and atom types are both present (energies/forces are optional), or
# when three of its four keys are: then a missing position / atom-type key is named.
_LAYOUTS: dict[str, dict[str, str]] = {
    "revised MD17": {"pos": "coords", "z": "nuclear_charges", "energy": "energies", "forces": "forces"},
    "MD17": {"pos": "R", "z": "z", "energy": "E", "forces": "F"},
}
_ROLE = {"pos": "positions", "z": "atomic numbers"}

#: Largest magnitude a float may have: its square (losses) stays far from overflowing
#: float64 (max 1.8e308) even summed over 1e8 terms.
VALUE_LIMIT = 1e150

_SUFFIXES = (".npz, .safetensors, .pt/.pth, .xyz/.extxyz, .traj, .db, .aselmdb, .h5/.hdf5, .pdb/.cif (.gz) "
             "or a PyG dataset folder")


def load_dataset(
    path: str | Path,
    keys: Mapping[str, str] | None = None,
    *,
    samples: int | None = None,
    subset_seed: int | None = None,
    return_index: bool = False,
    follow_external: bool = False,
    max_atoms: int = MAX_ATOMS,
    structures: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Load a dataset file into a dict of tensors with a leading sample axis ``N``.

    Args:
        path: ``.npz``, ``.safetensors``, ``.pt``/``.pth``, ``.xyz``/``.extxyz``, ``.traj``, an ASE
            database (``.db``, ``.aselmdb``), an HDF5 file (``.h5``/``.hdf5``/``.hdf``) or a
            PyTorch Geometric dataset folder (``root`` with ``processed/*.pt``, or the
            ``processed`` folder itself).
        keys: field name -> key in the file, e.g. ``{"pos": "coords"}`` (see the
            module docstring for which other arrays come along).
        samples: keep this many samples: the first ones, or a seeded random subset
            (indices sorted) when ``subset_seed`` is given. More than the file holds
            means all of them (no error). ``None``: all. ASE databases, SPICE-layout
            HDF5 files and PyG datasets read only the samples kept.
        subset_seed: seed of the random subset; ``None`` takes the first samples.
        structures: options of PDB/mmCIF files (``atoms``, ``units``, ``chains``, ``frames``,
            ``max_residues``, ``strict``; :mod:`equiaudit.io.data_structures`).
        return_index: also return each kept sample's index in the file, int64 ``(N,)``
            (an ASE database's row order is by row id; HDF5: molecules in the file's
            group order, then conformations; PyG: the graph's index).
        follow_external: HDF5 only: follow external links and virtual-dataset sources
            that leave the data file's folder (said with a warning); by default they are
            refused. Every file an HDF5 file pulls in must be a regular file, always.
        max_atoms: ``.xyz``/``.extxyz``: a frame declaring more atoms is refused before
            parsing (its atom-count line is read, nothing else).

    Returns:
        ``{field: tensor}``. Atom types given once per molecule, ``(A,)``, are
        broadcast to ``(N, A)``. ``mask`` (N, A) comes from the file's ``mask``,
        else ``n_atoms`` (N,) for padded arrays, else ``z != 0``, else all True;
        ``pos``/``forces``/``z`` are zeroed where ``mask`` is False.
    """
    path = Path(path)
    keys = _check_keys(keys)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise DataError(f"samples must be a positive integer, got {samples!r}")
    if not path.exists():
        raise DataError(f"data file not found: {path}")

    def pick(n: int) -> torch.Tensor | None:
        return subset_index(n, samples, subset_seed)

    origin = str(path)
    table = _read(path, keys, pick, follow_external=follow_external, max_atoms=max_atoms, structures=structures or {})
    data, mapping = _select(table, keys, origin)
    data = _canonicalize(data, origin)
    if table.index is None:
        n = len(next(iter(data.values())))
        index = pick(n)
        data = _subset(data, index)
        file_index = torch.arange(n) if index is None else index
    else:
        file_index = table.index
    _check_values(data, file_index, origin, mapping, table, in_file=True)
    if return_index:
        return data, file_index
    return data


def canonical_dataset(raw: Mapping[str, Any], keys: Mapping[str, str] | None = None, *, origin: str = "data") -> dict[str, torch.Tensor]:
    """Arrays or tensors as a file would hold them (``{key: (N, ...)}``) → the canonical
    in-memory dataset, by the same rules as :func:`load_dataset` (``keys``, layouts, mask,
    padding, dtypes, value checks). ``origin`` names the data in error messages."""
    table = Table(dict(raw))
    data, mapping = _select(table, _check_keys(keys), origin)
    data = _canonicalize(data, origin)
    _check_values(data, torch.arange(len(next(iter(data.values())))), origin, mapping, table, in_file=False)
    return data


def subset_index(n: int, samples: int | None, seed: int | None) -> torch.Tensor | None:
    """Which of a file's ``n`` samples :func:`load_dataset` keeps (sorted), or None for all.

    The first ``samples``, or a seeded random subset when ``seed`` is given. Readers that
    read only the samples kept call this with the file's sample count, so the subset is
    the same as that of a full read.
    """
    if samples is None or samples >= n:
        return None
    if seed is None:
        return torch.arange(samples)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[:samples].sort().values


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Write ``arrays`` to an uncompressed ``.npz`` atomically (temp file + rename).

    Creates the parent directory. Tensors are moved to CPU; object arrays are refused
    because :func:`load_dataset` never unpickles.
    """
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.dtype.kind == "O":
            raise DataError(f"cannot save '{name}' to {path}: object arrays are not supported")
        out[name] = arr
    try:
        # A file object keeps np.savez from appending ".npz"; atomic: readers never see half a file.
        atomic_write(path, lambda handle: np.savez(handle, **out))
    except OSError as e:
        raise DataError(f"cannot write {path}: {first_line(e)}") from e


# --------------------------------------------------------------------------- reading

Pick = Callable[[int], "torch.Tensor | None"]


def _read(path: Path, keys: dict[str, str], pick: Pick, *, follow_external: bool = False,
          max_atoms: int = MAX_ATOMS, structures: Mapping[str, Any] | None = None) -> Table:
    """File -> :class:`Table`. Values that are not arrays are kept (as they are, or as
    :class:`NotNumeric`) so that selection can report them or skip them as metadata."""
    from equiaudit.io.data_structures import is_structure_path, read_structures

    if is_structure_path(path):  # PDB/mmCIF (also .gz), a folder or a list file of them
        return read_structures(path, structures or {}, pick)
    if path.is_dir():
        from equiaudit.io.data_pyg import read_pyg_folder

        return read_pyg_folder(path, keys, pick)
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):  # opening a FIFO would block (every reader, whatever the format)
        raise DataError(f"{path}: {file_kind(mode)}, not a regular file: not opened")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return Table(_read_npz(path))
    if suffix == ".safetensors":
        return Table(_read_safetensors(path))
    if suffix in (".pt", ".pth"):
        return _read_torch(path, keys, pick)
    if suffix in (".xyz", ".extxyz"):
        _check_atom_counts(path, max_atoms)
    if suffix in (".xyz", ".extxyz", ".traj"):
        return Table(_read_ase_frames(path))
    if suffix in (".db", ".aselmdb"):
        from equiaudit.io.data_ase import read_ase_db

        return read_ase_db(path, keys, pick)
    if suffix in (".h5", ".hdf5", ".hdf"):
        from equiaudit.io.data_hdf5 import read_hdf5

        return read_hdf5(path, keys, pick, follow_external=follow_external)
    raise DataError(f"unsupported data format '{suffix or path.name}' for {path}; use {_SUFFIXES}")


def _check_atom_counts(path: Path, max_atoms: int) -> None:
    """Refuse an ``.xyz``/``.extxyz`` frame that declares more than ``max_atoms`` atoms, before
    ASE parses anything: a reader trusting a count line of 999999999999 loops or allocates
    for ever. Reads the count lines only (a frame is its count line, a comment line and
    one line per atom); a line that is not a count ends the scan (ASE then says what is wrong)."""
    from itertools import islice

    with path.open("rb") as handle:
        frame = 0
        for line in handle:
            text = line.strip()
            if not text:
                return  # blank line: the end of the frames
            try:
                count = int(text)
            except ValueError:
                return
            if count > max_atoms:
                raise DataError(f"{path}: frame {frame} declares {count:,} atoms, over the limit of {max_atoms:,} atoms "
                                "per structure (data.max_atoms); refused before parsing")
            if count < 0:
                return
            if sum(1 for _ in islice(handle, count + 1)) < count + 1:
                return  # truncated: ASE names it
            frame += 1


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            out: dict[str, Any] = {}
            for key in npz.files:
                try:
                    out[key] = npz[key]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    # object array: skipped as metadata, refused if mapped
                    out[key] = NotNumeric("Python objects (not unpickled)")
            return out
    except Exception as e:  # BadZipFile, OSError, zlib.error, EOFError, ValueError, ...
        # np.load of a file that is neither zip nor .npy falls back to unpickling, which
        # allow_pickle=False refuses: for a user that means "not an .npz", and numpy's
        # advice to allow pickling must not be passed on.
        reason = "not an .npz archive" if "pickle" in str(e) else first_line(e)
        raise DataError(f"cannot read {path} as .npz: {reason}") from e


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as e:  # SafetensorError, OSError, ... all mean "cannot read"
        raise DataError(f"cannot read {path} as .safetensors: {first_line(e)}") from e


def _read_torch(path: Path, keys: dict[str, str], pick: Pick) -> Table:
    """A dict of tensors, or a PyTorch Geometric file (InMemoryDataset / list of Data),
    always weights-only. PyG's data classes are allowed only when reading PyG files."""
    try:
        obj = load_weights_only(path, "cpu")
    except RefusedPickle as e:
        if e.global_name.startswith("torch_geometric."):
            from equiaudit.io.data_pyg import read_pyg_file

            return read_pyg_file(path, keys, pick)
        raise DataError(
            f"{path} needs arbitrary pickled code ({e.global_name}) to load, refused for safety; save a plain dict of tensors"
        ) from None
    except (OSError, DamagedFile) as e:
        raise DataError(f"cannot read {path} as a torch file: {first_line(e)}") from None
    if isinstance(obj, Mapping):
        # Never str() an arbitrary key from a file (a shared tuple can stand for gigabytes).
        bad = next((k for k in obj if not isinstance(k, str)), None)
        if bad is not None:
            raise DataError(f"{path}: keys must be field names (strings); found a {type(bad).__name__} key")
        return Table(dict(obj))
    from equiaudit.io.data_pyg import looks_like_pyg, read_pyg_object

    if looks_like_pyg(obj):  # PyG already imported elsewhere: its classes were allowed
        return read_pyg_object(obj, path, keys, pick)
    raise DataError(
        f"{path} holds a {type(obj).__name__}; expected a dict of tensors, "
        "a PyTorch Geometric InMemoryDataset file or a list of PyG Data"
    )


def _read_ase_frames(path: Path) -> dict[str, Any]:
    """The frames of an ``.xyz``/``.extxyz``/``.traj`` file (``ase.io.read``) -> padded
    arrays: pos, z, mask, energy/forces (when every frame has them), plus numeric ``info``
    entries (per frame) and ``arrays`` entries (per atom, padded)."""
    try:
        import ase.io
    except ImportError:
        raise missing_extra(path.suffix.lstrip(".").lower(), "ase", "ASE") from None
    try:
        frames = ase.io.read(str(path), index=":")
    except Exception as e:
        raise DataError(f"cannot read {path} with ASE: {first_line(e)}") from e
    if not frames:
        raise DataError(f"{path} holds no structures")

    counts = [len(atoms) for atoms in frames]
    a_max = max(counts)
    out: dict[str, Any] = {
        "pos": pad([atoms.get_positions() for atoms in frames], a_max),
        "z": pad([atoms.get_atomic_numbers().astype(np.int64) for atoms in frames], a_max),
        "mask": np.arange(a_max)[None, :] < np.asarray(counts)[:, None],
    }

    energies = [_frame_energy(atoms) for atoms in frames]
    if all(e is not None for e in energies):
        out["energy"] = np.asarray(energies, dtype=np.float64)
    forces = [_frame_forces(atoms) for atoms in frames]
    if all(f is not None for f in forces):
        out["forces"] = pad([np.asarray(f) for f in forces], a_max)

    # Extra per-frame info entries (e.g. REF_energy) and per-atom arrays, present in every
    # frame with one numeric shape, so that `keys` can point at them.
    for key in frames[0].info:
        vals = [np.asarray(atoms.info.get(key)) for atoms in frames]
        if key not in out and all(v.dtype.kind in "biuf" and v.shape == vals[0].shape for v in vals):
            out[key] = np.stack(vals)
    for key in frames[0].arrays:
        if key in ("numbers", "positions") or key in out:
            continue
        vals = [atoms.arrays.get(key) for atoms in frames]
        if all(v is not None and v.dtype.kind in "biuf" and v.shape[1:] == vals[0].shape[1:] for v in vals):
            out[key] = pad(vals, a_max)
    return out


def _frame_energy(atoms) -> float | None:
    # ASE >= 3.23 moves `energy` from the comment line into a SinglePointCalculator.
    if atoms.calc is not None:
        try:
            return float(atoms.get_potential_energy())
        except Exception:
            pass
    value = atoms.info.get("energy")
    return None if value is None else float(value)


def _frame_forces(atoms) -> np.ndarray | None:
    if atoms.calc is not None:
        try:
            return atoms.get_forces()
        except Exception:
            pass
    return atoms.arrays.get("forces")


# ------------------------------------------------------------------------- selection


def _check_keys(keys: Mapping[str, str] | None) -> dict[str, str]:
    if not keys:
        return {}
    if not isinstance(keys, Mapping):
        raise DataError(f"data keys must map field names to file keys, got {type(keys).__name__}")
    for field, key in keys.items():
        if not isinstance(key, str) or not key:
            raise DataError(f"data key for field '{field}' must be a non-empty string, got {key!r}")
    return {str(field): key for field, key in keys.items()}


def _detect_layout(names: set[str], keys: dict[str, str], origin: str) -> dict[str, str] | None:
    """The known layout the file's keys match (canonical field -> key present), or None.

    A file holding three of a layout's four keys but not its positions or atom types
    (and ``keys`` does not supply them) is an error naming the missing key: otherwise it
    would load as a generic file and fail far downstream (a head "without its target").
    """
    for name, layout in _LAYOUTS.items():
        present = {field: key for field, key in layout.items() if key in names}
        if "pos" in present and "z" in present:
            return present
        if len(present) >= 3:
            missing = [field for field in ("pos", "z") if field not in present and field not in keys]
            if missing:
                field = missing[0]
                found = ", ".join(present[f] for f in layout if f in present)
                raise DataError(
                    f"{origin} looks like a {name} file ({found}) but has no '{layout[field]}' ({_ROLE[field]}); "
                    f"add it, or map '{field}' to another key with data.keys"
                )
            return present
    return None


def _select(table: Table, keys: dict[str, str], origin: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Apply the loading rule of the module docstring and convert to tensors.

    Returns the tensors and which file key each field came from.
    """
    raw = table.arrays
    names = set(raw)
    layout = None if table.structured else _detect_layout(names, keys, origin)

    if keys:
        for field, key in keys.items():
            if key not in names:
                source = f" (mapped from '{field}')" if field != key else ""
                available = ", ".join(sorted(set(table.names or ()) | names)) or "none"
                raise DataError(f"{origin} has no key '{key}'{source}; keys in the file: {available}")
        implied = dict(layout or {})
        for field in CANONICAL_FIELDS:
            if field in names and field not in implied:
                implied[field] = field
        used = set(keys.values())
        mapping = {f: k for f, k in implied.items() if k not in used and f not in keys}
        mapping.update(keys)
        required = set(keys)
    elif table.structured:
        mapping = {field: field for field in STRUCTURED_FIELDS if field in names}
        required = set(mapping)
    elif layout is not None:
        if "mask" in names:
            layout["mask"] = "mask"
        mapping, required = layout, set(layout)
    else:
        mapping, required = {name: name for name in raw}, set()

    out: dict[str, torch.Tensor] = {}
    for field, key in mapping.items():
        tensor = _to_tensor(raw[key])
        if tensor is None or tensor.ndim == 0:
            if field not in required:
                continue  # metadata (names, strings, scalars) in a file loaded whole
            what = "has no sample axis" if tensor is not None else f"is not a numeric array ({_describe(raw[key])})"
            source = f" (mapped from '{field}')" if field != key else ""
            raise DataError(f"{origin}: key '{key}'{source} {what}")
        out[field] = tensor
    if not out:
        raise DataError(f"{origin} holds no numeric arrays")
    return out, {field: key for field, key in mapping.items() if field in out}


def _to_tensor(value: Any) -> torch.Tensor | None:
    """Array -> tensor with float64 / int64 / bool; None when not numeric."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bool:
            return t
        if t.is_floating_point():
            return t.to(torch.float64)
        if t.is_complex():
            return None
        return t.to(torch.int64)
    if isinstance(value, np.ndarray):
        kind = value.dtype.kind
        if kind == "b":
            return torch.from_numpy(value.astype(bool))
        if kind == "f":
            return torch.from_numpy(value.astype(np.float64))
        if kind in "iu":
            return torch.from_numpy(value.astype(np.int64))
    return None


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"dtype {value.dtype}"
    if isinstance(value, NotNumeric):
        return repr(value)
    return type(value).__name__


# ------------------------------------------------------------------- canonical fields


def _canonicalize(data: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Squeeze energies, broadcast per-molecule atom types, build the mask, zero padding,
    and check shapes and that every field has the same number of samples."""
    pos = data.get("pos")
    if pos is not None and (pos.ndim != 3 or pos.shape[-1] != 3):
        raise DataError(f"{path}: 'pos' must have shape (samples, atoms, 3), got {tuple(pos.shape)}")
    if "energy" in data and data["energy"].ndim == 2 and data["energy"].shape[1] == 1:
        data["energy"] = data["energy"][:, 0]  # original MD17 stores E as (N, 1)
    if "energy" in data and data["energy"].ndim != 1:
        raise DataError(f"{path}: 'energy' must have shape (samples,), got {tuple(data['energy'].shape)}")

    for field in ("z", "mask"):
        # One atom list for every sample (MD17 style): (A,) -> (N, A).
        t = data.get(field)
        if t is not None and t.ndim == 1 and pos is not None and t.shape[0] == pos.shape[1]:
            data[field] = t.expand(pos.shape[0], -1).clone()

    _check_sample_counts(data, path)

    atoms_shape = tuple(pos.shape[:2]) if pos is not None else None
    if "z" in data:
        z = data["z"]
        if z.ndim != 2:
            raise DataError(f"{path}: 'z' must have shape (samples, atoms) or (atoms,), got {tuple(z.shape)}")
        if z.is_floating_point():  # atomic numbers saved as floats: fine if whole numbers
            if not torch.equal(z, z.round()):
                raise DataError(f"{path}: 'z' must hold whole atomic numbers, got non-integer values")
            data["z"] = z.to(torch.int64)
    atoms_shape = atoms_shape or (tuple(data["z"].shape) if "z" in data else None)
    if atoms_shape is None:
        return data  # no atoms (e.g. voxel grids only): nothing to mask
    for field in ("z", "mask"):
        if field in data and tuple(data[field].shape) != atoms_shape:
            raise DataError(
                f"{path}: '{field}' has shape {tuple(data[field].shape)}, expected {atoms_shape} to match the atoms"
            )

    if "mask" in data:
        mask = data["mask"] if data["mask"].dtype == torch.bool else data["mask"] != 0
    elif "n_atoms" in data and data["n_atoms"].ndim == 1:
        mask = torch.arange(atoms_shape[1]) < data["n_atoms"][:, None]  # padded "object" style
    elif "z" in data:
        # Atomic number 0 marks padding; all True when none. A negative one is not
        # padding: it stays valid here and the value check refuses it.
        mask = data["z"] != 0
    else:
        mask = torch.ones(atoms_shape, dtype=torch.bool)
    data["mask"] = mask

    if "forces" in data and pos is not None and data["forces"].shape != pos.shape:
        raise DataError(f"{path}: 'forces' has shape {tuple(data['forces'].shape)}, expected {tuple(pos.shape)} like 'pos'")
    # Padding carries no information; zeros keep it out of centroids, losses and
    # per-element breakdowns even where the mask came from the file.
    for field in ("pos", "forces"):
        if field in data:
            data[field] = data[field].masked_fill(~mask[..., None], 0.0)
    if "z" in data:
        data["z"] = data["z"].masked_fill(~mask, 0)
    return data


def _check_sample_counts(data: dict[str, torch.Tensor], path: str) -> None:
    counts = {name: t.shape[0] for name, t in data.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise DataError(
            f"{path}: fields disagree on the number of samples ({listing}); select fields with data.keys"
        )
    if next(iter(counts.values())) == 0:
        raise DataError(f"{path} holds no samples")


def _subset(data: dict[str, torch.Tensor], index: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if index is None:
        return data
    return {name: t[index] for name, t in data.items()}  # indexing copies


def select(data: dict[str, torch.Tensor], samples: int | None, subset_seed: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The samples :func:`load_dataset` would keep of an in-memory dataset, and their indices ``(N,)``."""
    n = len(next(iter(data.values())))
    index = subset_index(n, samples, subset_seed)
    return _subset(data, index), torch.arange(n) if index is None else index


# ---------------------------------------------------------------------- value checks


def _check_values(
    data: dict[str, torch.Tensor],
    file_index: torch.Tensor,
    origin: str,
    mapping: dict[str, str],
    table: Table,
    *,
    in_file: bool,
) -> None:
    """Refuse values no audit can use, before any model sees them (vectorised; valid
    atoms only): non-finite or huge floats (``|x| > VALUE_LIMIT``: squares overflow, so
    a loss is inf and REE empty or a false 0 %; NaN positions made every checkpoint fail
    as if the model returned NaN) and negative atomic numbers (silently padding before).

    The message names the field (and its key in the file), the first bad sample's index
    in the file (``file_index``) and the atom.
    """
    mask = data.get("mask")

    def fail(field: str, bad: torch.Tensor, tensor: torch.Tensor, rule: str, per_atom: bool, offset: int = 0) -> None:
        per_sample = bad.reshape(bad.shape[0], -1).any(dim=1)
        if not bool(per_sample.any()):
            return
        i = int(per_sample.nonzero()[0, 0])
        flat = int(bad[i].reshape(-1).nonzero()[0, 0])
        value = tensor[i].reshape(-1)[flat].item()
        sample = int(file_index[offset + i])
        where = ""
        if in_file:
            detail = table.where(sample) if table.where is not None else ""
            where = f" (its index in the file{'; ' + detail if detail else ''})"
        atom = ""
        if per_atom:
            atom = f", atom {flat // max(1, int(np.prod(tensor.shape[2:])))}"
        key = mapping.get(field, field)
        source = table.sources.get(key, key)
        named = f"'{field}'" + (f" (from '{source}')" if source != field else "")
        shown = "NaN" if value != value else (f"{value:g}" if isinstance(value, float) else str(value))
        hint = "" if field in CANONICAL_FIELDS else "; if it is not needed, leave it out with data.keys"
        raise DataError(f"{origin}: {named} is {shown} at sample {sample}{where}{atom}; {rule}{hint}")

    if "z" in data and mask is not None and not data["z"].is_floating_point():
        fail("z", (data["z"] < 0) & mask, data["z"], "atomic numbers must be positive (0 marks padding)", True)
    rule = f"values must be finite and at most {VALUE_LIMIT:g} in magnitude (squares overflow float64)"
    for field, t in data.items():
        if not t.is_floating_point() or t.ndim == 0 or t.shape[0] == 0:
            continue
        per_atom = mask is not None and t.ndim >= 2 and tuple(t.shape[:2]) == tuple(mask.shape)
        # Blocks of whole samples bound the temporaries for large arrays (voxel grids).
        rows = max(1, _CHECK_BLOCK // max(1, t[0].numel()))
        for start in range(0, t.shape[0], rows):
            block = t[start : start + rows]
            bad = ~(block.abs() <= VALUE_LIMIT)  # NaN compares False: caught with inf and huge values
            if per_atom:  # padded atoms do not count
                bad &= mask[start : start + rows].reshape(*block.shape[:2], *([1] * (t.ndim - 2)))
            fail(field, bad, block, rule, per_atom, offset=start)


# Elements per block of the value checks (2**24 float64 = 128 MiB of input per block).
_CHECK_BLOCK = 1 << 24

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
``(N, C, D, H, W)``.

Formats: ``.npz`` (never unpickles), ``.safetensors``, ``.pt``/``.pth`` holding a
dict of tensors (``weights_only=True``: pickled code is refused, never run) and
``.xyz``/``.extxyz`` through the optional ASE dependency.

Which arrays are loaded (``keys`` maps field name -> key in the file):

* ``keys`` empty: a revised-MD17 file (``nuclear_charges``, ``coords``, ``energies``,
  ``forces``) or an original-MD17 file (``z``, ``R``, ``E``, ``F``) is recognised and
  only its known fields are loaded, under canonical names; any other file gives every
  numeric array under its own name (non-numeric or 0-d entries, i.e. metadata, are
  skipped).
* ``keys`` given: the mapped fields, plus the canonical fields the file provides on
  its own (through the MD17 layouts above or under the canonical name itself:
  ``pos``, ``z``, ``energy``, ``forces``, ``mask``, ``n_atoms``) unless ``keys``
  already uses that file key. Nothing else.

Every failure raises :class:`equiaudit.errors.DataError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError, first_line
from equiaudit.io.atomic import atomic_write
from equiaudit.io.safe_load import DamagedFile, RefusedPickle, load_weights_only

__all__ = ["load_dataset", "canonical_dataset", "save_npz", "CANONICAL_FIELDS"]

CANONICAL_FIELDS = ("pos", "z", "energy", "forces", "mask", "n_atoms")

# Known file layouts: canonical field -> key in the file. A layout is recognised when
# its positions and atom types are both present; energies/forces are optional.
_LAYOUTS: dict[str, dict[str, str]] = {
    "revised MD17": {"pos": "coords", "z": "nuclear_charges", "energy": "energies", "forces": "forces"},
    "MD17": {"pos": "R", "z": "z", "energy": "E", "forces": "F"},
}

_ASE_MISSING = "reading extxyz needs ASE: pip install 'equiaudit[ase]'"


def load_dataset(
    path: str | Path,
    keys: Mapping[str, str] | None = None,
    *,
    samples: int | None = None,
    subset_seed: int | None = None,
    return_index: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Load a dataset file into a dict of tensors with a leading sample axis ``N``.

    Args:
        path: ``.npz``, ``.safetensors``, ``.pt``/``.pth`` or ``.xyz``/``.extxyz`` file.
        keys: field name -> key in the file, e.g. ``{"pos": "coords"}`` (see the
            module docstring for which other arrays come along).
        samples: keep this many samples: the first ones, or a seeded random subset
            (indices sorted) when ``subset_seed`` is given. More than the file holds
            means all of them (no error). ``None``: all.
        subset_seed: seed of the random subset; ``None`` takes the first samples.
        return_index: also return each kept sample's index in the file, int64 ``(N,)``.

    Returns:
        ``{field: tensor}``. Atom types given once per molecule, ``(A,)``, are
        broadcast to ``(N, A)``. ``mask`` (N, A) comes from the file's ``mask``,
        else ``n_atoms`` (N,) for padded arrays, else ``z > 0``, else all True;
        ``pos``/``forces``/``z`` are zeroed where ``mask`` is False.
    """
    path = Path(path)
    keys = _check_keys(keys)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise DataError(f"samples must be a positive integer, got {samples!r}")
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, expected a file: {path}")

    data = canonical_dataset(_read(path), keys, origin=str(path))
    n = len(next(iter(data.values())))
    index = _subset_index(n, samples, subset_seed)
    data = _subset(data, index)
    if return_index:
        return data, torch.arange(n) if index is None else index
    return data


def canonical_dataset(raw: Mapping[str, Any], keys: Mapping[str, str] | None = None, *, origin: str = "data") -> dict[str, torch.Tensor]:
    """Arrays or tensors as a file would hold them (``{key: (N, ...)}``) → the canonical
    in-memory dataset, by the same rules as :func:`load_dataset` (``keys``, layouts, mask,
    padding, dtypes, checks). ``origin`` names the data in error messages."""
    return _canonicalize(_select(dict(raw), _check_keys(keys), origin), origin)


def _subset_index(n: int, samples: int | None, seed: int | None) -> torch.Tensor | None:
    """Which of a file's ``n`` samples :func:`load_dataset` keeps (sorted), or None for all.

    The first ``samples``, or a seeded random subset when ``seed`` is given.
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


def _read(path: Path) -> dict[str, Any]:
    """File -> {key: np.ndarray | torch.Tensor | other}; values that are not arrays are kept
    as they are so that selection can report them (or skip them as metadata)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in (".pt", ".pth"):
        return _read_torch(path)
    if suffix in (".xyz", ".extxyz"):
        return _read_extxyz(path)
    raise DataError(
        f"unsupported data format '{suffix or path.name}' for {path}; use .npz, .safetensors, .pt/.pth or .extxyz"
    )


class _Refused:
    """Placeholder for an .npz entry that would need unpickling (never loaded)."""

    def __repr__(self) -> str:
        return "Python objects (not unpickled)"


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
                    out[key] = _Refused()  # object array: skipped as metadata, refused if mapped
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


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        obj = load_weights_only(path, "cpu")
    except RefusedPickle as e:
        raise DataError(
            f"{path} needs arbitrary pickled code ({e.global_name}) to load, refused for safety; save a plain dict of tensors"
        ) from None
    except (OSError, DamagedFile) as e:
        raise DataError(f"cannot read {path} as a torch file: {first_line(e)}") from None
    if not isinstance(obj, Mapping):
        raise DataError(f"{path} holds a {type(obj).__name__}; expected a dict of tensors")
    return {str(k): v for k, v in obj.items()}


def _read_extxyz(path: Path) -> dict[str, Any]:
    """Frames -> padded arrays: pos, z, mask, energy/forces (when every frame has them),
    plus numeric ``info`` entries (per frame) and ``arrays`` entries (per atom, padded)."""
    try:
        import ase.io
    except ImportError:
        raise DataError(_ASE_MISSING) from None
    try:
        frames = ase.io.read(str(path), index=":")
    except Exception as e:
        raise DataError(f"cannot read {path} with ASE: {first_line(e)}") from e
    if not frames:
        raise DataError(f"{path} holds no structures")

    n = len(frames)
    counts = [len(atoms) for atoms in frames]
    a_max = max(counts)
    out: dict[str, Any] = {
        "pos": np.zeros((n, a_max, 3)),
        "z": np.zeros((n, a_max), dtype=np.int64),
        "mask": np.zeros((n, a_max), dtype=bool),
    }
    for i, atoms in enumerate(frames):
        a = counts[i]
        out["pos"][i, :a] = atoms.get_positions()
        out["z"][i, :a] = atoms.get_atomic_numbers()
        out["mask"][i, :a] = True

    energies = [_frame_energy(atoms) for atoms in frames]
    if all(e is not None for e in energies):
        out["energy"] = np.asarray(energies, dtype=np.float64)
    forces = [_frame_forces(atoms) for atoms in frames]
    if all(f is not None for f in forces):
        out["forces"] = _pad([np.asarray(f) for f in forces], a_max)

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
            out[key] = _pad(vals, a_max)
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


def _pad(per_frame: list[np.ndarray], a_max: int) -> np.ndarray:
    """[(A_i, ...)] -> (N, a_max, ...) zero-padded."""
    out = np.zeros((len(per_frame), a_max, *per_frame[0].shape[1:]), dtype=per_frame[0].dtype)
    for i, v in enumerate(per_frame):
        out[i, : len(v)] = v
    return out


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


def _detect_layout(names: set[str]) -> dict[str, str] | None:
    for layout in _LAYOUTS.values():
        if layout["pos"] in names and layout["z"] in names:
            return {field: key for field, key in layout.items() if key in names}
    return None


def _select(raw: dict[str, Any], keys: dict[str, str], path: Path) -> dict[str, torch.Tensor]:
    """Apply the loading rule of the module docstring and convert to tensors."""
    names = set(raw)
    layout = _detect_layout(names)

    if keys:
        for field, key in keys.items():
            if key not in names:
                origin = f" (mapped from '{field}')" if field != key else ""
                available = ", ".join(sorted(names)) or "none"
                raise DataError(f"{path} has no key '{key}'{origin}; keys in the file: {available}")
        implied = dict(layout or {})
        for field in CANONICAL_FIELDS:
            if field in names and field not in implied:
                implied[field] = field
        used = set(keys.values())
        mapping = {f: k for f, k in implied.items() if k not in used and f not in keys}
        mapping.update(keys)
        required = set(keys)
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
            origin = f" (mapped from '{field}')" if field != key else ""
            raise DataError(f"{path}: key '{key}'{origin} {what}")
        out[field] = tensor
    if not out:
        raise DataError(f"{path} holds no numeric arrays")
    return out


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
    if isinstance(value, _Refused):
        return repr(value)
    return type(value).__name__


# ------------------------------------------------------------------- canonical fields


def _canonicalize(data: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
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
        mask = data["z"] > 0  # atomic number 0 marks padding; all True when none
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


def _check_sample_counts(data: dict[str, torch.Tensor], path: Path) -> None:
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

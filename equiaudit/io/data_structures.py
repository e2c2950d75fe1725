"""Protein structures (PDB, mmCIF, gzipped or not) as data, read with gemmi (``equiaudit[structures]``).

One file is one sample. ``data.path`` is a ``.pdb``/``.ent``/``.cif``/``.mmcif`` file (each
also ``.gz``), a folder of them (sorted by name, not recursive) or a list file (``.txt`` or
``.list``: one path per line, relative to the list file; ``#`` comments).

What is read, per file (rules chosen so that the PDB and mmCIF versions of an entry agree):

* the **first model** only (NMR ensembles hold many);
* hydrogens, **waters** and **non-polymer hetero groups** (ligands, ions) are removed
  (``gemmi.Structure.remove_ligands_and_waters`` after ``setup_entities``); modified amino
  acids inside the chain (MSE, a HETATM in PDB files) are kept, as their parent residue's
  token (MSE → MET); residues that are not amino acids (nucleotides) are dropped;
* **alternative locations**: the first conformer of every atom is kept
  (``remove_alternative_conformations``), never an average;
* ``data.chains: [A, …]`` keeps those chains (author chain names, the PDB file's chain
  column and mmCIF's ``auth_asym_id``), in the listed order; default every protein chain in
  file order. Chains are concatenated along the residue axis;
* ``data.max_residues``: keep the first residues of the concatenation (a crop, reported);
* ``data.units``: ``angstrom`` (as stored) or ``nm`` (÷ 10, as Proteina trains).

Fields (``L`` = residues of the longest sample, ``A`` = atom slots):

* ``data.atoms: CA`` (default): one slot per residue, ``A = L``;
  ``backbone``: ``N, CA, C, O`` per residue, ``A = 4L`` (slot ``4i + j``);
  ``heavy``: every heavy atom of each residue, in file order, ``A`` = the most in a sample.
* ``pos`` ``(N, A, 3)`` float64; ``mask`` ``(N, A)`` bool: the atom is present. A missing
  atom is masked, never guessed; with ``atoms: CA`` and ``frames: true`` a residue is
  valid only when its ``N``, ``CA`` and ``C`` are all present (its frame needs them).
* ``residue`` ``(N, A)`` int64: the residue type as a token, AlphaFold's order
  ``ARNDCQEGHILKMFPSTWYV`` = 0 … 19, 20 = unknown (:data:`RESIDUE_TYPES`); padding 20.
* ``position`` ``(N, A)`` int64: the residue's index along its chain, from its sequence
  number (0 = the chain's first residue in the model; a gap of missing residues counts);
  ``chain`` ``(N, A)`` int64: the chain's index in the sample.
* ``chain_break`` ``(N, A)`` bool: the residue follows a break of its chain (residues missing
  in the model: a gap in numbering, or a ``C(i−1)–N(i)`` distance over 2 Å). Nothing is
  filled in: the two sides are simply not bonded.
* ``length`` ``(N,)`` int64: valid residues per sample (the chain-length breakdown).
* ``z`` ``(N, A)`` atomic numbers with ``atoms: backbone | heavy`` (not for ``CA``, where it
  would be 6 everywhere).
* ``data.frames: true`` adds ``frames`` ``(N, L, 3, 3)`` (:func:`equiaudit.actions.frames.frames_from_backbone`
  from ``N, CA, C``; identity where an atom is missing) and ``frames_mask`` ``(N, L)``.

A file that cannot be read (not a structure, no protein residue, a chain that is not there)
is skipped and named on one line of stderr, the rest are read; ``data.strict: true`` makes
it an error instead. Nothing is downloaded.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError, first_line
from equiaudit.io.data_common import Table, missing_extra, pad

__all__ = ["STRUCTURE_SUFFIXES", "STRUCTURE_OPTIONS", "RESIDUE_TYPES", "UNKNOWN_RESIDUE", "is_structure_path",
           "structure_files", "read_structures", "check_structure_options"]

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
LIST_SUFFIXES = (".txt", ".list")
#: AlphaFold's residue order: token i is RESIDUE_TYPES[i]; 20 is unknown (and padding).
RESIDUE_TYPES = "ARNDCQEGHILKMFPSTWYV"
UNKNOWN_RESIDUE = 20
BACKBONE = ("N", "CA", "C", "O")
ATOMS = ("CA", "backbone", "heavy")
UNITS = {"angstrom": 1.0, "nm": 0.1}
#: data.* keys of structure files and their defaults.
STRUCTURE_OPTIONS: dict[str, Any] = {"atoms": "CA", "units": "angstrom", "chains": None, "frames": False,
                                     "max_residues": None, "strict": False}
# A peptide bond is 1.33 Å; a C–N distance above this is a break (missing residues).
_BREAK_ANGSTROM = 2.0


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()


def is_structure_path(path: Path) -> bool:
    """A structure file, a list file of them, or a folder holding at least one structure file."""
    if path.is_dir():
        return any(_suffix(p) in STRUCTURE_SUFFIXES for p in path.iterdir() if p.is_file())
    return _suffix(path) in STRUCTURE_SUFFIXES or path.suffix.lower() in LIST_SUFFIXES


def structure_files(path: Path) -> list[Path]:
    """The structure files of ``data.path``: itself, a folder's (sorted) or a list file's."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) in STRUCTURE_SUFFIXES)
    if path.suffix.lower() in LIST_SUFFIXES:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the list file {path}: {first_line(e)}") from None
        files = [path.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not files:
            raise DataError(f"the list file {path} names no structure files")
        return files
    return [path]


def check_structure_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``data.*`` structure options over their defaults, checked (``DataError`` naming the bad one)."""
    out = {**STRUCTURE_OPTIONS, **{k: v for k, v in options.items() if v is not None or k == "chains"}}
    if out["atoms"] not in ATOMS:
        raise DataError(f"data.atoms={out['atoms']!r} is not allowed; allowed: {', '.join(ATOMS)}")
    if out["units"] not in UNITS:
        raise DataError(f"data.units={out['units']!r} is not allowed; allowed: {', '.join(UNITS)}")
    chains = out["chains"]
    if chains is not None:
        chains = [chains] if isinstance(chains, str) else chains
        if not isinstance(chains, (list, tuple)) or not chains or not all(isinstance(c, str) and c for c in chains):
            raise DataError(f"data.chains={out['chains']!r} must be a list of chain names, e.g. [A, B]")
        out["chains"] = list(chains)
    limit = out["max_residues"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"data.max_residues={limit!r} must be a positive integer")
    for key in ("frames", "strict"):
        if not isinstance(out[key], bool):
            raise DataError(f"data.{key}={out[key]!r} must be true or false")
    return out


def _token(name: str, gemmi) -> int:
    info = gemmi.find_tabulated_residue(name)
    if info is None or not info.is_amino_acid():
        return -1  # not an amino acid: dropped
    letter = info.one_letter_code.upper()  # modified residues have their parent's letter in lower case
    return RESIDUE_TYPES.index(letter) if letter in RESIDUE_TYPES else UNKNOWN_RESIDUE


def _read_one(path: Path, options: Mapping[str, Any], gemmi) -> dict[str, np.ndarray]:
    """One file → per-residue arrays (unpadded): ``xyz (L, 4, 3)`` of N, CA, C, O (NaN where
    missing), ``heavy`` list of ``(n_i, 3)`` and ``heavy_z``, ``residue``, ``position``,
    ``chain``, ``chain_break`` ``(L,)``."""
    try:  # gemmi reads .gz itself, and tells PDB from mmCIF by the suffix
        structure = gemmi.read_structure(str(path))
    except Exception as e:  # gemmi raises RuntimeError/ValueError with its own message
        raise DataError(first_line(e)) from None
    if len(structure) == 0:
        raise DataError("no model")
    structure.setup_entities()
    structure.remove_hydrogens()
    structure.remove_ligands_and_waters()
    structure.remove_alternative_conformations()
    model = structure[0]
    by_name = {}
    for chain in model:
        by_name.setdefault(chain.name, chain)  # the first chain of a name (mmCIF may split one)
    wanted = options["chains"]
    if wanted is not None:
        missing = [c for c in wanted if c not in by_name]
        if missing:
            raise DataError(f"no chain {missing[0]!r} (chains: {', '.join(by_name) or 'none'})")
        chains = [by_name[c] for c in wanted]
    else:
        chains = list(model)
    xyz, heavy, heavy_z, residue, position, chain_index, breaks = [], [], [], [], [], [], []
    kept_chains = 0
    for chain in chains:
        previous_c, previous_num, first_num = None, None, None
        kept = False
        for res in chain:
            token = _token(res.name, gemmi)
            if token < 0:
                continue
            atoms = {}
            for atom in res:
                atoms.setdefault(atom.name, atom)  # first conformer only (altlocs removed already)
            coords = np.full((4, 3), np.nan)
            for j, name in enumerate(BACKBONE):
                if name in atoms:
                    p = atoms[name].pos
                    coords[j] = (p.x, p.y, p.z)
            num = res.seqid.num
            first_num = num if first_num is None else first_num
            gap = previous_num is not None and num - previous_num > 1
            if previous_c is not None and not np.isnan(coords[0]).any():
                gap = gap or float(np.linalg.norm(coords[0] - previous_c)) > _BREAK_ANGSTROM
            breaks.append(bool(gap))
            previous_c = None if np.isnan(coords[2]).any() else coords[2]
            previous_num = num
            xyz.append(coords)
            heavy.append(np.array([(a.pos.x, a.pos.y, a.pos.z) for a in atoms.values()], dtype=np.float64).reshape(-1, 3))
            heavy_z.append(np.array([a.element.atomic_number for a in atoms.values()], dtype=np.int64))
            residue.append(token)
            position.append(max(0, num - first_num))
            chain_index.append(kept_chains)
            kept = True
        kept_chains += kept
    if not xyz:
        raise DataError("no amino-acid residues")
    return {"xyz": np.stack(xyz), "heavy": heavy, "heavy_z": heavy_z, "residue": np.array(residue, dtype=np.int64),
            "position": np.array(position, dtype=np.int64), "chain": np.array(chain_index, dtype=np.int64),
            "chain_break": np.array(breaks, dtype=bool)}


def read_structures(path: Path, options: Mapping[str, Any], pick=None) -> Table:
    """``data.path`` (file, folder or list file) → a :class:`Table` of the fields in the
    module docstring; ``pick(n)`` takes the subset (``data.samples``) of the files read."""
    try:
        import gemmi
    except ImportError:
        raise missing_extra("PDB/mmCIF structures", "structures", "gemmi") from None
    options = check_structure_options(options)
    files = structure_files(path)
    samples, names = [], []
    for file in files:
        try:
            if not file.is_file():
                raise DataError("not found" if not file.exists() else "not a regular file")
            one = _read_one(file, options, gemmi)
        except DataError as e:
            if options["strict"]:
                raise DataError(f"cannot read the structure {file}: {e}") from None
            print(f"equiaudit: skipped {file}: {e}", file=sys.stderr)  # one line per unreadable file
            continue
        samples.append(one)
        names.append(str(file))
    if not samples:
        raise DataError(f"{path}: no structure could be read ({len(files)} file(s) tried)")
    limit = options["max_residues"]
    if limit is not None:
        samples = [{k: v[:limit] for k, v in s.items()} for s in samples]
    index = pick(len(samples)) if pick is not None else None
    chosen = range(len(samples)) if index is None else index.tolist()
    samples = [samples[i] for i in chosen]
    scale = UNITS[options["units"]]
    arrays = _assemble(samples, options["atoms"], options["frames"], scale)
    return Table(arrays, index=torch.arange(len(names)) if index is None else index,
                 where=lambda i: Path(names[i]).name)


def _assemble(samples: Sequence[dict], atoms: str, frames: bool, scale: float) -> dict[str, np.ndarray]:
    counts = [len(s["residue"]) for s in samples]
    length = max(counts)
    out: dict[str, np.ndarray] = {}
    if atoms == "CA":
        ca = [s["xyz"][:, 1] for s in samples]
        present = [~np.isnan(c).any(-1) for c in ca]
        if frames:  # a residue counts only with the three atoms of its frame
            present = [~np.isnan(s["xyz"][:, :3]).any((-1, -2)) for s in samples]
        out["pos"] = pad([np.nan_to_num(c) * scale for c in ca], length)
        out["mask"] = pad(present, length)
        per_atom = [np.arange(n) for n in counts]
    elif atoms == "backbone":
        out["pos"] = pad([np.nan_to_num(s["xyz"]).reshape(-1, 3) * scale for s in samples], 4 * length)
        out["mask"] = pad([~np.isnan(s["xyz"]).any(-1).reshape(-1) for s in samples], 4 * length)
        out["z"] = pad([np.tile(np.array([7, 6, 6, 8]), n) for n in counts], 4 * length)
        per_atom = [np.repeat(np.arange(n), 4) for n in counts]
    else:
        coords = [np.concatenate(s["heavy"]) * scale for s in samples]
        out["pos"] = pad(coords, max(len(c) for c in coords))
        out["mask"] = pad([np.ones(len(c), dtype=bool) for c in coords], out["pos"].shape[1])
        out["z"] = pad([np.concatenate(s["heavy_z"]) for s in samples], out["pos"].shape[1])
        per_atom = [np.repeat(np.arange(len(s["heavy"])), [len(h) for h in s["heavy"]]) for s in samples]
    width = out["pos"].shape[1]
    out["residue"] = np.full((len(samples), width), UNKNOWN_RESIDUE, dtype=np.int64)
    for name in ("position", "chain", "chain_break"):
        out[name] = pad([s[name][i] for s, i in zip(samples, per_atom)], width)
    for row, (s, i) in enumerate(zip(samples, per_atom)):
        out["residue"][row, : len(i)] = s["residue"][i]
    out["length"] = np.array([int(np.count_nonzero(~np.isnan(s["xyz"][:, 1]).any(-1))) for s in samples], dtype=np.int64)
    if frames:
        from equiaudit.actions.frames import frames_from_backbone

        rotations, valid = [], []
        for s in samples:
            xyz = torch.from_numpy(np.nan_to_num(s["xyz"]))
            ok = ~np.isnan(s["xyz"][:, :3]).any((-1, -2))
            r = frames_from_backbone(xyz[:, 0], xyz[:, 1], xyz[:, 2]).numpy()
            r[~ok] = np.eye(3)
            rotations.append(r)
            valid.append(ok)
        out["frames"] = pad(rotations, length)
        out["frames"][np.arange(length)[None, :] >= np.array(counts)[:, None]] = np.eye(3)
        out["frames_mask"] = pad(valid, length)
    return out

"""Model families: the field's own networks behind equiaudit's padded force-field signature,
built from what their checkpoints store, with no adapter code from the user.

A *family* is ONE module (``equiaudit/zoo/families/<name>.py``) listed in
:data:`FAMILY_MODULES`. The registry imports it lazily (only when a file is recognised or the
family is named), so a family's package (``sevenn``, ``metatrain``, ``orb_models`` ...) is
imported only by :func:`build` — recognising a file never needs the package.

What a family module must define (module-level names)
======================================================

``NAME: str``
    The family's name, as written in a config (``model: {family: NAME}``) and in
    ``run.json`` (``"family"``). Lower case, e.g. ``"sevennet"``, ``"metatrain"``, ``"orb"``.

``EXTRA: str``
    Its pip extra: ``pip install "equiaudit[EXTRA]"`` (declared in ``pyproject.toml``; it
    must keep ``torch`` at the version the project pins).

``READS: str``
    One line for the docs' families table and the banner: what the family reads from a
    checkpoint (e.g. ``"model_N.ckpt: model_state_dict, model_hypers, dataset_info"``).

``recognise(peek: Peek) -> Recognition | None``
    Whether ``peek.path`` is this family's file, decided from its CONTENTS (keys, an
    ``architecture_name``, a config entry, the zip members of an archive), never from the
    file name alone (a name may only break ties between content-recognised kinds, e.g. a
    final duplicate). ``None``: not this family's. Must be cheap, must not import the
    family's package, must not raise (a file it cannot read is simply not recognised), and
    must never execute anything from the file: use ``peek.contents()`` (read weights-only,
    TorchScript objects and unknown classes kept as inert :class:`Opaque` placeholders) and
    ``peek.zip_names()``. Return ``Recognition(kind=...)`` with ``kind``:

    * ``"checkpoint"`` — a checkpoint to audit (one row of summary.csv);
    * ``"support"`` — a file of the family's runs that is not a model checkpoint
      (metatrain's ``composition_model.ckpt``): skipped and listed once in the banner with
      ``reason``, never a failed row;
    * ``"torchscript"`` — a TorchScript archive (an exported program): skipped, with
      ``reason`` giving the route to audit it (``--allow-torchscript``).

``build(source: Path | None, **options) -> torch.nn.Module``
    The network, built with the family's own package from what ``source`` (a checkpoint
    recognised as ``"checkpoint"``; ``None`` when the family can build from ``options``
    alone, e.g. Orb's architecture ``name``) stores, wrapped so that

    ``forward(pos, z, mask) -> {"energy": (B,), "forces": (B, A, 3)[, "stress": (B, 3, 3)]}``

    with ``pos`` ``(B, A, 3)`` in Å, ``z`` ``(B, A)`` atomic numbers, ``mask`` ``(B, A)``
    bool (``True`` = real atom); energies in eV, forces ``-dE/dpos`` in eV/Å (zero on padded
    atoms). Batched: ONE graph / list of systems per forward of the ``B·K`` rotated
    structures, built with tensor operations where the family's API allows.
    ``options`` are the config's ``model.kwargs`` (and any extra ``model:`` keys when
    ``family`` is given); unknown options raise ``TypeError``/``ValueError`` with one line.
    Raise ``ImportError`` when the family's package is missing: the registry turns it into
    "pip install equiaudit[EXTRA]".

    Weights: the built model must accept each audited checkpoint's weights through
    equiaudit's loader (``io/checkpoints.read_checkpoint`` → ``load_into_model``), with,
    optionally on the returned module:

    * ``upgrade_state_dict(state) -> state`` — rename/drop keys before matching;
    * ``read_checkpoint(path, map_location, weights) -> LoadedCheckpoint`` — the family's
      own safe reader, used instead of equiaudit's for files equiaudit's generic reader
      cannot parse (metatrain's TorchScript-carrying dicts); it must never execute pickled
      code (build it on :func:`read_opaque`);
    * torch's ``register_load_state_dict_post_hook`` — honoured (``load_state_dict`` is
      called), e.g. to rebuild buffers derived from the weights.

``defaults(model: torch.nn.Module) -> FamilyDefaults``
    What an audit with no YAML uses: task, heads, group, model.grad/dtype. The CLI prints
    all of it in the banner and writes it to ``run.json``; ``--set key=value`` overrides.

Adding a family = its module here + its name in :data:`FAMILY_MODULES` + its tests + its
extra in ``pyproject.toml`` (and the CI install line). Nothing else changes.
"""

from __future__ import annotations

import importlib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from equiaudit.io.safe_opaque import Opaque  # (the placeholder lives with the reader that makes it)

__all__ = [
    "FAMILY_MODULES", "Recognition", "FamilyDefaults", "Peek", "Opaque", "family", "family_names", "recognise",
    "build", "defaults", "RECOGNITION_KINDS",
]

#: The registry: one module per family, imported lazily, asked in this order.
FAMILY_MODULES: tuple[str, ...] = (
    "equiaudit.zoo.families.sevennet",
    "equiaudit.zoo.families.metatrain",
    "equiaudit.zoo.families.orb",
)

RECOGNITION_KINDS = ("checkpoint", "support", "torchscript")


@dataclass(frozen=True)
class Recognition:
    """What a family's ``recognise`` says about one file.

    ``family``: its ``NAME``; ``kind``: one of :data:`RECOGNITION_KINDS`; ``architecture``:
    the family's own architecture name when the file says it (``"pet"``); ``reason``: one
    line shown for a skipped file (``"support"``/``"torchscript"``); ``details``: small
    JSON-able facts for ``run.json`` (``{"epoch": 3, "targets": ["energy"]}``).
    """

    family: str
    kind: str
    architecture: str | None = None
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in RECOGNITION_KINDS:
            raise ValueError(f"Recognition.kind={self.kind!r} is not one of {RECOGNITION_KINDS}")


@dataclass(frozen=True)
class FamilyDefaults:
    """The settings an audit of this family's model uses when no config says otherwise.

    ``heads``: the force-field heads the model has (``("energy", "forces")``, plus
    ``"stress"`` where the model predicts it); ``group``: a group name of
    :mod:`equiaudit.groups` (``"so3"``); ``grad``: ``model.grad`` (forces by autograd need
    it); ``dtype``: ``model.dtype`` (the dtype the network was trained in).
    """

    task: str = "force_field"
    heads: tuple[str, ...] = ("energy", "forces")
    group: str = "so3"
    grad: bool = True
    dtype: str | None = "float32"


class Peek:
    """A candidate file, read safely at most once and shared by every family's ``recognise``.

    ``contents()`` is the unpickled object with every global outside the weights-only
    allowlist replaced by an :class:`Opaque` placeholder (nothing from the file runs; see
    :func:`equiaudit.io.safe_opaque.read_opaque`), or ``None`` when the file is not a
    readable ``torch.save`` pickle; ``zip_names()`` the members of a zip archive (empty
    otherwise); ``is_torchscript()`` whether it is a TorchScript archive
    (``torch.jit.save``: ``constants.pkl`` / ``code/`` members).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._contents: Any = None
        self._read = False
        self._names: list[str] | None = None
        self.error: str | None = None  # why contents() is None, one line

    def zip_names(self) -> list[str]:
        if self._names is None:
            try:
                with zipfile.ZipFile(self.path) as archive:
                    self._names = archive.namelist()
            except (OSError, zipfile.BadZipFile, ValueError):
                self._names = []
        return self._names

    def is_torchscript(self) -> bool:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in self.zip_names())

    def contents(self) -> Any:
        if not self._read:
            self._read = True
            if self.path.is_file() and not self.is_torchscript():
                from equiaudit.io.safe_opaque import OpaqueReadError, read_opaque

                try:
                    self._contents = read_opaque(self.path)
                except OpaqueReadError as exc:
                    self.error = str(exc)
        return self._contents


def family(name: str) -> ModuleType:
    """The family module called ``name`` (imported now; its package is not)."""
    for module_name in FAMILY_MODULES:
        if module_name.rpartition(".")[2] == name:
            return importlib.import_module(module_name)
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(family_names())}")


def family_names() -> list[str]:
    return [m.rpartition(".")[2] for m in FAMILY_MODULES]


def _modules() -> list[ModuleType]:
    out = []
    for module_name in FAMILY_MODULES:
        try:
            out.append(importlib.import_module(module_name))
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a family module itself must import without its package
                raise
    return out


def recognise(path: str | Path, peek: Peek | None = None) -> Recognition | None:
    """The first family that recognises ``path`` from its contents, or ``None``."""
    peek = peek or Peek(path)
    for module in _modules():
        found = module.recognise(peek)
        if found is not None:
            return found
    return None


def build(name: str, source: str | Path | None = None, /, *, allow_torchscript: bool = False, **options: Any):
    """``family(name).build(source, **options)``; a missing package names the extra to install.
    ``name`` and ``source`` are positional-only, so a family may take an option called ``name``
    (Orb's architecture name).

    ``allow_torchscript`` (the CLI's ``--allow-torchscript``, never a config key) is passed on
    only when set: a family that can run a TorchScript archive takes it as a keyword."""
    module = family(name)
    if allow_torchscript:
        options["allow_torchscript"] = True
    try:
        return module.build(Path(source) if source is not None else None, **options)
    except ImportError as exc:
        raise ImportError(f"the {name} family needs its package ({exc}): pip install \"equiaudit[{module.EXTRA}]\"") from exc


def defaults(name: str, model) -> FamilyDefaults:
    return family(name).defaults(model)

"""Reading a ``torch.save`` file whose pickle names TorchScript objects or a training package's
classes, without running any of it: those objects become inert placeholders.

metatrain's checkpoints (``model_N.ckpt``) are a ``torch.save`` dict of tensors and plain data
plus a few objects that torch's weights-only unpickler refuses: ``torch.ScriptObject`` (a
metatomic ``ModelMetadata``, a metatensor ``TensorMap`` layout) and metatrain's own
``DatasetInfo`` / ``TargetInfo`` classes. Unpickling them the ordinary way needs
``weights_only=False`` and the packages imported: code from the file would run.

:func:`read_opaque` instead gives torch's weights-only unpickler (unchanged: its opcode
rules, its allowlist, equiaudit's size and pickle-work bounds of
:func:`~equiaudit.io.safe_load.load_weights_only`) one extra allowlist entry per such name:
a fresh subclass of :class:`~equiaudit.zoo.families.base.Opaque`, which only *records* the
arguments and state the pickle hands it. Only names under :data:`OPAQUE_PREFIXES` (and
``torch.ScriptObject``) are stood in for; any other global (``os.system``, ``builtins.eval``,
a class of another package) is still refused as :class:`~equiaudit.io.safe_load.RefusedPickle`
before anything is built. What comes out is data: tensors, containers, numbers, strings and
placeholders whose ``state`` holds more of the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from equiaudit.io.safe_load import (
    MAX_UNCOMPRESSED_BYTES,
    DamagedFile,
    RefusedPickle,
    TooLarge,
    _check_and_read_pickle,
    load_weights_only,
    open_regular,
    scan_pickle,
)

__all__ = ["read_opaque", "OPAQUE_PREFIXES", "OpaqueReadError", "opaque_globals", "is_opaque"]

#: Globals stood in for by placeholders: TorchScript objects, and the classes of the atomistic
#: packages whose checkpoints carry them (their instances hold only data: hypers, units, layouts).
OPAQUE_PREFIXES = ("metatrain.", "metatomic.", "metatensor.")
OPAQUE_EXACT = ("torch.ScriptObject",)

#: What :func:`read_opaque` raises (those of :func:`~equiaudit.io.safe_load.load_weights_only`).
OpaqueReadError = (RefusedPickle, DamagedFile, TooLarge, OSError)



class Opaque:
    """An inert stand-in for an object a checkpoint's pickle would construct by running code
    (a TorchScript object, a class of the training package): it records the global's name,
    the call arguments and the state it was given, all of them plain data (tensors,
    containers, numbers, strings, other :class:`Opaque`), and does nothing else."""

    global_name: str = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.global_name}>"


def _standable(name: str) -> bool:
    return name in OPAQUE_EXACT or name.startswith(OPAQUE_PREFIXES)


def opaque_globals(path: str | Path) -> list[str]:
    """The globals of ``path``'s pickle that :func:`read_opaque` would stand in for (scanned
    opcode by opcode, nothing built)."""
    handle = open_regular(path)
    with handle:
        _, pickled = _check_and_read_pickle(handle, MAX_UNCOMPRESSED_BYTES)
        if pickled is None:
            return []
        return sorted({g for g in scan_pickle(pickled).globals if _standable(g)})


def _placeholder(name: str) -> type:

    class Placeholder(Opaque):
        global_name = name
        args: tuple = ()
        kwargs: dict = {}
        state: Any = None

        def __new__(cls, *args: Any, **kwargs: Any):  # NEWOBJ passes the class's arguments here
            instance = object.__new__(cls)
            instance.args, instance.kwargs, instance.state = args, kwargs, None
            return instance

    Placeholder.__name__ = Placeholder.__qualname__ = "Opaque_" + name.replace(".", "_")
    return Placeholder


def read_opaque(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``path`` unpickled weights-only, with the globals of :data:`OPAQUE_PREFIXES` (and
    ``torch.ScriptObject``) as inert :class:`~equiaudit.zoo.families.base.Opaque`
    placeholders. Raises what :func:`~equiaudit.io.safe_load.load_weights_only` raises; a
    pickle naming any other global is :class:`RefusedPickle` and nothing of it ran."""
    names = opaque_globals(path)
    stand_ins = [(_placeholder(name), name) for name in names]
    return load_weights_only(path, map_location, mmap=mmap, safe_globals=stand_ins)


def is_opaque(value: Any, name: str | None = None) -> bool:
    """Whether ``value`` is a placeholder (for the global ``name``, when given)."""

    return isinstance(value, Opaque) and (name is None or value.global_name == name)

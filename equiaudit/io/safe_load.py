"""The one place equiaudit unpickles a file: ``torch.load(..., weights_only=True)``, nothing else.

Checkpoints and data files alike are untrusted input. ``weights_only=True`` restricts the
unpickler to torch's allowlist of data-carrying globals (tensors, storages, plain
containers) plus, here, numpy's data-only reconstructors and dtype classes
(:data:`NUMPY_DATA_GLOBALS`: arrays and scalars of numbers and fixed-width strings, as
SevenNet stores in its configs) and :data:`DATA_CLASSES` (``argparse.Namespace``, the
``args`` of timm's and many research repositories' training checkpoints: an attribute bag,
rebuilt by ``object.__new__`` and a ``__dict__`` update, no method of its own runs, and its
attributes are held to the same allowlist); a pickle that names anything else (a class,
``os.system``, ``exec``) is refused before any of it runs.

Before torch sees a file, :func:`load_weights_only` bounds what reading it can cost:

* only a regular file is opened (a FIFO, socket or device is refused without blocking);
* a zip (``torch.save``'s format, always stored uncompressed) must declare at most
  :data:`MAX_UNCOMPRESSED_BYTES` in all, and no member over
  :data:`RATIO_CHECK_MIN_BYTES` may inflate more than :data:`MAX_COMPRESSION_RATIO` times
  (a zip bomb turned a 4.5 MB file into 4.5 GB of memory);
* the pickle is scanned opcode by opcode, without building anything, and refused when
  hashing its dict keys and call arguments would take more than
  ``PICKLE_WORK_MIN + PICKLE_WORK_PER_BYTE × pickle bytes`` element visits (tuples that
  share a sub-object 2^k times make a few-KB pickle cost 2^k operations to unpickle).

Failures come out as four exceptions:

* :class:`RefusedPickle` — the file needs a global outside the allowlist (named);
* :class:`TooLarge` — one of the bounds above (the message names it);
* ``OSError`` (incl. ``FileNotFoundError``, :class:`NotRegularFile`) — cannot be opened;
* :class:`DamagedFile` — anything else: truncated, corrupt or not a torch file, with the
  informative line of torch's message (:func:`damaged_reason`).

Callers map them to their own :class:`~equiaudit.errors.EquiauditError` subclasses.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RefusedPickle", "DamagedFile", "TooLarge", "NotRegularFile", "load_weights_only", "damaged_reason",
    "readable_global", "file_kind", "open_regular", "MAX_UNCOMPRESSED_BYTES", "MAX_COMPRESSION_RATIO", "RATIO_CHECK_MIN_BYTES",
    "PICKLE_WORK_MIN", "PICKLE_WORK_PER_BYTE", "NUMPY_DATA_GLOBALS", "DATA_CLASSES",
]

# Resource bounds (see the module docstring). torch.save never compresses, so the ratio cap
# only ever meets hand-made zips; the absolute cap is far above any model this tool audits.
MAX_UNCOMPRESSED_BYTES = 32 * 2**30
MAX_COMPRESSION_RATIO = 20
RATIO_CHECK_MIN_BYTES = 2**20
PICKLE_WORK_MIN = 2_000_000
PICKLE_WORK_PER_BYTE = 16

# Exactly the numpy globals a pickled ndarray / numpy scalar / dtype needs, under the names
# numpy 1.x (numpy.core) and 2.x (numpy._core) write; the dtype classes are those of
# booleans, integers, floats, complex numbers and fixed-width byte/unicode strings — not
# object, void (structured) or variable-width string dtypes.
NUMPY_DATA_GLOBALS = (
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.ndarray", "numpy.dtype",
)
_NUMPY_DTYPE_CODES = "?bBhHiIlLqQefdgFDGSU"
# Plain attribute bags with no __reduce__/__setstate__/__new__ of their own.
DATA_CLASSES = (argparse.Namespace,)

# torch names the refused global as "GLOBAL numpy.core.multiarray._reconstruct was not an
# allowed global ..." or "Unsupported global: GLOBAL os.system ... whose module ...".
_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")
# ... or, for an allowed callable building a refused type: "Can only build Tensor, ... but got
# <class 'numpy.dtypes.ObjectDType'>", "Trying to call reduce for unrecognized function <f>".
_TYPE_RE = re.compile(r"(?:but got <class '([^']+)'>|unrecognized function <?([^\s>]+))")
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # protocol 2, then LONG1 of torch's 10-byte magic number


class RefusedPickle(Exception):
    """The pickle needs ``global_name``, which is not a data-carrying global: nothing ran.

    ``pickled_module`` is True when the pickle is a whole ``nn.Module`` (its opcodes carry the
    ``_modules``/``_parameters`` attributes every module has), e.g. ``torch.save(model)``.
    """

    def __init__(self, global_name: str, pickled_module: bool = False):
        super().__init__(global_name)
        self.global_name = global_name
        self.pickled_module = pickled_module


class DamagedFile(Exception):
    """Truncated, corrupt or not a ``torch.save`` file; ``reason`` is one short line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TooLarge(DamagedFile):
    """Reading the file would exceed a resource bound; ``reason`` names the bound. A
    :class:`DamagedFile`, so callers that do not single it out still refuse the file."""


class NotRegularFile(OSError):
    """A FIFO, socket or device where a file was expected: never read (it could block forever)."""

    def __init__(self, kind: str):
        super().__init__(errno.EINVAL, f"not a regular file ({kind})")
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def readable_global(name: str) -> str:
    """``os.system`` pickles as ``posix.system`` (``nt.system`` on Windows): show what users wrote."""
    module, _, attr = name.rpartition(".")
    return f"os.{attr}" if module in ("posix", "nt") else name


def damaged_reason(exc: BaseException) -> str:
    """The informative line of a torch/safetensors error, without torch's paragraphs of advice."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # torch wraps weights-only failures as: advice ... <actual reason> / "Check the documentation ..."
    lines = [ln for ln in lines if not ln.startswith("Check the documentation")]
    if not lines:
        return "unexpected end of file" if isinstance(exc, EOFError) else type(exc).__name__
    reason = lines[-1] if "Weights only load failed" in lines[0] else lines[0]
    reason = re.sub(r"^Unsupported operand (\d+)$", r"not a torch.save file: unsupported pickle opcode \1", reason)
    reason = reason.split(". ")[0].rstrip(".")
    return reason if len(reason) <= 120 else reason[:117] + "..."


def numpy_safe_globals() -> list[Any]:
    """The allowlist entries for :data:`NUMPY_DATA_GLOBALS` (name-tagged, as torch accepts them)."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    objects = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
               "ndarray": np.ndarray, "dtype": np.dtype}
    entries: list[Any] = [(objects[name.rpartition(".")[2]], name) for name in NUMPY_DATA_GLOBALS]
    # BUILD on a dtype instance is checked against its class (numpy.dtypes.Float32DType ...).
    entries += sorted({type(np.dtype(code)) for code in _NUMPY_DTYPE_CODES}, key=lambda c: c.__name__)
    return entries


def load_weights_only(
    path: str | Path,
    map_location: Any = "cpu",
    *,
    mmap: bool = False,
    safe_globals: Sequence[Any] = (),
    max_bytes: int | None = None,
) -> Any:
    """``torch.load(path, weights_only=True)`` after the checks of the module docstring.

    ``safe_globals`` extends the allowlist (torch's, plus numpy's data globals) for this call
    only. ``mmap`` maps zip files instead of reading their tensors (cheap peeks); it is
    ignored for legacy (non-zip) files, which cannot be mapped. ``max_bytes`` defaults to
    :data:`MAX_UNCOMPRESSED_BYTES` (read at call time). Raises
    :class:`RefusedPickle`, :class:`TooLarge`, ``OSError`` or :class:`DamagedFile`.
    """
    handle = open_regular(path)
    with handle:
        is_zip, pickled = _check_and_read_pickle(handle, MAX_UNCOMPRESSED_BYTES if max_bytes is None else max_bytes)
        summary = scan_pickle(pickled) if pickled is not None else None
        handle.seek(0)
        try:
            with warnings.catch_warnings(), torch.serialization.safe_globals([*numpy_safe_globals(), *DATA_CLASSES,
                                                                              *safe_globals]):
                warnings.simplefilter("ignore")  # e.g. torch's pickle-protocol warning: noise for users
                # torch maps only by path, and its C++ side needs the path as UTF-8.
                mapped = mmap and is_zip and _utf8(path)
                source = str(path) if mapped else handle
                return torch.load(source, map_location=map_location, weights_only=True, mmap=mapped)
        except pickle.UnpicklingError as exc:
            needed = _GLOBAL_RE.search(str(exc)) or _TYPE_RE.search(str(exc))
            if needed:
                module_like = summary is not None and summary.module_like
                name = next(g for g in needed.groups() if g)
                raise RefusedPickle(readable_global(name), module_like) from None
            raise DamagedFile(damaged_reason(exc)) from None
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/OSError/... for damaged files
            # The file opened and is regular, so even an OSError (EINVAL from a truncated
            # legacy file) is about its contents.
            raise DamagedFile(damaged_reason(exc)) from None


def open_regular(path: str | Path) -> io.BufferedReader:
    """Open ``path`` for reading without blocking, and only if it is a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO with no writer must not hang
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(file_kind(mode))
        if flags & getattr(os, "O_NONBLOCK", 0):
            import fcntl  # posix only, like O_NONBLOCK itself

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _utf8(path: str | Path) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _check_and_read_pickle(handle: io.BufferedReader, max_bytes: int) -> tuple[bool, bytes | io.BufferedReader | None]:
    """(is_zip, the pickle to scan): checks a zip's declared sizes first; a legacy file is
    scanned from its stream; anything else is left to torch's own error."""
    head = handle.read(4)
    handle.seek(0)
    if not zipfile.is_zipfile(handle):
        handle.seek(0)
        if head == _ZIP_MAGIC:
            raise DamagedFile("truncated zip archive (no central directory)")
        return False, (handle if head == _LEGACY_MAGIC else None)
    handle.seek(0)
    size = os.fstat(handle.fileno()).st_size
    try:
        archive = zipfile.ZipFile(handle)
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DamagedFile(f"bad zip archive: {damaged_reason(exc)}") from None
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise TooLarge(f"declares {_gib(total)} of data, over the {_gib(max_bytes)} limit (MAX_UNCOMPRESSED_BYTES)")
    for info in infos:
        if info.header_offset + info.compress_size > size:
            raise DamagedFile(f"truncated: member {_printable(info.filename)} runs past the end of the file")
        if (info.compress_type != zipfile.ZIP_STORED and info.file_size > RATIO_CHECK_MIN_BYTES
                and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)):
            raise TooLarge(
                f"member {_printable(info.filename)} inflates {info.file_size / max(info.compress_size, 1):.0f}x "
                f"(to {_gib(info.file_size)}), over the {MAX_COMPRESSION_RATIO}x limit for compressed members "
                "(MAX_COMPRESSION_RATIO; torch.save never compresses)"
            )
    pkl = next((i for i in infos if i.filename.endswith("data.pkl")), None)
    if pkl is None:
        return True, None  # torch reports the missing record itself
    try:
        return True, archive.read(pkl)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DamagedFile(f"bad zip archive: {damaged_reason(exc)}") from None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _printable(name: str) -> str:
    return name.encode("ascii", "backslashreplace").decode()[:80]


# --------------------------------------------------------------------------- pickle pre-scan


@dataclass
class PickleSummary:
    """What :func:`scan_pickle` saw: the globals named, whether it is a pickled ``nn.Module``,
    and the element visits that hashing its keys and call arguments costs."""

    globals: list[str]
    module_like: bool
    work: int


class _Box:
    """A mutable container (list, dict, set) or a call result on the scan's stack: unhashable,
    so it costs one visit inside a tuple plus its direct contents when passed to a call."""

    __slots__ = ("content",)

    def __init__(self) -> None:
        self.content = 0


_ATOMS = {
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT",
    "FLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "EMPTY_TUPLE",
}


def scan_pickle(data: bytes | io.BufferedReader) -> PickleSummary:
    """Walk a pickle's opcodes (nothing is built or called) and bound the cost of loading it.

    Every value on the simulated stack carries its *hash weight*: the number of elements
    hashing it visits (a tuple: 1 + its items'; tuples sharing a sub-object count it each
    time, which is exactly the amplification). Dict keys and the arguments of calls and
    BUILDs add their weight to the work; over the budget → :class:`TooLarge`. A legacy
    torch file (a stream) holds four pickles; all are scanned. A pickle the scan cannot
    follow (truncated, an opcode outside the weights-only subset torch accepts) raises
    :class:`DamagedFile`: never let an unscanned pickle through to the unpickler.
    """
    try:
        if isinstance(data, bytes):
            return _scan_one(io.BytesIO(data), len(data))
        total = PickleSummary([], False, 0)
        size = os.fstat(data.fileno()).st_size
        for _ in range(4):  # magic number, protocol, sys_info, the object itself
            one = _scan_one(data, size)
            total.globals += one.globals
            total.module_like |= one.module_like
            total.work += one.work
        return total
    except TooLarge:
        raise
    except Exception as exc:  # noqa: BLE001 - stack underflow, truncation, a foreign opcode: all damage
        raise DamagedFile(f"not a readable torch pickle ({damaged_reason(exc)})") from None


def _scan_one(stream: Any, size: int) -> PickleSummary:
    budget = PICKLE_WORK_MIN + PICKLE_WORK_PER_BYTE * size
    cap = budget + 1  # weights saturate here: no bigints, and any one over it is already too much
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}
    names: list[str] = []
    strings: set[str] = set()
    work = 0

    def weight(value: Any) -> int:
        return 1 + value.content if isinstance(value, _Box) else value

    def charge(amount: int) -> None:
        nonlocal work
        work = min(work + amount, cap)
        if work > budget:
            raise TooLarge(
                f"its pickle shares sub-objects so that loading it takes over {budget:,} operations "
                "(PICKLE_WORK_MIN + PICKLE_WORK_PER_BYTE per byte)"
            )

    def pop_mark() -> list[Any]:
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in _ATOMS:
            stack.append(1)
            if name in ("BINUNICODE", "SHORT_BINUNICODE") and isinstance(arg, str) and len(arg) < 16:
                strings.add(arg)
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
            stack.append(_Box())
        elif name == "MARK":
            marks.append(stack)
            stack = []
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items, stack[-n:] = stack[-n:], []
            if len(items) != n:
                raise ValueError("stack underflow")
            stack.append(min(cap, 1 + sum(weight(i) for i in items)))
        elif name == "TUPLE":
            items = pop_mark()  # first: it rebinds `stack`
            stack.append(min(cap, 1 + sum(weight(i) for i in items)))
        elif name == "APPEND":
            item = stack.pop()
            _box(stack[-1]).content = min(cap, stack[-1].content + weight(item))
        elif name == "APPENDS":
            items = pop_mark()
            _box(stack[-1]).content = min(cap, stack[-1].content + sum(weight(i) for i in items))
        elif name in ("SETITEM", "SETITEMS"):
            items = [stack.pop(-2), stack.pop()] if name == "SETITEM" else pop_mark()
            keys = items[0::2]
            charge(sum(weight(k) for k in keys))  # each key is hashed on insertion
            _box(stack[-1]).content = min(cap, stack[-1].content + sum(weight(i) for i in items))
        elif name == "GLOBAL":
            names.append(str(arg).replace(" ", "."))
            stack.append(1)
        elif name == "STACK_GLOBAL":
            stack.pop(), stack.pop()
            names.append("<stack global>")
            stack.append(1)
        elif name in ("REDUCE", "NEWOBJ", "BUILD"):
            args = stack.pop()
            charge(weight(args))  # e.g. OrderedDict(pairs) hashes every key it is given
            if name != "BUILD":
                stack.pop()
                stack.append(_Box())
        elif name == "BINPERSID":
            stack.pop()
            stack.append(1)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[arg])
        elif name == "POP":
            stack.pop()
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "STOP":
            break
        else:
            raise ValueError(f"opcode {name} is outside the weights-only subset")
    module_like = {"_modules", "_parameters"} <= strings
    return PickleSummary(names, module_like, work)


def _box(value: Any) -> _Box:
    if not isinstance(value, _Box):
        raise ValueError("item added to a non-container")
    return value

"""PyTorch Geometric datasets (``equiaudit[pyg]``): one sample per graph.

Accepted: an ``InMemoryDataset`` as PyG saves it (``InMemoryDataset.save``:
``(data.to_dict(), slices, Data)``, or the older ``(data, slices)``), given as its
``root`` folder (``root/processed/*.pt``), its ``processed`` folder or the ``.pt`` file;
and a ``.pt`` holding a list (or tuple) of ``Data`` graphs (``torch.save(data_list)``).
``pre_transform.pt`` / ``pre_filter.pt`` in ``processed/`` are PyG's bookkeeping and
are skipped; a folder holding several other ``.pt`` files asks for one of them.

Safety: the file is read with ``torch.load(weights_only=True)`` through
:func:`equiaudit.io.safe_load.load_weights_only`, allowing for that call only PyG's
data-carrying classes (``Data``, its ``GlobalStorage`` and its two attribute records;
their ``__setstate__`` only fills ``__dict__``). PyG's own ``InMemoryDataset.load`` /
``fs.torch_load`` are never used: they retry with ``weights_only=False`` when the safe
load fails, which would run a pickle's code. Importing ``torch_geometric`` registers
its classes in torch's process-wide allowlist; this module undoes that registration
(when it made the import) so that checkpoints are read under the same allowlist as
before. (When other code imported ``torch_geometric`` first, its registration stands;
it holds PyG's data classes and containers only.)

Graphs are rebuilt with PyG's API (``InMemoryDataset.get``, i.e. ``separate``), only
those kept by ``samples``. Fields (units as stored):

* ``pos`` <- ``pos``, ``z`` <- ``z`` (per node, padded to the largest graph; ``mask``
  marks the nodes);
* ``energy`` <- ``energy``, else ``y`` when it holds one value per graph;
* ``forces`` <- ``force`` (PyG's MD17 name), else ``forces``;
* any other attribute that ``keys`` names: per node (its first axis is the node count:
  padded ``(N, A, ...)``) or per graph (stacked ``(N, ...)``, a leading axis of 1
  dropped). Per-edge attributes cannot be loaded.

A field is provided when every graph read has it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiaudit.errors import DataError, first_line
from equiaudit.io.data_common import Table, missing_extra, pad
from equiaudit.io.safe_load import DamagedFile, RefusedPickle, load_weights_only

__all__ = ["read_pyg_folder", "read_pyg_file", "read_pyg_object", "looks_like_pyg", "pyg_safe_globals"]

# PyG's bookkeeping files in processed/ (reprs of the transforms), not datasets.
_BOOKKEEPING = ("pre_transform.pt", "pre_filter.pt")
_ENERGY_SOURCES = ("energy", "y")
_FORCE_SOURCES = ("force", "forces")


def _import_pyg():
    """``torch_geometric.data``, imported without widening torch's global allowlist."""
    already = "torch_geometric" in sys.modules
    before = list(torch.serialization.get_safe_globals())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyG's import-time deprecation noise
            import torch_geometric.data as pyg_data
    except ImportError:
        raise missing_extra("PyTorch Geometric data", "pyg", "torch_geometric") from None
    except Exception as e:  # a torch_geometric that does not work with this torch
        raise DataError(f"cannot import torch_geometric: {first_line(e)}") from None
    if not already:
        # `import torch_geometric` calls torch.serialization.add_safe_globals([Data, ...,
        # dict, list, defaultdict, ...]) for the whole process; keep ours per call only.
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    return pyg_data


def pyg_safe_globals(pyg_data=None) -> list[Any]:
    """The globals a PyG ``Data`` file needs: data-carrying classes only."""
    pyg_data = pyg_data or _import_pyg()
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    return [pyg_data.Data, DataEdgeAttr, DataTensorAttr, GlobalStorage]


def _is_pyg(x: Any) -> bool:
    module = x.__module__ if isinstance(x, type) else type(x).__module__
    return (module or "").startswith("torch_geometric.")


def looks_like_pyg(obj: Any) -> bool:
    """Whether a weights-only-loaded object is a PyG dataset (checked without importing PyG)."""
    if isinstance(obj, tuple) and len(obj) == 3 and isinstance(obj[1], Mapping) and _is_pyg(obj[2]):
        return True  # InMemoryDataset.save: (data.to_dict(), slices, data class)
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], Mapping) and _is_pyg(obj[0]):
        return True  # older InMemoryDataset: (data, slices)
    if isinstance(obj, (list, tuple)) and obj and all(_is_pyg(g) for g in obj):
        return True
    return _is_pyg(obj)


def read_pyg_folder(path: Path, keys: dict[str, str], pick: Callable) -> Table:
    """``root`` (with ``processed/``) or the ``processed`` folder itself -> its one dataset file."""
    processed = path / "processed" if (path / "processed").is_dir() else path
    if processed.name != "processed":
        raise DataError(
            f"data path is a directory but not a PyTorch Geometric dataset folder (no processed/ in it): {path}; "
            "pass a data file, a PyG dataset root or its processed folder"
        )
    files = sorted(p for p in processed.glob("*.pt") if p.is_file() and p.name not in _BOOKKEEPING)
    if not files:
        raise DataError(f"{processed} holds no PyTorch Geometric dataset file (*.pt)")
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise DataError(f"{processed} holds several PyTorch Geometric files ({names}); pass one of them as the data path")
    return read_pyg_file(files[0], keys, pick)


def read_pyg_file(path: Path, keys: dict[str, str], pick: Callable) -> Table:
    """A ``.pt`` written by PyG (or a list of ``Data``), loaded weights-only with PyG's data classes."""
    pyg_data = _import_pyg()
    try:
        obj = load_weights_only(path, "cpu", safe_globals=pyg_safe_globals(pyg_data))
    except RefusedPickle as e:
        raise DataError(
            f"{path} needs {e.global_name} to load, which is not one of PyTorch Geometric's data classes; "
            "refused for safety (nothing in it ran)"
        ) from None
    except (OSError, DamagedFile) as e:
        raise DataError(f"cannot read {path} as a torch file: {first_line(e)}") from None
    if isinstance(obj, Mapping) or not looks_like_pyg(obj):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, not a PyTorch Geometric dataset "
            "(InMemoryDataset file or list of Data)"
        )
    return read_pyg_object(obj, path, keys, pick)


def _graph_getter(obj: Any, path: Path, pyg_data) -> tuple[int, Callable[[int], Any]]:
    """(number of graphs, index -> graph), with PyG's own InMemoryDataset for collated files."""
    Data = pyg_data.Data
    if isinstance(obj, tuple) and len(obj) in (2, 3) and isinstance(obj[1], Mapping):
        data, slices = obj[0], obj[1]
        cls = obj[2] if len(obj) == 3 else type(data)
        if not (isinstance(cls, type) and issubclass(cls, Data)):
            raise DataError(f"{path} is a PyTorch Geometric dataset of {getattr(cls, '__name__', cls)} graphs; only Data graphs can be read")
        dataset = pyg_data.InMemoryDataset()  # no root: nothing downloaded or processed
        dataset.data = cls.from_dict(dict(data)) if isinstance(data, Mapping) else data
        dataset.slices = dict(slices)
        return dataset.len(), dataset.get
    graphs = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    for i, graph in enumerate(graphs):
        if not isinstance(graph, Data):
            raise DataError(f"{path}: item {i} is a {type(graph).__name__}; expected PyTorch Geometric Data graphs")
    return len(graphs), graphs.__getitem__


def _attr_names(graph) -> list[str]:
    names = graph.keys() if callable(graph.keys) else graph.keys  # a method since PyG 2.4
    return [str(n) for n in names]


def read_pyg_object(obj: Any, path: Path, keys: dict[str, str], pick: Callable) -> Table:
    """A loaded PyG dataset -> :class:`Table` of the graphs ``pick`` keeps."""
    pyg_data = _import_pyg()
    n, get = _graph_getter(obj, path, pyg_data)
    if n == 0:
        raise DataError(f"{path} holds no graphs")
    index = pick(n)
    rows = list(range(n)) if index is None else index.tolist()
    try:
        graphs = [get(i) for i in rows]
    except Exception as e:  # inconsistent slices, ...
        raise DataError(f"cannot rebuild the graphs of {path} with PyTorch Geometric: {first_line(e)}") from None

    present = set.intersection(*(set(_attr_names(g)) for g in graphs))
    # Every attribute read below must hold numbers (a file is untrusted: `pos="not a tensor"`).
    used = {"pos", "z", *_ENERGY_SOURCES, *_FORCE_SOURCES, *keys.values()}
    for i, graph in zip(rows, graphs):
        for name in sorted(used & set(_attr_names(graph))):
            _check_value(graph[name], path, i, name, per_node=name in ("pos", "z", *_FORCE_SOURCES))
    counts = [_num_nodes(g, path, i) for i, g in zip(rows, graphs)]
    a_max = max(counts)
    arrays: dict[str, Any] = {"mask": np.arange(a_max)[None, :] < np.asarray(counts)[:, None]}
    sources: dict[str, str] = {}
    for field in ("pos", "z"):
        if field in present:
            arrays[field] = _per_node(graphs, field, counts, path)
    for source in _ENERGY_SOURCES:
        if source in present and all(_tensor(g[source]).numel() == 1 for g in graphs):
            arrays["energy"] = np.array([_tensor(g[source]).reshape(()).item() for g in graphs], dtype=np.float64)
            sources["energy"] = source
            break
    for source in _FORCE_SOURCES:
        if source in present:
            arrays["forces"] = _per_node(graphs, source, counts, path)
            sources["forces"] = source
            break

    for key in dict.fromkeys(keys.values()):
        if key in arrays:
            continue
        if key not in present:
            if any(key in _attr_names(g) for g in graphs):
                first = next(i for i, g in zip(rows, graphs) if key not in _attr_names(g))
                raise DataError(f"{path}: attribute '{key}' is missing from graph {first}; every graph needs it")
            continue  # selection reports the missing key with the attributes there are
        arrays[key] = _attribute(graphs, key, counts, path)

    names = sorted(present | set(arrays) - {"mask"})
    return Table(arrays, index=torch.as_tensor(rows, dtype=torch.int64), structured=True, names=names, sources=sources)


def _check_value(value: Any, path: Path, sample: int, name: str, *, per_node: bool) -> None:
    """A field's value in one graph: a real-valued tensor (per-node fields: at least 1-d), or,
    for per-graph fields, a plain number; :class:`DataError` naming file, graph and field."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not (value.dtype.is_floating_point or value.dtype in _INTEGER_DTYPES):
            raise DataError(f"{path}: graph {sample}: field '{name}' is a {value.dtype} tensor, not real numbers")
        if per_node and value.ndim == 0:
            raise DataError(f"{path}: graph {sample}: field '{name}' is a 0-d tensor; expected one row per node")
        return
    if not per_node and isinstance(value, (int, float, bool)):
        return
    raise DataError(f"{path}: graph {sample}: field '{name}' is a {type(value).__name__}, not a tensor")


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _num_nodes(graph, path: Path, sample: int) -> int:
    if "pos" in _attr_names(graph):
        return int(graph.pos.shape[0])
    try:
        n = graph.num_nodes
        return int(n) if n is not None else 0
    except (TypeError, ValueError, AttributeError) as e:  # a num_nodes that is not a count
        raise DataError(f"{path}: graph {sample}: its node count cannot be read ({first_line(e)})") from None


def _per_node(graphs, key: str, counts, path: Path) -> np.ndarray:
    values = [_tensor(g[key]).detach().cpu().numpy() for g in graphs]
    for i, (v, c) in enumerate(zip(values, counts)):
        if v.ndim == 0 or v.shape[0] != c or v.shape[1:] != values[0].shape[1:]:
            raise DataError(f"{path}: '{key}' of a graph has shape {v.shape}, expected one row per node ({c}) like 'pos'")
    return pad(values, max(counts))


def _attribute(graphs, key: str, counts, path: Path) -> np.ndarray:
    """A named attribute: per node (padded) or per graph (stacked); per-edge is refused."""
    values = [g[key] for g in graphs]
    if not all(isinstance(v, (torch.Tensor, int, float, bool)) for v in values):
        kind = next(type(v).__name__ for v in values if not isinstance(v, (torch.Tensor, int, float, bool)))
        raise DataError(f"{path}: attribute '{key}' is a {kind}, not a tensor")
    tensors = [_tensor(v).detach().cpu() for v in values]
    if graphs[0].is_edge_attr(key) and not graphs[0].is_node_attr(key):
        raise DataError(f"{path}: attribute '{key}' is per edge; only per-graph and per-node attributes can be loaded")
    node = any(g.is_node_attr(key) for g in graphs) and all(
        t.ndim >= 1 and t.shape[0] == c for t, c in zip(tensors, counts)
    )
    if node and len({t.shape[1:] for t in tensors}) == 1:
        return pad([t.numpy() for t in tensors], max(counts))
    per_graph = [t[0] if t.ndim >= 1 and t.shape[0] == 1 else t for t in tensors]
    if len({t.shape for t in per_graph}) == 1:
        return torch.stack(per_graph).numpy()
    raise DataError(f"{path}: attribute '{key}' has no common shape across graphs (neither per node nor per graph)")

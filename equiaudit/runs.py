"""Auditing checkpoint files from Python: :func:`audit_checkpoints`, the CLI's audit as a call.

``equiaudit audit CONFIG PATHS`` and ``equiaudit.audit_checkpoints(PATHS, DATA, model=...)``
run the same :class:`~equiaudit.runner.Runner`: the same discovery of checkpoints (files,
run folders, globs; steps, EMA weights, duplicates), the same weights-only loading and key
matching, the same plan, cache and ``OUT`` files. So the rows are the CLI's ``summary.csv``
rows, value for value (tested), and no ``torch.load`` + ``load_state_dict`` is needed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from equiaudit.errors import ConfigError
from equiaudit.result import AuditResult

__all__ = ["audit_checkpoints", "CheckpointAudits"]


class CheckpointAudits(list):
    """The :class:`~equiaudit.result.AuditResult` of every checkpoint audited, in step order
    (checkpoints already in ``out``'s cache with these settings are not re-evaluated and
    appear only in :meth:`rows`). :meth:`rows` are the rows of ``OUT/summary.csv``."""

    def __init__(self, results: Sequence[AuditResult], rows: list[dict], out: Path | None):
        super().__init__(results)
        self._rows = rows
        self.out = out

    def rows(self) -> list[dict]:
        """The ``summary.csv`` rows of every checkpoint (total, then each head), as the CLI writes them."""
        return [dict(row) for row in self._rows]


def audit_checkpoints(paths: str | Path | Sequence[str | Path], data: Any = None, *,
                      model: torch.nn.Module | str | Callable[[], torch.nn.Module] | None = None,
                      config: str | Path | Mapping[str, Any] | None = None, device: str = "auto",
                      out: str | Path | None = None, force: bool = False, **keywords: Any) -> CheckpointAudits:
    """Audit checkpoint files, run folders or globs: the CLI's ``equiaudit audit``, from Python.

    Args:
        paths: one or several checkpoint files, training-run folders or globs (what
            ``equiaudit audit`` takes as ``CHECKPOINT_PATH``); every layout it reads.
        data: as in :func:`equiaudit.audit`: a mapping ``{field: (N, ...)}``, a data file's
            path, batches; None: the config's ``data.path``.
        model: the network the weights are loaded into: an ``nn.Module`` (its weights are
            replaced by each checkpoint's), a factory spec ``"pkg.module:build"`` /
            ``"path/models.py:build"`` (called with ``kwargs=``), or a callable returning one.
            None: the config's ``model.factory``.
        config: a YAML path or a mapping of config keys; keywords override it.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``.
        out: the ``OUT`` folder for ``summary.csv``, ``run.json``, the cache... (as ``--out``);
            None: a temporary folder, removed afterwards. Results are cached (and reused)
            only with ``out`` and the config's own model factory and data file.
        force: recompute checkpoints already in ``out``'s cache.
        **keywords: config keys, as :func:`equiaudit.audit` takes them (``task``, ``heads``,
            ``rotations``, ``samples``, ``weights``, ``prefix``, ``seed``, ...).

    Returns:
        :class:`CheckpointAudits`: a list of :class:`~equiaudit.result.AuditResult` (one per
        checkpoint evaluated, with ``step``, ``checkpoint`` and ``weights`` set) whose
        ``rows()`` are the ``summary.csv`` rows.

    Example::

        results = equiaudit.audit_checkpoints("runs/ff", "data/test.npz", model="models.py:build",
                                              task="force_field", heads={...}, rotations=24)
        for r in results:
            print(r.step, r)
    """
    from equiaudit.api import _dataset, settings
    from equiaudit.fast import pinned
    from equiaudit.io.checkpoints import discover_checkpoints
    from equiaudit.io.layout import OutputFolder
    from equiaudit.io.models import build_model
    from equiaudit.plan import resolve
    from equiaudit.runner import OpenAudit, Runner

    if isinstance(model, str):
        keywords = {"factory": model, **keywords}
        model = None
    config = settings(config, model_given=model is not None, data_given=data is not None, **keywords)
    paths = [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
    if not paths:
        paths = [str(config.checkpoints)] if config.checkpoints else []
    if not paths:
        raise ConfigError("audit_checkpoints: no checkpoints: give paths or set checkpoints.path in the config")
    dataset, index = _dataset(data, config)
    plan = resolve(config, dataset, device=device)
    prepared = pinned(plan.prepare(dataset, index=index), plan.device)
    if model is None:
        network = build_model(config.model.factory, config.model.kwargs, config.source.parent if config.source else None)
    elif isinstance(model, torch.nn.Module):
        network = model
    elif callable(model):
        network = model()
        if not isinstance(network, torch.nn.Module):
            raise ConfigError(f"audit_checkpoints: model() returned {type(network).__name__}, not a torch.nn.Module")
    else:
        raise ConfigError(f"audit_checkpoints: model= must be an nn.Module, a factory spec or a callable, "
                          f"got {type(model).__name__}")
    network = network.to(device=plan.device, dtype=plan.model_dtype)
    opened = OpenAudit(config, plan, network, prepared)
    refs = discover_checkpoints(paths)
    # The cache keys on the factory's and the data file's identity: an in-memory model or
    # data has none, so those audits are always evaluated (as with a temporary out).
    use_cache = out is not None and model is None and data is None and config.data.path is not None
    with tempfile.TemporaryDirectory(prefix="equiaudit_") as scratch:
        folder = OutputFolder(out if out is not None else scratch)
        with Runner(opened, folder, force=force, use_cache=use_cache) as runner:
            results, rows = runner.run(refs)
    return CheckpointAudits(results, rows, None if out is None else Path(out))

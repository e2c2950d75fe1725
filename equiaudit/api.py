"""The Python API: :func:`audit` (one call) and :class:`EquivarianceMetric` (validation loops).

Both take the YAML config's keys as keyword arguments — same names, defaults, checks and
one-line :class:`~equiaudit.errors.EquiauditError` s — with the nested ones reached by short
names (``inputs=``/``outputs=`` for ``model.inputs``/``model.outputs``, ``rotations=``,
``sampling=`` for ``group.*``, ``samples=``, ``keys=`` for ``data.*``, ``by=`` for
``breakdown.by``; see :data:`equiaudit.io.config.KEYWORDS`); ``config=`` takes a YAML path or
a mapping that the keywords override. The model is any ``nn.Module`` the caller built and
loaded: nothing is read from disk that the caller did not name. Both run the same plan as
the CLI (:mod:`equiaudit.plan`), so ``result.rows()`` are the rows ``summary.csv`` gets.

The model is put in ``eval()`` for the audit and given back in the mode it was in. It is
moved or cast only when asked: ``device=`` other than its own, or ``dtype=``.

:class:`Auditor` is :func:`audit` split in two: the settings are checked and the data read
and prepared (task fields, each sample's rotations) once, then every call audits one model
on that prepared data. ``audit(model, data, **kw)`` is ``Auditor(data, **kw)(model)``; the
training callbacks (:mod:`equiaudit.lightning`, :mod:`equiaudit.hf`) keep one ``Auditor``
for a whole run, so repeated audits cost only the forward passes and the statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from equiaudit.adapters import as_force_field, report_cost
from equiaudit.errors import ConfigError, DataError
from equiaudit.io.config import AuditConfig, parse_config, settings_mapping
from equiaudit.io.data import canonical_dataset, load_dataset, select
from equiaudit.io.memory import as_dataset
from equiaudit.plan import AuditPlan, Prepared, evaluation_mode, resolve, resolve_device
from equiaudit.result import AuditResult
from equiaudit.stats import SampleStats

__all__ = ["audit", "Auditor", "EquivarianceMetric", "settings"]


def settings(config: str | Path | Mapping[str, Any] | None = None, *, model_given: bool = True, data_given: bool = True,
             **keywords: Any) -> AuditConfig:
    """Validated settings from ``config`` and keywords (see the module docstring)."""
    raw, source = settings_mapping(config, keywords)
    return parse_config(raw, source, model_given=model_given, data_given=data_given)


def _place(model: torch.nn.Module, plan: AuditPlan) -> None:
    """Move the model to the plan's device and dtype where it is not there already."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    param = next(iter(model.parameters()), None)
    if param is not None and param.device != plan.device:
        model.to(plan.device)
    if plan.model_dtype is not None:
        model.to(dtype=plan.model_dtype)


def _dataset(data: Any, config: AuditConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The canonical dataset and each sample's index in the source (file or mapping)."""
    if data is None:
        if config.data.path is None:
            raise ConfigError("no data: pass data= (arrays, a file path, or batches) or set data.path in the config")
        data = config.data.path
    if isinstance(data, (str, Path)):
        return load_dataset(data, config.data.keys, samples=config.data.samples, subset_seed=config.data.subset_seed,
                            return_index=True, follow_external=config.data.follow_external, max_atoms=config.data.max_atoms,
                            structures=config.data.structures)
    return select(as_dataset(data, config.data.keys), config.data.samples, config.data.subset_seed)


class Auditor:
    """Settings and prepared data, fixed once; ``auditor(model)`` audits one model on them.

    ::

        auditor = equiaudit.Auditor(data, task="force_field", rotations=24, seed=0)
        for step in ...:
            result = auditor(model)        # an AuditResult, as from equiaudit.audit()

    Args: as :func:`audit` (``data``, ``config``, ``device``, config keywords). Everything
    that does not depend on the model is done here: the settings are validated, the data
    read (a file, a mapping, batches) and prepared by the plan — the task's derived fields
    and each sample's group elements ``(N, K, ...)``, drawn from the seed and the sample's
    id — so every call sees the same samples, rotations and task noise (common random
    numbers across the calls, as across the checkpoints of ``equiaudit audit``).

    The plan (:class:`~equiaudit.plan.AuditPlan`) is resolved at the first call, because
    ``device="auto"`` means the model's own device; a later model on another device gets
    its own plan over the same prepared data.
    """

    def __init__(self, data: Any = None, *, config: str | Path | Mapping[str, Any] | None = None,
                 device: str | torch.device | None = "auto", **keywords: Any):
        self.config = settings(config, model_given=True, data_given=data is not None, **keywords)
        self.dataset, self.index = _dataset(data, self.config)
        self.device = device
        self._plans: dict[torch.device, AuditPlan] = {}
        self._prepared: Prepared | None = None

    def plan(self, model: torch.nn.Module | None = None) -> AuditPlan:
        """The plan for ``model`` (its device decides ``device="auto"``); resolved once per device."""
        device = resolve_device(self.device, model)
        if device not in self._plans:
            self._plans[device] = resolve(self.config, self.dataset, device=device, model=model)
        return self._plans[device]

    def prepared(self, plan: AuditPlan | None = None) -> Prepared:
        """The prepared data ``(N, ...)`` (on the CPU; batches move to the plan's device).
        Preparation depends on the settings only, so one serves every plan of this auditor."""
        if self._prepared is None:
            self._prepared = (plan or self.plan()).prepare(self.dataset, index=self.index)
        return self._prepared

    def __len__(self) -> int:
        return len(next(iter(self.dataset.values())))

    def __call__(self, model: torch.nn.Module) -> AuditResult:
        """Audit ``model`` (in eval mode, without gradients; its training flags restored)."""
        # A metatomic AtomisticModel, a TorchSim model or an ASE calculator: the padded signature.
        model = as_force_field(_family_model(model))
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        plan = self.plan(model)
        _place(model, plan)
        result = plan.audit(model, self.prepared(plan))
        report_cost(model)
        return result


def _family_model(model: Any) -> Any:
    """A metatomic ``AtomisticModel`` the caller loaded (their choice to run it) behind the
    padded force-field signature (:mod:`equiaudit.zoo.families.metatrain`); anything else as is."""
    from equiaudit.zoo.families.metatrain import is_atomistic_model, metatomic_force_field

    return metatomic_force_field(model) if is_atomistic_model(model) else model


def audit(model: torch.nn.Module, data: Any = None, *, config: str | Path | Mapping[str, Any] | None = None,
          device: str | torch.device | None = "auto", **keywords: Any) -> AuditResult:
    """Audit one model on rotation orbits of ``data``: the share of its loss due to imperfect equivariance.

    Args:
        model: an ``nn.Module``, built and loaded (any device); or a TorchSim ``ModelInterface``
            or an ASE ``Calculator`` (wrapped by :mod:`equiaudit.adapters`; an ASE calculator is
            evaluated one structure at a time, and a warning gives its measured cost per structure).
        data: a mapping ``{field: (N, ...)}`` of arrays or tensors, a path to any data file
            the CLI reads, or an iterable of such mappings (batches; padded and joined).
            None: ``data.path`` of the config.
        config: a YAML path or a mapping of config keys; keywords override it.
        device: ``auto`` (the model's own device), ``cpu``, ``cuda``.
        **keywords: config keys (``task``, ``fields``, ``heads``, ``inputs``, ``outputs``,
            ``group``, ``rotations``, ``samples``, ``seed``, ``local``, ``by``, ``float_floor``, ...).

    Returns:
        :class:`~equiaudit.result.AuditResult`: ``result.total.rel_equiv_error``,
        ``result.heads["forces"].loss_aug``, ``result.rows()``...

    To audit many models (checkpoints, training steps) on the same data, keep an
    :class:`Auditor`: it reads and prepares the data once.

    Example::

        result = equiaudit.audit(model, {"pos": pos, "y": y}, task="custom", fields={"pos": "vector"},
                                 heads={"out": {"rep": "vector", "target": "y", "loss": "mse"}},
                                 inputs=["pos"], outputs=["out"], rotations=24, seed=0)
    """
    return Auditor(data, config=config, device=device, **keywords)(model)


class EquivarianceMetric:
    """The audit as a stateful metric for validation loops (torchmetrics-style).

    ::

        metric = equiaudit.EquivarianceMetric(task="force_field", rotations=16, seed=0)
        for batch in val_loader:
            metric.update(model, batch)
        result = metric.compute()   # an AuditResult, as from equiaudit.audit()
        metric.reset()

    ``update`` evaluates the batch at once (the model may change between epochs: call
    :meth:`reset` between them) and keeps only per-sample statistics. The rotations and task
    noise of a sample depend only on the seed and its id — by default its position in the
    stream (under ``torch.distributed``: ``rank + world_size · i`` for the i-th sample this
    rank sees, the order of a ``DistributedSampler`` without shuffling) — so successive
    checkpoints evaluated on the same loader get the low-noise differences of common random
    numbers. Pass ``sample_ids=`` (e.g. the dataset indices) to fix them yourself; a sample
    id seen twice (a ``DistributedSampler`` pads ranks with repeats) is counted once.

    Under ``torch.distributed``, :meth:`compute` gathers every rank's statistics, so every
    rank returns what one process seeing all the batches would.
    ``samples=N`` stops counting after the first N sample ids. ``target_ci=W``: the loop may
    stop once :attr:`target_reached` (the 95 % interval of the total REE is at most ±W), as
    ``--target-ci`` does; the metric never stops by itself.
    """

    def __init__(self, *, config: str | Path | Mapping[str, Any] | None = None, device: str | torch.device | None = "auto",
                 process_group: Any = None, **keywords: Any):
        self.config = settings(config, model_given=True, data_given=True, **keywords)
        self.device = device
        self.process_group = process_group
        self.plan: AuditPlan | None = None
        self.reset()

    def _rank_world(self) -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    def reset(self) -> None:
        """Forget every sample seen (the plan, fixed by the first batch, is kept)."""
        rank, _ = self._rank_world()
        self._stats = SampleStats(self.plan.heads if self.plan else [], piece=rank)
        self._seen = 0

    def update(self, model: torch.nn.Module, batch: Mapping[str, Any], sample_ids: Any = None) -> None:
        """Evaluate ``model`` on one batch ``{field: (B, ...)}`` and keep its statistics."""
        model = as_force_field(_family_model(model))
        if not isinstance(batch, Mapping):
            raise DataError(f"update() takes a batch mapping field → (B, ...), got {type(batch).__name__}")
        data = canonical_dataset(batch, self.config.data.keys, origin="batch")
        b = len(next(iter(data.values())))
        rank, world = self._rank_world()
        if sample_ids is None:
            ids = rank + world * torch.arange(self._seen, self._seen + b, dtype=torch.int64)
        else:
            ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1).cpu()
            if len(ids) != b:
                raise DataError(f"update(): {len(ids)} sample_ids for a batch of {b} samples")
        self._seen += b
        limit = self.config.data.samples
        if limit is not None:
            keep = ids < limit
            if not keep.any():
                return
            data, ids = {k: v[keep] for k, v in data.items()}, ids[keep]
        if self.plan is None:
            self.plan = resolve(self.config, data, device=self.device, model=model)
            self._stats = SampleStats(self.plan.heads, piece=rank)
        _place(model, self.plan)
        prepared = self.plan.prepare(data, ids, index=ids)
        with evaluation_mode(model):
            self.plan.evaluate_batch(model, prepared.data, prepared.ids, prepared.elements, stats=self._stats, index=ids)

    def _gathered(self) -> SampleStats:
        """Every rank's statistics merged (a collective under ``torch.distributed``)."""
        import torch.distributed as dist

        stats = self._stats
        _, world = self._rank_world()
        if world > 1:
            pieces: list[Any] = [None] * world
            dist.all_gather_object(pieces, stats, group=self.process_group)
            stats = SampleStats.merge(pieces)
        return stats

    def compute(self) -> AuditResult:
        """The audit of every sample seen so far, on every rank the same."""
        if self.plan is None:
            raise DataError("compute() before any update(): the metric has seen no samples")
        return self.plan.summarize(self._gathered())

    @property
    def target_reached(self) -> bool:
        """``target_ci=W`` given and the samples seen so far (on every rank: a collective
        under ``torch.distributed``, so call it on all ranks) put the 95 % interval of the
        total REE within ±W, with at least 32 samples — the rule ``--target-ci`` stops on.
        ::

            for batch in val_loader:
                metric.update(model, batch)
                if metric.target_reached:
                    break
        """
        if self.config.target_ci is None:
            raise ConfigError("target_reached needs target_ci=W (the half-width of the 95 % interval, a fraction)")
        if self.plan is None:
            return False
        return self.plan.target_reached(self._gathered())

"""What the training-loop callbacks share, free of any framework: one audit at one step.

:mod:`equiaudit.lightning` and :mod:`equiaudit.hf` only adapt hooks and logging; the audit
itself is :class:`StepAudit`: an :class:`~equiaudit.Auditor` (settings checked, data
prepared once), the choice of the sub-module to audit (:func:`pick_model`), the protection
of training's random stream, the result's identity (``run``, ``checkpoint="step=S"``,
``step``, ``epoch``, ``weights``) and, with ``out=``, the merge of its rows into an
output folder that ``equiaudit compare`` reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from equiaudit.api import Auditor
from equiaudit.errors import ConfigError
from equiaudit.plan import AuditPlan
from equiaudit.result import AuditResult

__all__ = ["ModelPicker", "pick_model", "StepAudit"]

ModelPicker = str | Callable[[torch.nn.Module], torch.nn.Module] | None


def pick_model(module: torch.nn.Module, model: ModelPicker) -> torch.nn.Module:
    """``module`` itself (``model=None``), the sub-module at a dotted attribute path
    (``"net"``, ``"model.backbone"``), or ``model(module)``. Raises :class:`ConfigError`
    when the path or the result is not a module."""
    if model is None:
        picked = module
    elif isinstance(model, str):
        picked = module
        for part in model.split("."):
            if not hasattr(picked, part):
                raise ConfigError(f"model={model!r}: {type(picked).__name__} has no attribute {part!r}")
            picked = getattr(picked, part)
    elif callable(model):
        picked = model(module)
    else:
        raise ConfigError(f"model= must be an attribute path such as 'net' or a callable, got {type(model).__name__}")
    if not isinstance(picked, torch.nn.Module):
        raise ConfigError(f"model={model!r} gives a {type(picked).__name__}, not a torch.nn.Module")
    return picked


def check_every(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name}={value!r} must be an integer ≥ 1 (or None)")
    return value


class StepAudit:
    """Audits of one training run, one per step (see the module docstring).

    Args:
        data, config, device, **settings: as :class:`~equiaudit.Auditor`.
        model: which module to audit, see :func:`pick_model`.
        out: also merge every audit's rows into this output folder.
        prefix: the logged scalars' first part (:func:`equiaudit.result.scalars`).
        source: who audits (written to ``run.json``).

    Attributes:
        results: ``[(step, AuditResult)]`` of every audit made, in order.
        plan: the plan of the latest audit (None before the first).
    """

    def __init__(self, data: Any = None, *, model: ModelPicker = None, out: str | Path | None = None,
                 prefix: str = "equiaudit", config: str | Path | Mapping[str, Any] | None = None,
                 device: str | torch.device | None = "auto", source: str = "", **settings: Any):
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"prefix={prefix!r} must be a non-empty string")
        self.auditor = Auditor(data, config=config, device=device, **settings)
        self.model = model
        self.out = None if out is None else Path(out)
        self.prefix = prefix
        self.source = source
        self.results: list[tuple[int, AuditResult]] = []
        self.plan: AuditPlan | None = None  # the plan of the latest audit
        self._last_step: int | None = None
        self._started = time.time()

    def check(self, module: torch.nn.Module) -> None:
        """Resolve the plan against ``module`` now: a bad model pick or field name fails
        before training rather than at the first audit."""
        self.auditor.plan(pick_model(module, self.model))

    def due(self, step: int) -> bool:
        """Whether ``step`` has not been audited yet (two hooks at one step audit once)."""
        return step != self._last_step

    def __call__(self, module: torch.nn.Module, *, step: int, epoch: float | None = None, run: str = "",
                 weights: str | None = None) -> AuditResult:
        """Audit ``pick_model(module)`` as it is now; the result carries the step's identity."""
        self._last_step = step
        model = pick_model(module, self.model)
        # equiaudit draws from its own seeded generators, but a model may draw from the global
        # stream in its forward; the fork keeps training's random stream (dropout, shuffling,
        # augmentation) the same with or without the audit.
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            result = self.auditor(model)
        self.plan = self.auditor.plan(model)
        result = result.with_identity(run=run, checkpoint=f"step={step}", step=step, epoch=epoch, weights=weights)
        self.results.append((step, result))
        if self.out is not None:
            self._record(result, model)
        return result

    def scalars(self, result: AuditResult) -> dict[str, float]:
        return result.scalars(self.prefix)

    def describe(self, result: AuditResult) -> dict[str, Any]:
        """What was audited, for a logger's hyperparameters (logged once)."""
        plan, p = self.plan, self.prefix
        return {f"{p}/weights": result.weights or "raw", f"{p}/config_hash": result.config_hash, f"{p}/group": plan.group.name,
                f"{p}/rotations": plan.group.n_elements, f"{p}/samples": len(self.auditor)}

    def announcement(self, result: AuditResult) -> str:
        plan = self.plan
        what = "averaged (EMA) weights" if result.weights == "ema" else "model's own (raw) weights"
        return (f"equiaudit: auditing the {what} on {len(self.auditor)} samples × {plan.group.n_elements} rotations "
                f"({plan.group.label}); logging {self.prefix}/rel_equiv_error and {self.prefix}/skill")

    def _record(self, result: AuditResult, model: torch.nn.Module) -> None:
        from equiaudit.io.layout import OutputFolder
        from equiaudit.runner import OpenAudit, run_metadata

        plan = self.plan
        meta = run_metadata(OpenAudit(self.auditor.config, plan, model, self.auditor.prepared(plan)), self._started)
        meta["source"] = self.source
        meta["checkpoints"] = [{"run": r.run, "name": r.checkpoint, "step": s, "status": r.status, "weights": r.weights}
                               for s, r in self.results]
        folder = OutputFolder(self.out)
        landscapes = [(result.identity(), result.landscape)] if result.landscape is not None else []
        folder.record(result.tables(), metadata=meta, landscapes=landscapes)


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    """The CUDA devices whose random state the audit could touch (the model's)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})

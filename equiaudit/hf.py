"""Hugging Face ``Trainer``: audit the model being trained every N steps, into the trainer's logs.

::

    from equiaudit.hf import EquivarianceTrainerCallback

    trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]), train_dataset=...)
    EquivarianceTrainerCallback(val_data, every_n_steps=500, task="force_field", rotations=24,
                                samples=256, seed=0).attach(trainer)
    trainer.train()

Needs ``transformers`` (``pip install 'equiaudit[hf]'``; ``Trainer`` itself also needs
``accelerate``). The settings and data are those of :func:`equiaudit.audit`, prepared once
(:class:`equiaudit.callbacks.StepAudit`, the core the Lightning callback uses too); with the
same settings and seed the figure logged at step ``s`` is what ``equiaudit audit CONFIG
OUTPUT_DIR/checkpoint-s`` reports.

**Hooks.** ``on_step_end`` when ``state.global_step`` (optimizer steps, the number of the
``checkpoint-N`` folder saved right after this hook) is a multiple of ``every_n_steps``;
``on_evaluate`` with ``on_evaluate=True`` (a step already audited is not audited again);
``on_train_begin`` resolves the plan against the model, so a bad setting fails before the
first step. The model audited is ``kwargs["model"]`` (the trainer's unwrapped model) or
what ``model=`` picks from it (an attribute path or a callable), on its own device, in eval
mode (training flags restored), without gradients; training's random stream is untouched.

**Logging.** A ``TrainerCallback`` is not handed the trainer, and its ``on_log`` runs after
the ``report_to`` integrations have written, so the figures go through ``trainer.log``
(:meth:`attach` keeps the trainer): into ``state.log_history`` (and so
``trainer_state.json``) and every integration (TensorBoard, W&B, ...), at
``state.global_step``, as ``equiaudit/rel_equiv_error``, ``equiaudit/loss_aug``,
``equiaudit/loss_sym`` and ``equiaudit/<head>/...`` (:func:`equiaudit.result.scalars`);
the TensorBoard and W&B integrations file what ``Trainer.log`` gets during training under
``train/`` (``train/equiaudit/rel_equiv_error``), as they do the training loss.
Without :meth:`attach` (the callback only passed in ``callbacks=[...]``) they are appended
to ``state.log_history`` alone, and a warning says so once. ``out=DIR`` merges the rows
(``weights`` = ``raw``: the Trainer keeps no averaged weights) into ``DIR/summary.csv``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("equiaudit.hf needs transformers: pip install 'equiaudit[hf]'") from None

from equiaudit.callbacks import ModelPicker, StepAudit, check_every
from equiaudit.errors import ConfigError
from equiaudit.result import AuditResult

__all__ = ["EquivarianceTrainerCallback"]

log = logging.getLogger(__name__)


class EquivarianceTrainerCallback(TrainerCallback):
    """Audit ``kwargs["model"]`` at training steps and log its REE (see the module docstring).

    Args:
        data: anything :func:`equiaudit.audit` takes (a mapping of arrays, a data-file path,
            an iterable of batches); None: ``data.path`` of ``config``.
        every_n_steps: audit when ``state.global_step`` is a multiple of it (None: never).
        on_evaluate: also audit after every evaluation.
        model: which module to audit (None: the trainer's model; an attribute path; a callable).
        trainer: the ``Trainer`` whose ``log`` gets the figures (or call :meth:`attach`).
        out: also merge the rows into this output folder.
        run: the rows' ``run`` (default: ``args.run_name``, else the output folder's name).
        prefix, config, device, **settings: as for the Lightning callback and ``equiaudit.audit``.

    Attributes:
        results: ``[(step, AuditResult)]`` of every audit made, in order.
    """

    def __init__(self, data: Any = None, every_n_steps: int | None = None, *, on_evaluate: bool = False,
                 model: ModelPicker = None, trainer: Any = None, out: str | Path | None = None, run: str | None = None,
                 prefix: str = "equiaudit", config: str | Path | Mapping[str, Any] | None = None,
                 device: str | torch.device | None = "auto", **settings: Any):
        if "weights" in settings:  # the config key checkpoints.weights: the Trainer keeps no averaged weights
            raise ConfigError("weights= does not apply here: the Trainer callback audits the model's own weights")
        self.every_n_steps = check_every("every_n_steps", every_n_steps)
        if every_n_steps is None and not on_evaluate:
            raise ConfigError("EquivarianceTrainerCallback: nothing would be audited; give every_n_steps=N or on_evaluate=True")
        self.audit = StepAudit(data, model=model, out=out, prefix=prefix, config=config, device=device,
                               source="equiaudit.hf.EquivarianceTrainerCallback", **settings)
        self.audit_on_evaluate = on_evaluate
        self.trainer = trainer
        self.run = run
        self._announced = False

    @property
    def results(self) -> list[tuple[int, AuditResult]]:
        return self.audit.results

    def attach(self, trainer: Any) -> EquivarianceTrainerCallback:
        """Log through ``trainer.log`` and add this callback to ``trainer`` (once); returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------ TrainerCallback hooks

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.audit.check(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.every_n_steps
        if every is not None and state.global_step > 0 and state.global_step % every == 0:
            self.audit_now(args, state, model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if self.audit_on_evaluate:
            self.audit_now(args, state, model)

    # ------------------------------------------------------------------ the audit

    def audit_now(self, args, state, model: torch.nn.Module) -> AuditResult | None:
        """Audit at ``state.global_step`` and log it (None: already audited, or not process zero)."""
        step = state.global_step
        if model is None or not self.audit.due(step) or not state.is_world_process_zero:
            return None
        run = self.run or getattr(args, "run_name", None) or Path(args.output_dir).name
        result = self.audit(model, step=step, epoch=state.epoch, run=run, weights="raw")
        metrics = self.audit.scalars(result)
        if not self._announced:
            self._announced = True
            log.info(self.audit.announcement(result))
            if self.trainer is None:
                log.warning("EquivarianceTrainerCallback is not attached to the Trainer: its figures go to "
                            "trainer.state.log_history only; use callback.attach(trainer) to reach report_to loggers")
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:  # the record Trainer.log would have made
            state.log_history.append({**metrics, "epoch": state.epoch, "step": step})
        return result

"""Lightning: audit the module being trained, every N optimizer steps, into the run's own loggers.

::

    from lightning.pytorch.callbacks import EMAWeightAveraging
    from equiaudit.lightning import EquivarianceCallback

    audit = EquivarianceCallback(val_data, every_n_train_steps=500, model="net",
                                 task="force_field", rotations=24, samples=256, seed=0)
    trainer = Trainer(callbacks=[EMAWeightAveraging(decay=0.999), audit], logger=CSVLogger("logs"))

Needs the ``lightning`` package (``pip install 'equiaudit[lightning]'``, Lightning ≥ 2.2; the
unified ``lightning`` package, not the older ``pytorch_lightning`` namespace).

**One engine.** The settings and the data are those of :func:`equiaudit.audit` (the YAML
config's keys as keywords, or ``config=`` a YAML file). They are checked, the data read and
prepared (the task's fields, every sample's rotations) once, when the callback is made, by an
:class:`equiaudit.Auditor`; each audit then runs the plan's forward passes only. With the
same settings and seed, the figure logged at step ``s`` is what ``equiaudit audit CONFIG
CKPT`` reports for the checkpoint saved at step ``s`` (same samples, same rotations).

**Hooks.**

* ``on_train_batch_end``: when ``trainer.global_step`` (optimizer steps taken, the step a
  ``ModelCheckpoint(every_n_train_steps=N)`` file is named after) is a multiple of
  ``every_n_train_steps``, once per optimizer step (gradient accumulation calls the hook
  for every micro-batch; only the first call at a new step audits).
* ``on_validation_end`` (with ``on_validation_end=True``): after each validation run, not
  during the sanity check. This hook comes after ``on_validation_epoch_end``, where a
  ``WeightAveraging`` callback swaps its averaged weights back out of the module, so the
  weights audited are the ones training goes on with (and the averaged copy, when used).
  A step already audited is not audited again.
* ``setup`` (``stage="fit"``): resolves the plan against the module (field names, device),
  so a bad setting fails before the first training step rather than at step N.

**Logging.** The figures go to every logger of the trainer as ``logger.log_metrics(metrics,
step=trainer.global_step)``: ``{prefix}/rel_equiv_error``, ``{prefix}/loss_aug``,
``{prefix}/loss_sym`` (the weighted total) and ``{prefix}/{head}/rel_equiv_error``,
``.../loss_aug``, ``.../loss_sym`` per head (:func:`equiaudit.result.scalars`). Not
``pl_module.log``: Lightning refuses it in ``on_validation_end``, and in
``on_train_batch_end`` it reaches the loggers only at Lightning's own logging steps and at
its index of the batch, not at the step audited (measured, ``log_every_n_steps=7``: a
value logged at step 10 was filed at step 13, the one of step 20 at 20 and again at 27). The
figures are also put in ``trainer.callback_metrics`` (as tensors), so
``ModelCheckpoint(monitor="equiaudit/rel_equiv_error")`` or ``EarlyStopping`` can use them
at the same step. Which weights were audited is said once, when the first audit is made:
an info line and ``logger.log_hyperparams({"equiaudit/weights": "ema" | "raw", ...})``.

**The model audited** is the ``LightningModule`` itself, or what ``model=`` picks from it:
an attribute path (``model="net"``, ``model="model.backbone"``) or a callable
``model=lambda module: module.net``; it must be the callable the settings' ``inputs``
describe. It is audited on its own device, in eval mode with every submodule's training
flag restored afterwards, under ``torch.inference_mode`` (or, for ``grad: true`` models,
with gradients taken with respect to the inputs only): parameters, their ``.grad`` and the
global random state are left as they were.

**Weight averaging.** ``weights="auto"`` (default): when a Lightning ``WeightAveraging``
callback (``EMAWeightAveraging``, or SWA through the base class) is in ``trainer.callbacks``,
the averaged copy it maintains (its ``AveragedModel``, attribute ``_average_model``; the
model audited is ``_average_model.module``, picked from by ``model=`` the same way) is
audited and the rows' ``weights`` column says ``ema``; without one the module's own
weights are, ``raw``. ``weights="raw"`` audits the module's own weights even then;
``weights="ema"`` requires an averaging callback. With step audits, the averaging callback
must come before this one in ``callbacks=[...]`` (``setup`` raises a ConfigError
otherwise): both act in ``on_train_batch_end``, in list order, and the average must be
updated for the step before it is audited (a
``ModelCheckpoint`` always runs last, so its file holds that updated average as
``state_dict`` — what ``equiaudit audit`` reads — and the raw weights as
``current_model_state``).

**Files.** ``out=DIR`` also merges every audit's ``summary.csv`` rows (checkpoint
``step=S``, ``run`` = ``run=`` or the logger's ``name/version``) and ``breakdown.csv`` rows
into ``DIR`` through :class:`~equiaudit.io.layout.OutputFolder`, under its lock, so
``equiaudit compare DIR ...`` reads them beside CLI audits.

Under distributed training the audit runs on global rank 0 only (Lightning's loggers write
from rank 0 only); other ranks skip it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("equiaudit.lightning needs Lightning: pip install 'equiaudit[lightning]'") from None

try:  # Lightning >= 2.5; older releases have no weight-averaging callback to detect
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover
    WeightAveraging = None

from equiaudit.callbacks import ModelPicker, StepAudit, check_every
from equiaudit.errors import ConfigError
from equiaudit.io.config import WEIGHT_SETS
from equiaudit.result import AuditResult

__all__ = ["EquivarianceCallback", "averaging_callback"]


def averaging_callback(trainer: pl.Trainer) -> Any | None:
    """The first ``WeightAveraging`` callback (e.g. ``EMAWeightAveraging``) of the trainer, or None."""
    if WeightAveraging is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)), None)


class EquivarianceCallback(Callback):
    """Audit the module being trained and log its REE at training steps (see the module docstring).

    Args:
        data: the audit's data, anything :func:`equiaudit.audit` takes: a mapping
            ``{field: (N, ...)}``, a data-file path, an iterable of batches (a DataLoader of
            dicts); None: ``data.path`` of ``config``. Read and prepared once, here.
        every_n_train_steps: audit when ``trainer.global_step`` is a multiple of it (None: never).
        on_validation_end: also audit after every validation run.
        model: which module to audit: None (the LightningModule), an attribute path
            (``"net"``), or a callable ``module -> nn.Module``.
        weights: ``auto`` (the averaged weights when a WeightAveraging callback is active,
            else the module's own), ``raw`` or ``ema``.
        out: also merge the rows into this output folder (``summary.csv``, ``breakdown.csv``).
        run: the ``run`` of those rows (default: the logger's ``name/version``, else ``lightning``).
        prefix: the metric names' first part.
        config: a YAML config (path or mapping) the keywords override, as for ``equiaudit.audit``.
        device: ``auto`` (the audited module's own device), ``cpu`` or ``cuda``.
        **settings: config keys (``task``, ``fields``, ``heads``, ``inputs``, ``outputs``,
            ``rotations``, ``samples``, ``seed``, ``batch_size``, ...). ``weights`` and
            ``prefix`` are this callback's own (above), not ``checkpoints.weights/prefix``.

    Attributes:
        results: ``[(step, AuditResult)]`` of every audit made, in order.
        weights_used: ``"ema"`` or ``"raw"`` once known (at ``setup``).
    """

    def __init__(self, data: Any = None, every_n_train_steps: int | None = None, *, on_validation_end: bool = False,
                 model: ModelPicker = None, weights: str = "auto", out: str | Path | None = None, run: str | None = None,
                 prefix: str = "equiaudit", config: str | Path | Mapping[str, Any] | None = None,
                 device: str | torch.device | None = "auto", **settings: Any):
        super().__init__()
        self.every_n_train_steps = check_every("every_n_train_steps", every_n_train_steps)
        if every_n_train_steps is None and not on_validation_end:
            raise ConfigError("EquivarianceCallback: nothing would be audited; give every_n_train_steps=N or on_validation_end=True")
        if weights not in WEIGHT_SETS:
            raise ConfigError(f"weights={weights!r} is not allowed; allowed: {', '.join(WEIGHT_SETS)}")
        self.audit = StepAudit(data, model=model, out=out, prefix=prefix, config=config, device=device,
                               source="equiaudit.lightning.EquivarianceCallback", **settings)
        self.audit_on_validation_end = on_validation_end
        self.weights = weights
        self.run = run
        self.weights_used: str | None = None
        self._announced = False

    @property
    def results(self) -> list[tuple[int, AuditResult]]:
        return self.audit.results

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        averager = self._weights(trainer)
        if averager is not None and self.every_n_train_steps is not None:
            callbacks = list(trainer.callbacks)
            if callbacks.index(averager) > callbacks.index(self):
                raise ConfigError(f"put {type(averager).__name__} before EquivarianceCallback in callbacks=[...]: "
                                  "the average must be updated for a step before that step is audited")
        self.audit.check(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self.every_n_train_steps
        if every is not None and trainer.global_step > 0 and trainer.global_step % every == 0:
            self.audit_now(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.audit_on_validation_end and not trainer.sanity_checking:
            self.audit_now(trainer, pl_module)

    # ------------------------------------------------------------------ the audit

    def _weights(self, trainer: pl.Trainer) -> Any | None:
        """Decide (once) which weights are audited; returns the averaging callback when it is theirs."""
        averager = averaging_callback(trainer)
        if self.weights == "ema" and averager is None:
            raise ConfigError("weights='ema' but the trainer has no WeightAveraging callback (e.g. EMAWeightAveraging)")
        if self.weights_used is None:
            self.weights_used = "ema" if averager is not None and self.weights != "raw" else "raw"
        return averager if self.weights_used == "ema" else None

    def target(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The module the audit starts from (``model=`` then picks from it): the averaged
        copy a WeightAveraging callback keeps, or the LightningModule."""
        averager = self._weights(trainer)
        if averager is None:
            return pl_module
        averaged = getattr(averager, "_average_model", None)  # an AveragedModel, made in the averager's setup("fit")
        if averaged is None:
            raise ConfigError(f"{type(averager).__name__} holds no averaged model yet (it is made when fit starts)")
        return averaged.module

    def run_name(self, trainer: pl.Trainer) -> str:
        if self.run is not None:
            return self.run
        logger = trainer.logger
        if logger is None:
            return "lightning"
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        return f"{logger.name}/{version}" if logger.name else version

    def audit_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AuditResult | None:
        """Audit at ``trainer.global_step`` and log it (the hooks call this; None when the step
        was already audited or this is not global rank 0)."""
        step = trainer.global_step
        if not self.audit.due(step) or not trainer.is_global_zero:
            return None
        module = self.target(trainer, pl_module)
        result = self.audit(module, step=step, epoch=trainer.current_epoch, run=self.run_name(trainer),
                            weights=self.weights_used)
        metrics = self.audit.scalars(result)
        if not self._announced:
            self._announced = True
            rank_zero_info(self.audit.announcement(result))
            for logger in trainer.loggers:
                logger.log_hyperparams(self.audit.describe(result))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        # float64: the figures as computed (Lightning's own metrics are float32 tensors).
        trainer.callback_metrics.update({name: torch.tensor(value, dtype=torch.float64) for name, value in metrics.items()})
        return result

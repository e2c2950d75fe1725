"""equiaudit: how much of a model's loss comes from imperfect learned 3D-rotation equivariance.

::

    import equiaudit
    result = equiaudit.audit(model, data, task="force_field", rotations=24)
    result.total.rel_equiv_error, result.total.rel_equiv_error_ci_low, result.heads["forces"].loss_aug
    result.rows()                      # the summary.csv rows the CLI writes

    metric = equiaudit.EquivarianceMetric(task="force_field", rotations=16)
    for batch in val_loader:
        metric.update(model, batch)
    metric.compute()

    auditor = equiaudit.Auditor(data, task="force_field", rotations=16)   # data prepared once
    auditor(model)                     # one AuditResult per call (training steps, checkpoints)

    results = equiaudit.audit_checkpoints("runs/ff", "test.npz", model="models.py:build", task="force_field")
    results.rows()                     # the CLI's summary.csv rows, through the same runner

Training loops: ``equiaudit.lightning.EquivarianceCallback`` (Lightning) and
``equiaudit.hf.EquivarianceTrainerCallback`` (Hugging Face ``Trainer``) log it while training.

The command line (``equiaudit audit CONFIG``) runs the same plan over checkpoints. Names
are imported on first use, so ``import equiaudit`` (and ``equiaudit --help``) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "audit": "equiaudit.api",
    "audit_checkpoints": "equiaudit.runs",
    "Auditor": "equiaudit.api",
    "EquivarianceMetric": "equiaudit.api",
    "settings": "equiaudit.api",
    "Symmetrized": "equiaudit.symmetrize",
    "AuditResult": "equiaudit.result",
    "HeadResult": "equiaudit.result",
    "EquiauditError": "equiaudit.errors",
    "ConfigError": "equiaudit.errors",
    "DataError": "equiaudit.errors",
    "CheckpointError": "equiaudit.errors",
    "ModelOutputError": "equiaudit.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'equiaudit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

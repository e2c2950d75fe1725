"""The model's mode during an audit. Pure (torch only).

:func:`evaluation_mode` is used by the plan (the audit), the dynamics (gradients through
the audit's objective) and the API; it lives below all three so none imports another for it.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["evaluation_mode"]


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module):
    """``model.eval()`` for the audit, restoring every submodule's training flag afterwards
    (a model audited from a training loop goes back to training as it was)."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training

"""A small non-equivariant vector model, its factory file and audit config, for the training-loop tests.

The same ``models.py`` serves the training loop (Lightning, Hugging Face) and the CLI's
``model.factory``, so ``equiaudit audit CONFIG CHECKPOINT`` rebuilds exactly the module
that was trained and audited in the loop.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

MODELS_PY = '''
import torch


class VectorMLP(torch.nn.Module):
    """Per-atom ``x + MLP(x)`` on raw coordinates: not rotation-equivariant unless it learns to be.

    ``forward(pos)`` returns the prediction (B, A, 3); with ``target`` (the Hugging Face
    Trainer passes the batch as keywords) a dict with the MSE ``loss`` beside ``out``.
    """

    def __init__(self, hidden=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(3, hidden)
        self.hid = torch.nn.Linear(hidden, 3)

    def forward(self, pos, target=None):
        out = pos + self.hid(torch.tanh(self.inp(pos)))
        if target is None:
            return out
        return {"loss": (out - target).square().mean(), "out": out}


def build(hidden=16, seed=0):
    return VectorMLP(hidden, seed)
'''


def target_of(pos: np.ndarray) -> np.ndarray:
    """An equivariant target the MLP can only approximate: ``x · tanh(|x|)``."""
    return pos * np.tanh(np.linalg.norm(pos, axis=-1, keepdims=True))


def write_mlp_config(root: Path, *, samples: int = 16, rotations: int = 8, bootstrap: int = 50, seed: int = 3) -> Path:
    """``models.py``, held-out ``data.npz`` and ``cfg.yaml`` (model = ``VectorMLP``); returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models.py").write_text(MODELS_PY)
    pos = np.random.default_rng(1).normal(size=(samples, 4, 3))
    np.savez(root / "data.npz", pos=pos, target=target_of(pos))
    config = root / "cfg.yaml"
    config.write_text(
        "task: custom\n"
        f"model: {{factory: '{root / 'models.py'}:build', inputs: [pos], outputs: [out]}}\n"
        f"data: {{path: '{root / 'data.npz'}', samples: {samples}}}\n"
        "fields: {pos: vector}\n"
        "heads: {out: {rep: vector, target: target}}\n"
        f"group: {{name: so3, rotations: {rotations}}}\n"
        f"bootstrap: {bootstrap}\n"
        f"seed: {seed}\n"
    )
    return config


def build_mlp(root: Path) -> torch.nn.Module:
    """The factory's model, built as the CLI builds it."""
    from equiaudit.io.models import build_model

    return build_model(f"{root / 'models.py'}:build", {}, None)


def training_data(n: int = 64, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Training positions ``(n, 4, 3)`` float32 and their targets."""
    pos = np.random.default_rng(seed).normal(size=(n, 4, 3))
    return torch.tensor(pos, dtype=torch.float32), torch.tensor(target_of(pos), dtype=torch.float32)


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3, 3)`` proper rotations (QR of Gaussian matrices, signs fixed), float32."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(q)
    q[:, :, 0] *= det.unsqueeze(-1)
    return q


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def summary_by_step(path: Path, head: str = "total") -> dict[int, dict]:
    """``summary.csv`` rows of one head by step."""
    return {int(r["step"]): r for r in read_csv_rows(path) if r["head"] == head and r["step"]}


def metric_by_step(metrics_csv: Path, name: str) -> dict[int, float]:
    """A metric's values by step in a Lightning ``CSVLogger`` ``metrics.csv``."""
    return {int(r["step"]): float(r[name]) for r in read_csv_rows(metrics_csv) if r.get(name)}

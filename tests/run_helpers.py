"""Training runs with known REE trajectories, for the compare / cache / watch / plot tests.

Every checkpoint is a ``LinearMap`` with ``A_s = c·I + ε_s·B`` (``B`` traceless, ``‖B‖_F = 1``),
so by DESIGN.md's known answer ``REE(s) = ε_s² / (ε_s² + 3(c−1)²)``: we choose the REE of
each step and solve for ``ε_s``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from helpers import linear_map_ree

C = 0.9  # 3(c−1)² = 0.03
_B = torch.tensor([[0.3, 0.5, -0.2], [0.1, -0.4, 0.6], [-0.3, 0.2, 0.1]], dtype=torch.float64)
B = _B / _B.norm()
T0 = 1_700_000_000  # checkpoint mtimes: T0 + step seconds

# REE per step, chosen far (≥ 25 %) from the 2 % and 5 % thresholds so Monte Carlo noise cannot flip them.
# aug:   first ≤ 2 % at 1000, first ≤ 5 % at 100.   noaug: never ≤ 2 %, first ≤ 5 % at 1000.
TRAJECTORIES = {
    "aug": {0: 0.60, 10: 0.30, 100: 0.035, 1000: 0.012, 10000: 0.003},
    "noaug": {10: 0.50, 100: 0.20, 1000: 0.035, 10000: 0.030},
}

KILL_VALUE = 123.0  # a checkpoint with matrix[2, 2] == KILL_VALUE SIGKILLs the auditing process
HANG_VALUE = 321.0  # ... with HANG_VALUE makes it sleep (a hung rank)
RAISE_VALUE = 213.0  # ... with RAISE_VALUE makes its forward raise (a model that fails)
# With KILL_RANK=r in the environment, only the torch.distributed rank r is killed (or hangs).

MODELS_PY = f'''
import os, signal, time
import torch

class LinearMap(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.matrix = torch.nn.Parameter(torch.eye(3))

    def forward(self, pos):
        hook = float(self.matrix[2, 2])
        chosen = os.environ.get("KILL_RANK") in (None, os.environ.get("RANK"))
        if hook == {KILL_VALUE} and chosen:  # test hook: an audit killed mid-checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        if hook == {HANG_VALUE} and chosen:  # test hook: a rank that stops answering
            time.sleep(3600)
        if hook == {RAISE_VALUE} and chosen:  # test hook: the model fails (on one rank)
            raise RuntimeError("injected failure on rank " + str(os.environ.get("RANK")))
        return pos @ self.matrix.T

def build():
    return LinearMap()
'''


def matrix_for(ree: float) -> torch.Tensor:
    """``A = c·I + ε·B`` whose known-answer REE is ``ree``."""
    eps = math.sqrt(3 * (C - 1) ** 2 * ree / (1 - ree))
    matrix = C * torch.eye(3, dtype=torch.float64) + eps * B
    assert abs(linear_map_ree(matrix) - ree) < 1e-9
    return matrix


def checkpoint_bytes(ree: float, *, epoch: int | None = None, kill: bool = False, hang: bool = False,
                     fail: bool = False) -> bytes:
    """A state_dict, or a training dict with ``epoch`` when given, serialized."""
    matrix = matrix_for(ree).float()
    if kill:
        matrix[2, 2] = KILL_VALUE
    if hang:
        matrix[2, 2] = HANG_VALUE
    if fail:
        matrix[2, 2] = RAISE_VALUE
    obj = {"matrix": matrix} if epoch is None else {"state_dict": {"matrix": matrix}, "epoch": epoch}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(run_dir: Path, step: int, ree: float, **kwargs) -> Path:
    """Write ``step_XXXXXX.pt`` with mtime ``T0 + step``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"step_{step:06d}.pt"
    path.write_bytes(checkpoint_bytes(ree, **kwargs))
    os.utime(path, (T0 + step, T0 + step))
    return path


def make_run(root: Path, name: str, steps: dict[int, float] | None = None) -> Path:
    run_dir = root / "runs" / name
    for step, ree in (steps if steps is not None else TRAJECTORIES[name]).items():
        save_checkpoint(run_dir, step, ree)
    return run_dir


def write_config(root: Path, *, samples: int = 16, rotations: int = 8, bootstrap: int = 50) -> Path:
    """``models.py``, ``data.npz`` and ``cfg.yaml`` for the linear-map task; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models.py").write_text(MODELS_PY)
    pos = np.random.default_rng(0).normal(size=(samples, 4, 3))
    np.savez(root / "data.npz", pos=pos, target=pos)
    config = root / "cfg.yaml"
    config.write_text(
        "task: custom\n"
        f"model: {{factory: '{root / 'models.py'}:build', inputs: [pos], outputs: [out]}}\n"
        f"data: {{path: '{root / 'data.npz'}', samples: {samples}}}\n"
        "fields: {pos: vector}\n"
        "heads: {out: {rep: vector, target: target}}\n"
        f"group: {{name: so3, rotations: {rotations}}}\n"
        f"bootstrap: {bootstrap}\n"
    )
    return config

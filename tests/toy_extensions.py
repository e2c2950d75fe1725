"""A toy representation and a toy task, each one registration made from outside the package.

``site`` is a second position-like representation (centred on the masked centroid before a
rotation, moved by translations): nothing else in equiaudit names it, so the engine, the
float floor, the translation group and the breakdown's atom count must read its flags.

``toy_relax`` is a task with its own per-sample variable, a time ``tau ~ U(0, 1)`` drawn per
sample: the model maps positions ``pos`` (``site``) at ``tau`` to ``relaxed`` positions
(``site``; target: the centred data). The breakdown, the trajectory plot and ``report.html``
must pick ``tau`` up from the task's declaration alone (``tests/test_extensions.py``).

Importing this module registers both (as an extension module would).
"""

from __future__ import annotations

import torch

from equiaudit.actions import centre
from equiaudit.representations import Representation, register_representation
from equiaudit.tasks import SampleVariable, TaskPreset, register_task


def _rotate_rows(value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``R v`` for rows ``v``: value ``(B, K, ..., 3)``, rotations ``(B, K, 3, 3)``, in the rotations' dtype."""
    return torch.einsum("bkij,bk...j->bk...i", rotations, value.to(rotations.dtype)).to(value.dtype)


SITE = register_representation(Representation("site", 1, _rotate_rows, centred=True, translates=True))


def _prepare(dataset, options, random, ids):
    """Add ``tau`` ``(B,)`` (uniform, a pure function of the seed and the id) and ``relaxed``
    ``(B, A, 3)``: the centred positions."""
    tau = random.child("toy tau").uniform(ids).to(dataset["pos"].dtype)
    return {**dataset, "tau": tau, "relaxed": centre(dataset["pos"], dataset.get("mask"))}


TOY_RELAX = register_task(
    TaskPreset(
        name="toy_relax",
        fields={"pos": "site", "tau": "scalar", "z": "scalar"},
        heads={"relaxed": {"rep": "site", "target": "relaxed", "loss": "mse", "weight": 1.0}},
        inputs=("pos", "tau", "z"),
        prepare=_prepare,
        variables=(SampleVariable("tau", "toy time τ", "toy time τ of the relaxation"),),
    )
)


class ToyRelax(torch.nn.Module):
    """``f(pos, tau) = pos·(1 − tau/2) + offset``: rotation-equivariant about the centroid
    exactly when ``offset`` = 0 (inputs arrive centred), never translation-equivariant
    (a shift ``s`` comes back as ``−tau/2·s``)."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, pos, tau, z):
        return pos * (1 - tau / 2)[:, None, None] + self.offset

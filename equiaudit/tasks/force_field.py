"""``force_field``: positions (point) + atomic numbers (scalar) → energy (scalar) + forces (vector).

Works for direct-force models and for models that take ``-dE/dpos`` by autograd
(``model.grad: true``). Heads whose target is missing from the data are dropped.
"""

from equiaudit.tasks.base import TaskPreset, register_task

__all__ = ["FORCE_FIELD"]

FORCE_FIELD = register_task(
    TaskPreset(
        name="force_field",
        fields={"pos": "point", "z": "scalar"},
        heads={
            "energy": {"rep": "scalar", "target": "energy", "loss": "mse", "weight": 1.0},
            "forces": {"rep": "vector", "target": "forces", "loss": "mse", "weight": 1.0},
        },
        inputs=("pos", "z", "mask"),
        group="so3",
    )
)

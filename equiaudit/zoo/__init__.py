"""Reference models for the demo tasks; configs name builders as ``equiaudit.zoo:<builder>``."""

from equiaudit.zoo.models import (
    cnn_denoiser,
    egnn_force_field,
    egnn_velocity,
    transformer_force_field,
    transformer_velocity,
)

__all__ = [
    "cnn_denoiser",
    "egnn_force_field",
    "egnn_velocity",
    "transformer_force_field",
    "transformer_velocity",
]

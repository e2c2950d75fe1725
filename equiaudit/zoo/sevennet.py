"""Alias kept for configs that name ``equiaudit.zoo.sevennet:sevennet_force_field``: SevenNet is a
model family now (:mod:`equiaudit.zoo.families.sevennet`, the one implementation)."""

from equiaudit.zoo.families.sevennet import (  # noqa: F401
    SevenNetForceField,
    read_sevennet_config,
    resolve_checkpoint,
    sevennet_force_field,
    shipped_checkpoints,
)

__all__ = ["SevenNetForceField", "read_sevennet_config", "resolve_checkpoint", "sevennet_force_field", "shipped_checkpoints"]

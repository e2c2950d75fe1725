"""Groups an audit can measure equivariance to: the protocol, the registry and the built-ins. Pure.

``make_group(name, n_elements, options, n_atoms=...)`` builds a validated :class:`Group`
from the config's ``group:`` section. Built in (one module each):

* :mod:`~equiaudit.groups.rotation`: ``so3`` (default for point clouds; ``haar``, ``quasi``
  or ``fibonacci`` sampling), ``octahedral`` (the 24 cube rotations, exact on grids; the
  default for voxels), ``icosahedral`` (60);
* :mod:`~equiaudit.groups.o3`: rotations and reflections;
* :mod:`~equiaudit.groups.translation`: shifts of positions;
* :mod:`~equiaudit.groups.permutation`: permutations of atoms.

See :mod:`equiaudit.groups.base` for the protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from equiaudit.groups import o3, permutation, rotation, translation  # noqa: F401  (registers the built-ins)
from equiaudit.groups.base import GROUPS, ROTATION, Group, GroupAction, GroupEntry, RotationAction, group_names, register_group
from equiaudit.groups.rotation import SAMPLINGS, RotationSet, make_rotation_set

__all__ = [
    "Group", "GroupAction", "GroupEntry", "RotationAction", "ROTATION", "GROUPS", "register_group", "group_names",
    "group_options", "make_group", "RotationSet", "make_rotation_set", "SAMPLINGS",
]


def group_options() -> tuple[str, ...]:
    """Every ``group.*`` key some group accepts besides ``name`` and ``rotations`` (config validation)."""
    return tuple(dict.fromkeys(option for entry in GROUPS.values() for option in entry.options))


def make_group(name: str, n_elements: int | None = None, options: Mapping[str, Any] | None = None, *,
               n_atoms: int | None = None) -> Group:
    """The validated group ``name`` with ``n_elements`` (K) elements per sample (None: its default).

    ``options``: the group's own keys (e.g. ``sampling`` for ``so3``, ``radius``/``shape`` for
    ``translation``); ``n_atoms``: the atom axis length (needed by ``permutation``).
    Raises ``ValueError`` with one line for an unknown name, option or bad value.
    """
    entry = GROUPS.get(name)
    if entry is None:
        raise ValueError(f"unknown group {name!r}; allowed: {', '.join(GROUPS)}")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for key in options:
        if key not in entry.options:
            allowed = f"; allowed: {', '.join(entry.options)}" if entry.options else ""
            raise ValueError(f"group.{key} does not apply to group {name}{allowed}")
    return entry.build(n_elements, options, {"n_atoms": n_atoms})

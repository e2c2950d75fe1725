"""The group protocol: elements, their action on fields, exactness and blocks. Pure.

An audit evaluates every sample on K elements of a group ``G``. A :class:`Group` says

* which elements: ``sample(ids, random) -> (N, K, ...)``, a pure function of the sample
  ids and the seeded :class:`~equiaudit.random.SampleRandom` (so a sample's elements never
  depend on what is evaluated beside it);
* how they act on fields: ``action`` (a :class:`GroupAction`);
* how the orbit average is corrected: ``exact`` (the K elements enumerate a finite group:
  the plug-in is exact) and ``blocks`` (M independent blocks along K: ``K`` for i.i.d.
  elements, fewer for randomised quasi-uniform designs; see :func:`equiaudit.metrics.orbit_terms`).

A :class:`GroupAction` maps one sample per row to its orbit and back:

* ``act(rep, value (B, ...), elements (B, K, ...), mask) -> (B, K, ...)``: ``g_k · value``;
* ``act_inverse(rep, orbit (B, K, ...), elements, mask) -> (B, K, ...)``: ``g_k⁻¹ · orbit[:, k]``.

Groups register themselves in :data:`GROUPS` (one module each under :mod:`equiaudit.groups`);
adding a group is one file plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from equiaudit.random import SampleRandom
from equiaudit.representations import get_representation

__all__ = [
    "GroupAction",
    "RotationAction",
    "ROTATION",
    "Group",
    "GroupEntry",
    "GROUPS",
    "register_group",
    "group_names",
    "expand_orbit",
    "IIDElements",
    "sample_inputs",
]


class GroupAction:
    """How a group's elements act on fields (see the module docstring).

    ``centres_points``: ``point`` fields are centred on their masked centroid before the
    action (rotations about the origin need it; translations must not undo themselves).
    """

    name = "group"
    centres_points = True

    def act(self, rep: str, value: torch.Tensor, elements: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def act_inverse(self, rep: str, orbit: torch.Tensor, elements: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RotationAction(GroupAction):
    """Matrices ``(B, K, 3, 3)`` acting by representation (:mod:`equiaudit.representations`).

    Improper matrices (O(3)) work too: ``pseudovector`` picks up ``det R``.
    """

    name = "rotation"

    def act(self, rep, value, elements, mask=None):
        return get_representation(rep).orbit(value, elements, mask)

    def act_inverse(self, rep, orbit, elements, mask=None):
        return get_representation(rep).back(orbit, elements)


ROTATION = RotationAction()


def expand_orbit(value: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, ...)`` → ``(B, K, ...)`` (a view): K copies of each sample."""
    return value.unsqueeze(1).expand(value.shape[0], k, *value.shape[1:])


def sample_inputs(ids: torch.Tensor | int, random: SampleRandom | int) -> tuple[torch.Tensor, SampleRandom]:
    """``sample()``'s arguments as tensors: an int ``ids`` means ``0 … ids−1``, an int ``random``
    a seed (of the ``rotations`` stream, as an audit draws its elements)."""
    ids = torch.arange(ids, dtype=torch.int64) if isinstance(ids, int) else ids
    random = SampleRandom.named(random, "rotations") if isinstance(random, int) else random
    return ids, random


class IIDElements:
    """For groups whose K elements per sample are drawn i.i.d. (o3, translation, permutation):
    no blocks beyond the elements themselves (``blocks = K``: the K/(K−1) and jackknife
    corrections apply) and the group's name as its label. Mixed into frozen dataclasses
    that define ``name`` and ``n_elements``."""

    @property
    def blocks(self) -> int:
        return self.n_elements

    @property
    def label(self) -> str:
        return self.name


@runtime_checkable
class Group(Protocol):
    """What the engine and the metric need of a group (see the module docstring)."""

    name: str
    n_elements: int

    @property
    def exact(self) -> bool: ...

    @property
    def blocks(self) -> int: ...

    @property
    def action(self) -> GroupAction: ...

    @property
    def label(self) -> str:
        """How reports name it: ``so3 (quasi)``, ``octahedral (exact)``, ``o3``."""
        ...

    def sample(self, ids: torch.Tensor, random: SampleRandom) -> torch.Tensor: ...


@dataclass(frozen=True)
class GroupEntry:
    """A registered group.

    Attributes:
        name: the config's ``group.name``.
        build: ``(n_elements | None, options, context) -> Group``; raises ``ValueError`` with
            a one-line message for bad values. ``context`` carries facts about the data the
            group may need (``n_atoms``: the atom axis length).
        options: the group's own ``group.*`` keys besides ``name`` and ``rotations``.
        acts_on_grids: whether voxel grids can be audited under it.
    """

    name: str
    build: Callable[[int | None, Mapping[str, Any], Mapping[str, Any]], Group]
    options: tuple[str, ...] = ()
    acts_on_grids: bool = True


GROUPS: dict[str, GroupEntry] = {}


def register_group(entry: GroupEntry) -> GroupEntry:
    GROUPS[entry.name] = entry
    return entry


def group_names() -> tuple[str, ...]:
    return tuple(GROUPS)

"""``permutation``: random permutations of each sample's valid atoms. Pure.

Elements are i.i.d. uniform sort keys ``(N, K, A)``; the permutation of sample b under
element k is the argsort of the keys of its *valid* atoms (padded atoms stay where they
are), so the elements need not know the mask when they are drawn. Per-atom fields
``(B, A, ...)`` are permuted along the atom axis, everything else (energies, ``t``) is
invariant; positions are not centred (a permutation needs no origin). Grids are not permuted.

The key of atom slot ``a`` under element ``k`` is drawn at counter ``a·K + k``, so the keys of
the first ``A'`` slots do not depend on how far the atom axis is padded beyond them: a
batch with fewer slots than the audit was planned for uses the leading keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from equiaudit.groups.base import GroupAction, GroupEntry, expand_orbit, IIDElements, register_group, sample_inputs
from equiaudit.random import SampleRandom
from equiaudit.representations import get_representation

__all__ = ["permutation_index", "PermutationAction", "PERMUTATION", "PermutationSet"]

_DEFAULT_K = 32


def permutation_index(keys: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Permutations from sort keys: ``keys`` ``(B, K, A)``, ``mask`` ``(B, A)`` → int64 ``(B, K, A)``.

    ``perm[b, k]`` is a uniformly random permutation of sample b's valid atoms that leaves
    every padded atom in place; permuted values are ``value[b, perm[b, k, i]]`` at slot i.
    """
    if mask is None:
        return keys.argsort(-1)
    valid = mask.to(torch.bool)[:, None, :]
    # Valid atoms in random order, then the padded ones in index order (stable sort)...
    order = keys.masked_fill(~valid, torch.inf).argsort(dim=-1, stable=True)
    # ...written to the valid slots in index order, then the padded slots in index order.
    slots = (~valid).to(torch.int8).argsort(dim=-1, stable=True).expand_as(order)
    return torch.empty_like(order).scatter_(-1, slots, order)


class PermutationAction(GroupAction):
    """Sort keys ``(B, K, A)`` (see :func:`permutation_index`) acting on per-atom fields.

    A field is per-atom when its axis 1 has as many entries as the mask has atoms (or at
    most the keys' ``A`` without a mask) and it has the representation's component axes
    after it (``(B, A)`` scalars, ``(B, A, 3)`` vectors, ``(B, A, 3, 3)`` tensors).
    """

    name = "permutation"
    centres_points = False

    @staticmethod
    def _atoms(rep: str, shape: torch.Size, atom_axis: int, keys: torch.Tensor, mask) -> int | None:
        """The field's atom count when it is per-atom, else None."""
        representation = get_representation(rep)
        if representation.grid:
            raise ValueError("the permutation group does not act on voxel grids; use so3, o3 or octahedral")
        if len(shape) < atom_axis + 1 + representation.component_dims:
            return None
        atoms = shape[atom_axis]
        expected = mask.shape[1] if mask is not None else keys.shape[-1]
        return atoms if atoms == expected and atoms <= keys.shape[-1] else None

    @staticmethod
    def _index(perm: torch.Tensor, orbit: torch.Tensor) -> torch.Tensor:
        extra = orbit.dim() - 3
        return perm.reshape(*perm.shape, *([1] * extra)).expand_as(orbit)

    def act(self, rep, value, elements, mask=None):
        orbit = expand_orbit(value, elements.shape[1])
        atoms = self._atoms(rep, value.shape, 1, elements, mask)
        if atoms is None:
            return orbit
        perm = permutation_index(elements[..., :atoms], mask)
        return torch.gather(orbit, 2, self._index(perm, orbit))

    def act_inverse(self, rep, orbit, elements, mask=None):
        atoms = self._atoms(rep, orbit.shape, 2, elements, mask)
        if atoms is None:
            return orbit
        perm = permutation_index(elements[..., :atoms], mask)
        # Slot i holds atom perm[i]: send it back to position perm[i].
        return torch.empty_like(orbit).scatter_(2, self._index(perm, orbit), orbit)


PERMUTATION = PermutationAction()


@dataclass(frozen=True)
class PermutationSet(IIDElements):
    """Uniformly random permutations of up to ``n_atoms`` atom slots, as sort keys."""

    n_elements: int
    n_atoms: int
    name: str = "permutation"
    exact: bool = False
    action: GroupAction = PERMUTATION

    def sample(self, ids: torch.Tensor | int, random: SampleRandom | int) -> torch.Tensor:
        """Sort keys ``(N, K, n_atoms)`` float64 (slot-major counters: see the module docstring)."""
        ids, random = sample_inputs(ids, random)
        return random.uniform(ids, (self.n_atoms, self.n_elements)).transpose(1, 2).contiguous()


def _build(n_elements: int | None, options: Mapping[str, Any], context: Mapping[str, Any]) -> PermutationSet:
    k = _DEFAULT_K if n_elements is None else n_elements
    if k < 2:
        raise ValueError("group.rotations must be at least 2 (the error is a spread over group elements)")
    n_atoms = context.get("n_atoms")
    if n_atoms is None:
        raise ValueError("the permutation group needs per-atom data (a mask or a point field (N, A, 3))")
    return PermutationSet(k, int(n_atoms))


register_group(GroupEntry("permutation", _build, acts_on_grids=False))

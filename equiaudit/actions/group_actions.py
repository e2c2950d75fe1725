"""How a group's elements act on fields: rotations (the default), translations, permutations. Pure.

A :class:`GroupAction` maps one sample per row to its orbit and back:

* ``act(rep, value (B, ...), elements (B, K, ...), mask) -> (B, K, ...)``: ``g_k · value``;
* ``act_inverse(rep, orbit (B, K, ...), elements, mask) -> (B, K, ...)``: ``g_k⁻¹ · orbit[:, k]``.

``elements`` carry a sample axis and a K axis; what follows depends on the group:

* rotations (``so3``, ``o3``, finite groups): matrices ``(B, K, 3, 3)``, possibly improper;
* translations: vectors ``(B, K, 3)``;
* permutations: i.i.d. uniform sort keys ``(B, K, A)``; the permutation of sample b is the
  argsort of the keys of its *valid* atoms (padded atoms stay where they are), so the
  elements need not know the mask when they are drawn.

Arithmetic runs in float64 (the elements' dtype); the model's dtype is applied afterwards
by the engine, so the tool adds no error of its own.
"""

from __future__ import annotations

import torch

from equiaudit import actions as _actions

__all__ = [
    "GroupAction",
    "RotationAction",
    "TranslationAction",
    "PermutationAction",
    "ROTATION",
    "TRANSLATION",
    "PERMUTATION",
    "permutation_index",
]

# Trailing component axes of one atom's value, per representation.
_COMPONENT_DIMS = {"scalar": 0, "point": 1, "vector": 1, "pseudovector": 1, "tensor2": 2}


class GroupAction:
    """Interface of a group's action on fields (see the module docstring).

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
    """Matrices ``(B, K, 3, 3)`` acting by representation (:func:`equiaudit.actions.rotate`).

    Improper matrices (O(3)) work too: ``pseudovector`` picks up ``det R``.
    """

    name = "rotation"

    def act(self, rep, value, elements, mask=None):
        return _actions.rotate(rep, value, elements, mask=mask)

    def act_inverse(self, rep, orbit, elements, mask=None):
        return _actions.unrotate(rep, orbit, elements)


def _no_voxels(rep: str, group: str) -> None:
    if rep == "voxel":
        raise ValueError(f"the {group} group does not act on voxel grids; use so3, o3 or octahedral")


def _expand(value: torch.Tensor, k: int) -> torch.Tensor:
    return value.unsqueeze(1).expand(value.shape[0], k, *value.shape[1:])


class TranslationAction(GroupAction):
    """Vectors ``t`` ``(B, K, 3)``: ``point`` fields move by ``t`` (valid atoms only; no
    centring), ``point`` outputs move back by ``−t``; every other representation is invariant."""

    name = "translation"
    centres_points = False

    def _shift(self, rep, value, shift, mask):
        _no_voxels(rep, self.name)
        if rep != "point":
            return value
        # value (B, K, N, 3); shift (B, K, 3) -> per atom, zero at padded atoms.
        shift = shift.unsqueeze(2)
        if mask is not None:
            shift = shift * mask[:, None, :, None].to(shift.dtype)
        return (value.to(shift.dtype) + shift).to(value.dtype)

    def act(self, rep, value, elements, mask=None):
        return self._shift(rep, _expand(value, elements.shape[1]), elements, mask)

    def act_inverse(self, rep, orbit, elements, mask=None):
        return self._shift(rep, orbit, -elements, mask)


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
    """Sort keys ``(B, K, A)`` (see :func:`permutation_index`): per-atom fields ``(B, A, ...)``
    are permuted along the atom axis, everything else (energies, ``t``) is invariant.

    A field is per-atom when its axis 1 has ``A`` entries and it has the representation's
    component axes after it (``(B, A)`` scalars, ``(B, A, 3)`` vectors, ``(B, A, 3, 3)``
    tensors). Positions are not centred: a permutation needs no origin.
    """

    name = "permutation"
    centres_points = False

    @staticmethod
    def _per_atom(rep: str, shape: torch.Size, atom_axis: int, n_atoms: int) -> bool:
        _no_voxels(rep, "permutation")
        components = _COMPONENT_DIMS[_actions.check_representation(rep)]
        return len(shape) >= atom_axis + 1 + components and shape[atom_axis] == n_atoms

    @staticmethod
    def _index(perm: torch.Tensor, orbit: torch.Tensor) -> torch.Tensor:
        extra = orbit.dim() - 3
        return perm.reshape(*perm.shape, *([1] * extra)).expand_as(orbit)

    def act(self, rep, value, elements, mask=None):
        orbit = _expand(value, elements.shape[1])
        if not self._per_atom(rep, value.shape, 1, elements.shape[-1]):
            return orbit
        perm = permutation_index(elements, mask)
        return torch.gather(orbit, 2, self._index(perm, orbit))

    def act_inverse(self, rep, orbit, elements, mask=None):
        if not self._per_atom(rep, orbit.shape, 2, elements.shape[-1]):
            return orbit
        perm = permutation_index(elements, mask)
        # Slot i holds atom perm[i]: send it back to position perm[i].
        return torch.empty_like(orbit).scatter_(2, self._index(perm, orbit), orbit)


ROTATION = RotationAction()
TRANSLATION = TranslationAction()
PERMUTATION = PermutationAction()

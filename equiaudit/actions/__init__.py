"""Group actions on fields: the per-representation kernels behind :mod:`equiaudit.representations`.

The kernels live in :mod:`~equiaudit.actions.points` (centring) and
:mod:`~equiaudit.actions.voxels` (grids). The entry points :func:`rotate` and
:func:`unrotate` live with the representations (:mod:`equiaudit.representations`, which
knows what each representation is) and are re-exported here for existing callers:

* ``rotate(rep, value (B, ...), rotations (B, K, 3, 3), mask) -> (B, K, ...)``:
  ``out[b, k] = R[b, k] · value[b]``;
* ``unrotate(rep, orbit (B, K, ...), rotations) -> (B, K, ...)``: ``R[b, k]⁻¹ · value[b, k]``.
"""

from __future__ import annotations

from equiaudit.actions.points import centre, masked_centroid

__all__ = ["rotate", "unrotate", "centre", "masked_centroid"]


def __getattr__(name: str):
    # rotate/unrotate are re-exported lazily: equiaudit.representations imports this
    # package's kernels, so importing it here at the top would be an import circle.
    if name in ("rotate", "unrotate"):
        from equiaudit import representations

        return getattr(representations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

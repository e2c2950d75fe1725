"""The registry of representations: how a rotation ``R`` acts on each kind of value. Pure math.

A :class:`Representation` knows how to map one sample per row to its orbit under K
rotations and back:

* ``orbit(value (B, ...), R (B, K, 3, 3), mask) -> (B, K, ...)``: ``out[b, k] = R[b, k] · value[b]``;
* ``back(orbit (B, K, ...), R) -> (B, K, ...)``: ``R[b, k]⁻¹ · orbit[b, k]``.

Rotations are float64 and may be improper (O(3): ``det R = −1``). Vectors are rows, so
``R v`` is computed as ``v @ R.T``; the arithmetic runs in the rotations' dtype and is
cast back to the value's dtype (at most one rounding of the model's input).

A representation also says what it is, so that no module outside this registry compares
its name: ``centred`` (a position ``(B, A, 3)``: centred on the masked centroid before a
rotation, and the target of such a head too), ``translates`` (moved by the translation
group), ``invariant`` (left as it is by every rotation; the float floor does not jitter it),
``grid`` (a ``(C, D, H, W)`` grid moved by resampling). :func:`rotate` / :func:`unrotate`
are the one entry point for every caller (re-exported by :mod:`equiaudit.actions`).

Built in: ``scalar`` (invariant), ``point`` (positions: centred on the masked centroid,
then rotated; outputs live in the centred frame), ``vector`` (``R v``), ``pseudovector``
(``det(R)·R v``), ``tensor2`` (``R T Rᵀ``), ``voxel`` (scalar fields on grids
``(C, D, H, W)``, see :mod:`equiaudit.actions.voxels`), ``frame`` (per-residue rotations
``(..., 3, 3)`` moved by ``g R``, :mod:`equiaudit.actions.frames`) and any e3nn irreps string
(``"1x0e+2x1o+1x2e"``: Wigner-D blocks, :mod:`equiaudit.irreps`; made on first use, with
``irreps`` set). Adding a representation is one
:func:`register_representation` call (here or in its own module) plus its tests:
``tests/toy_extensions.py`` registers a position-like one from outside the package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from equiaudit.actions import voxels
from equiaudit.actions.frames import act_on_frames
from equiaudit.actions.points import centre

__all__ = [
    "Representation", "REPRESENTATIONS", "register_representation", "get_representation", "representation_names",
    "rotate", "unrotate", "position_fields", "is_representation",
]


@dataclass(frozen=True)
class Representation:
    """How rotations act on one kind of value.

    Attributes:
        name: the name used in configs (``fields``, ``heads.*.rep``).
        component_dims: trailing axes of one atom's (or one sample's) value that the
            rotation mixes: 0 for scalars, 1 for vectors ``(..., 3)``, 2 for ``(..., 3, 3)``.
            Voxel grids have 0 (each voxel is a scalar; the grid moves as a whole).
        apply: ``(value (B, K, ...), R (B, K, 3, 3)) -> (B, K, ...)``, the action on a value
            that already carries the K axis (unused for grids, see ``grid``).
        centred: the value is a per-atom position ``(B, A, 3)``: centre it on the masked
            centroid before rotating (and a head of it is compared in the centred frame).
        grid: values are ``(C, D, H, W)`` grids rotated by resampling (``equiaudit.actions.voxels``).
        translates: the translation group moves it (positions; differences of positions do not).
        invariant: every rotation leaves it as it is (the float floor's null orbit does not
            jitter it: rounding after an action cannot change it).
        irreps: for an e3nn irreps string, its :class:`equiaudit.irreps.Irreps` (per-``l`` breakdown).
    """

    name: str
    component_dims: int
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    centred: bool = False
    grid: bool = False
    translates: bool = False
    invariant: bool = False
    irreps: object | None = None  # the parsed irreps (equiaudit.irreps.Irreps) of an irreps string

    def orbit(self, value: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``value`` ``(B, ...)`` under ``rotations`` ``(B, K, 3, 3)`` → ``(B, K, ...)``."""
        if self.grid:
            return voxels.rotate_grid(value, rotations)
        if self.centred:
            value = centre(value, mask)
        expanded = value.unsqueeze(1).expand(value.shape[0], rotations.shape[1], *value.shape[1:])
        return self.apply(expanded, rotations)

    def back(self, orbit: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Map an orbit ``(B, K, ...)`` back to each sample's frame: ``R⁻¹ · orbit``."""
        if self.grid:
            return voxels.unrotate_grid(orbit, rotations)
        # For improper R (O(3)) the inverse is still Rᵀ, and det(Rᵀ) = det(R).
        return self.apply(orbit, rotations.transpose(-1, -2))


def _invariant(value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    return value


def _vector(value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bkij,bk...j->bk...i", rotations, value.to(rotations.dtype)).to(value.dtype)


def _pseudovector(value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    out = torch.einsum("bkij,bk...j->bk...i", rotations, value.to(rotations.dtype))
    det = torch.linalg.det(rotations)
    return (out * det.reshape(*det.shape, *([1] * (out.dim() - 2)))).to(value.dtype)


def _tensor2(value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bkij,bk...jl,bkml->bk...im", rotations, value.to(rotations.dtype), rotations).to(value.dtype)


REPRESENTATIONS: dict[str, Representation] = {}


def register_representation(rep: Representation) -> Representation:
    REPRESENTATIONS[rep.name] = rep
    return rep


def representation_names() -> tuple[str, ...]:
    return tuple(REPRESENTATIONS)


def get_representation(name: str) -> Representation:
    """The registered representation, or the one of an e3nn irreps string; ``ValueError``
    naming the allowed ones otherwise (an unknown name is never treated as a scalar)."""
    try:
        return REPRESENTATIONS[name]
    except (KeyError, TypeError):
        pass
    from equiaudit.irreps import is_irreps

    if is_irreps(name):
        return _irreps_representation(name)
    raise ValueError(f"unknown representation {name!r}; allowed: {', '.join(REPRESENTATIONS)} "
                     "or an e3nn irreps string such as 1x0e+1x1o+1x2e") from None


def is_representation(name) -> bool:
    """A registered name or an irreps string."""
    try:
        get_representation(name)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _irreps_representation(name: str) -> Representation:
    from equiaudit.irreps import act_irreps, parse_irreps

    irreps = parse_irreps(name)
    return Representation(name, 1, functools.partial(act_irreps, irreps), irreps=irreps)


def rotate(rep: str, value: torch.Tensor, rotations: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Orbit of a field: value ``(B, ...)``, rotations ``(B, K, 3, 3)`` → ``(B, K, ...)``.

    ``mask`` ``(B, N)`` marks valid atoms for centring ``centred`` (position) fields.
    """
    return get_representation(rep).orbit(value, rotations, mask)


def unrotate(rep: str, value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Map an orbit back to each sample's own frame: ``(B, K, ...)`` → ``R⁻¹ · value``."""
    return get_representation(rep).back(value, rotations)


def position_fields(reps: Mapping[str, str], fields: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The per-atom position fields ``(B, A, 3)`` among ``fields`` (``reps``: field → representation
    name; fields without one are skipped), in ``fields``' order."""
    return [v for f, v in fields.items() if f in reps and get_representation(reps[f]).centred and v.dim() == 3]


register_representation(Representation("scalar", 0, _invariant, invariant=True))
register_representation(Representation("point", 1, _vector, centred=True, translates=True))
register_representation(Representation("vector", 1, _vector))
register_representation(Representation("pseudovector", 1, _pseudovector))
register_representation(Representation("tensor2", 2, _tensor2))
register_representation(Representation("voxel", 0, _invariant, grid=True))
# Residue frames R (..., 3, 3): g·R = g R (times diag(1, 1, det g) for an improper g, so that
# frames of reflected atoms stay rotations); R⁻¹ = Rᵀ maps back as for any element.
register_representation(Representation("frame", 2, act_on_frames))

"""e3nn irreps as representations: ``rep: "1x0e+2x1o+1x2e"`` acts through Wigner-D matrices. Pure.

An irreps string lists blocks ``MULxLP`` (``MUL`` copies, degree ``L``, parity ``P`` = ``e`` or
``o``; ``MULx`` may be left out), joined by ``+``, exactly as e3nn writes them. A value with
these irreps is a last axis of ``dim = Σ MUL·(2L+1)`` components laid out as e3nn lays them
out: block after block, each block ``MUL`` consecutive copies of ``2L+1`` components.

The action of ``g`` (``(3, 3)``, proper or not) on one ``(2L+1)`` copy is
``p^[det g < 0] · D^L(det(g)·g)``: the real Wigner-D matrix of the proper part, times the
parity ``p = ±1`` for an improper ``g`` (``o3``). Under ``so3`` parity never enters.

Wigner-D in e3nn's real basis (e3nn ≥ 0.5: ``D¹(R) = R`` in ``x, y, z`` order), computed by
the recursion ``D^L(R) = W_L (D^(L−1)(R) ⊗ R) W_Lᵀ`` where ``W_L`` ``(2L+1, 3(2L−1))`` is
e3nn's Wigner 3j symbol ``(L−1) ⊗ 1 → L`` scaled to orthonormal rows (so ``W_L W_Lᵀ = I``,
and ``W_L`` intertwines: ``W_L (D^(L−1) ⊗ D¹) = D^L W_L``). Only the 3j symbols come from
e3nn (once per degree, cached); the matrices are batched products, about 100× faster than
e3nn's ``D_from_matrix`` (Euler angles and matrix exponentials), and equal to it to float64
rounding (``tests/test_irreps.py``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

__all__ = ["Irreps", "parse_irreps", "is_irreps", "wigner_d", "act_irreps"]

_BLOCK = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\d+)\s*([eo])\s*$")


@dataclass(frozen=True)
class Irreps:
    """Parsed irreps: ``blocks`` = ``((mul, l, parity ±1), …)``, in order."""

    blocks: tuple[tuple[int, int, int], ...]

    @property
    def dim(self) -> int:
        return sum(mul * (2 * l + 1) for mul, l, _ in self.blocks)

    @property
    def lmax(self) -> int:
        return max(l for _, l, _ in self.blocks)

    def slices(self) -> list[tuple[int, int, int, int, int]]:
        """``(start, stop, mul, l, parity)`` of each block along the last axis."""
        out, start = [], 0
        for mul, l, p in self.blocks:
            stop = start + mul * (2 * l + 1)
            out.append((start, stop, mul, l, p))
            start = stop
        return out

    def degree_of_component(self) -> torch.Tensor:
        """``(dim,)`` int64: the degree ``l`` of each component (the per-``l`` breakdown's labels)."""
        return torch.cat([torch.full((stop - start,), l, dtype=torch.int64) for start, stop, _, l, _ in self.slices()])

    def __str__(self) -> str:
        return "+".join(f"{mul}x{l}{'e' if p > 0 else 'o'}" for mul, l, p in self.blocks)


@functools.lru_cache(maxsize=256)
def parse_irreps(text: str) -> Irreps:
    """``"1x0e+2x1o+1x2e"`` → :class:`Irreps`; ``ValueError`` for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text!r} is not an irreps string")
    blocks = []
    for part in text.split("+"):
        found = _BLOCK.match(part)
        if found is None:
            raise ValueError(f"{text!r} is not an irreps string (blocks like 2x1o, joined by +)")
        mul = int(found.group(1)) if found.group(1) is not None else 1
        blocks.append((mul, int(found.group(2)), 1 if found.group(3) == "e" else -1))
    irreps = Irreps(tuple(blocks))
    if irreps.dim == 0:
        raise ValueError(f"{text!r} has no components")
    if irreps.lmax > 11:
        raise ValueError(f"{text!r}: degrees above 11 are not supported")
    return irreps


def is_irreps(text) -> bool:
    """Whether ``text`` parses as an irreps string."""
    try:
        parse_irreps(text)
    except (ValueError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=32)
def _coupling(l: int) -> torch.Tensor:
    """``W_l`` ``(2l+1, 3(2l−1))`` float64 with orthonormal rows: e3nn's 3j ``(l−1) ⊗ 1 → l``."""
    try:
        from e3nn import o3
    except ImportError:
        from equiaudit.errors import ConfigError

        raise ConfigError("irreps representations need e3nn's Clebsch–Gordan tables: pip install 'equiaudit[e3nn]'") from None
    w = o3.wigner_3j(l - 1, 1, l, dtype=torch.float64)  # (2l−1, 3, 2l+1), Frobenius norm 1
    return (w.reshape(-1, 2 * l + 1).T * (2 * l + 1) ** 0.5).contiguous()


def wigner_d(lmax: int, rotations: torch.Tensor) -> list[torch.Tensor]:
    """``[D⁰, D¹, …, D^lmax]`` for proper ``rotations`` ``(..., 3, 3)``: ``D^l`` ``(..., 2l+1, 2l+1)``, float64."""
    r = rotations.to(torch.float64)
    batch = r.shape[:-2]
    out = [torch.ones(*batch, 1, 1, dtype=torch.float64, device=r.device), r]
    for l in range(2, lmax + 1):
        w = _coupling(l).to(r.device)
        previous = out[-1]
        # (D^(l−1) ⊗ R)[(a,i),(b,j)] = D^(l−1)[a,b] R[i,j]
        kron = (previous[..., :, None, :, None] * r[..., None, :, None, :]).reshape(*batch, 3 * (2 * l - 1), 3 * (2 * l - 1))
        out.append(w @ kron @ w.T)
    return out[: lmax + 1]


def act_irreps(irreps: Irreps, value: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``g·v`` for values ``(B, K, ..., dim)`` and elements ``(B, K, 3, 3)`` (float64 arithmetic,
    cast back to the value's dtype)."""
    if value.shape[-1] != irreps.dim:
        from equiaudit.errors import ModelOutputError

        raise ModelOutputError(f"a value with irreps {irreps} needs a last axis of {irreps.dim}; got {value.shape[-1]}",
                               status="bad_output_shape")
    det = torch.linalg.det(rotations.to(torch.float64))
    proper = rotations.to(torch.float64) * det[..., None, None]
    ds = wigner_d(irreps.lmax, proper)
    x = value.to(torch.float64)
    middle = x.shape[2:-1]
    pieces = []
    for start, stop, mul, l, parity in irreps.slices():
        block = x[..., start:stop].reshape(*x.shape[:-1], mul, 2 * l + 1)
        d = ds[l].reshape(*ds[l].shape[:2], *([1] * (len(middle) + 1)), 2 * l + 1, 2 * l + 1)
        moved = (d @ block.unsqueeze(-1)).squeeze(-1)
        if parity < 0:
            moved = moved * det.reshape(*det.shape, *([1] * (moved.dim() - 2)))
        pieces.append(moved.reshape(*x.shape[:-1], stop - start))
    return torch.cat(pieces, dim=-1).to(value.dtype)

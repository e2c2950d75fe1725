"""Counter-based random numbers: every draw is a pure function of (seed, stream, sample, index). Pure.

Why not a ``torch.Generator``: a sequential generator makes sample i's rotations depend on
how many numbers were drawn before it — on the batch size, the padding of the atom axis,
the order of a validation loader, the rank of a process. Common random numbers across
checkpoints, a metric fed batch by batch, a run split over ranks or array-job shards and
``--target-ci`` (which adds samples) all need the opposite: **the same sample gets the same
rotations and task noise whatever else is evaluated beside it.** So each number is a hash
of ``(seed, stream, sample id, counter)`` where the counter is the flat position of the
number within that sample's draw (e.g. ``atom·3 + component``, independent of padding).

The hash is the ``lowbias32`` integer mixer (C. Wellons, "Prospecting for hash functions",
2018; bias 0.17 of the ideal), chained over the 32-bit words of the key, then two
independent 32-bit words give a 53-bit uniform double. It runs as vectorised int64 tensor
arithmetic with every product kept below 2⁶³ (32-bit × 16-bit halves), so results are
exact and identical on every platform and device.

Large per-sample draws (a voxel grid's noise, ≥ :data:`BULK` numbers per sample) would be
slow through the hash (~1 µs a number on a CPU core); they come instead from a
``torch.Generator`` seeded per sample with the hash of ``(seed, stream, id)``, one vectorised
draw per sample. They are still a pure function of ``(seed, stream, id, shape)`` — a grid's
shape is fixed for an audit — at the cost of a loop over samples, each iteration one
vectorised draw of the whole field. Task noise is drawn once per audit (or metric batch); the
float floor's jitter of a voxel grid per checkpoint and batch, where the loop's overhead is
small against the draws it makes (32 copies of an (8, 32³) grid: 0.08 s on one CPU core,
where one vectorised gather from a shared table of uniforms, tried instead, took 0.26 s).

Streams separate the draws that must not share numbers (rotations, flow noise, voxel
noise, float-floor jitter): :func:`stream_id` hashes a name.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SampleRandom", "stream_id", "sample_ids"]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # added between words so that a zero word still changes the state
# Per-sample draws of at least this many numbers use a per-sample seeded torch.Generator.
BULK = 4096


def stream_id(name: str) -> int:
    """A 32-bit id for a named stream (CRC-32: stable across Python versions and runs)."""
    return zlib.crc32(name.encode("utf-8")) & _MASK32


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x · constant) mod 2³²`` for ``0 ≤ x < 2³²`` in int64 without overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijection of 32-bit words with strong avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash(words: Sequence[torch.Tensor | int]) -> torch.Tensor:
    """One 32-bit hash (int64 tensor) of a sequence of 32-bit words (tensors broadcast)."""
    state: torch.Tensor | int = 0
    for word in words:
        state = _mix32((torch.as_tensor(state, dtype=torch.int64) + _GOLDEN) & _MASK32 ^ word)
    return state


def sample_ids(n: int, start: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """``start, …, start + n − 1`` as int64: the ids of samples in the order they come."""
    return torch.arange(start, start + n, dtype=torch.int64, device=device)


@dataclass(frozen=True)
class SampleRandom:
    """Draws for a set of samples: ``values[i]`` depends only on ``(seed, stream, ids[i])``.

    Attributes:
        seed: the audit's seed (any int; folded to 64 bits).
        stream: a 32-bit stream id (:func:`stream_id` of a name).

    Every method takes ``ids`` ``(N,)`` int64 (sample ids, ``0 ≤ id < 2⁶⁴``) and a per-sample
    ``shape``, and returns ``(N, *shape)`` on the ids' device; entry ``[i, j…]`` is a function
    of ``ids[i]`` and the flat index of ``j…`` in ``shape`` only.
    """

    seed: int
    stream: int = 0

    @classmethod
    def named(cls, seed: int, name: str) -> SampleRandom:
        return cls(int(seed), stream_id(name))

    def _words(self, ids: torch.Tensor, shape: tuple[int, ...], draw: int) -> torch.Tensor:
        """32-bit words ``(N, *shape)``: ``mix(state(seed, stream, id) ^ mix(counter))``.

        The per-sample state (a chain over the key and the id's two words) and the mixed
        counters are computed once per call, so each word costs one XOR and one mix.
        """
        ids = torch.as_tensor(ids, dtype=torch.int64)
        seed = self.seed & 0xFFFFFFFFFFFFFFFF
        key = int(_hash([seed & _MASK32, seed >> 32, self.stream & _MASK32]))
        state = _hash([key, ids & _MASK32, (ids >> 32) & _MASK32]).reshape(-1, 1)  # (N, 1)
        counter = torch.arange(math.prod(shape), dtype=torch.int64, device=ids.device) * 4 + draw  # 4 words per entry
        mixed = _mix32((counter + _GOLDEN) & _MASK32).reshape(1, -1)  # (1, size)
        return _mix32(state ^ mixed).reshape(ids.shape[0], *shape)

    def _uniform(self, ids: torch.Tensor, shape: tuple[int, ...], pair: int) -> torch.Tensor:
        high = self._words(ids, shape, 2 * pair) >> 5  # 27 bits
        low = self._words(ids, shape, 2 * pair + 1) >> 6  # 26 bits
        return (high.double() * 67108864.0 + low.double()) / 9007199254740992.0

    def _bulk(self, ids: torch.Tensor, shape: tuple[int, ...], draw) -> torch.Tensor:
        """``draw(shape, generator)`` per sample, the generator seeded by the sample's hash."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        seed = self.seed & 0xFFFFFFFFFFFFFFFF
        key = int(_hash([seed & _MASK32, seed >> 32, self.stream & _MASK32, 0xB01C]))
        ids_cpu = ids.cpu()
        high = _hash([key, ids_cpu & _MASK32, (ids_cpu >> 32) & _MASK32])
        low = _hash([key ^ 0x5BD1E995, ids_cpu & _MASK32, (ids_cpu >> 32) & _MASK32])
        seeds = ((high & 0x7FFFFFFF) << 32 | low).tolist()
        generator = torch.Generator()
        out = torch.empty((len(seeds), *shape), dtype=torch.float64)
        for row, sample_seed in enumerate(seeds):
            out[row] = draw(shape, generator.manual_seed(sample_seed))
        return out.to(ids.device)

    def uniform(self, ids: torch.Tensor, shape: Sequence[int] = ()) -> torch.Tensor:
        """Uniform on ``[0, 1)``, float64, 53 random bits."""
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) >= BULK:
            return self._bulk(ids, shape, lambda size, g: torch.rand(size, generator=g, dtype=torch.float64))
        return self._uniform(ids, shape, 0)

    def normal(self, ids: torch.Tensor, shape: Sequence[int] = ()) -> torch.Tensor:
        """Standard normal, float64 (Box–Muller on the entry's two independent uniforms)."""
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) >= BULK:
            return self._bulk(ids, shape, lambda size, g: torch.randn(size, generator=g, dtype=torch.float64))
        u1 = 1.0 - self._uniform(ids, shape, 0)  # (0, 1]: the log stays finite
        u2 = self._uniform(ids, shape, 1)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)

    def randint(self, ids: torch.Tensor, high: int, shape: Sequence[int] = ()) -> torch.Tensor:
        """Uniform integers in ``[0, high)``, int64 (the bias of flooring 53 bits is < 2⁻⁴⁰)."""
        return (self.uniform(ids, shape) * high).floor().long().clamp_max(high - 1)

    def child(self, name: str) -> SampleRandom:
        """An independent stream derived from this one and a name."""
        return SampleRandom(self.seed, int(_hash([self.stream, stream_id(name)])))

"""Lennard-Jones clusters: small, real molecular data made locally. Pure torch, no I/O.

Clusters of ``n_atoms`` atoms (LJ13, LJ55, or a two-element Kob–Andersen A/B mixture) are
sampled by underdamped Langevin dynamics (BAOAB), many independent chains at once. Every
sample comes with its energy and analytic forces ``−∇E``.

Units: energies in ε (reduced LJ units, ``k_B T`` in ε too). Lengths are reported in Å:
the reduced length unit σ (of the A–A pair) is ``spec.sigma_angstrom`` Å, so the LJ
nearest-neighbour distance ``2^{1/6} σ`` is ≈ 1.35 Å by default and an LJ13 cluster
(radius ≈ 1.3 Å) sits comfortably inside an 8 Å voxel box. Forces are in ε/Å, i.e.
exactly ``−dE/dpos`` for the positions returned.

The potential is the full pair sum (no cutoff: clusters are small) plus a flat-bottom
harmonic wall on each atom's distance to the cluster's centroid, which does nothing to a
bound cluster and only pulls evaporating atoms back::

    E = Σ_{i<j} 4 ε_ij [(σ_ij/r_ij)^12 − (σ_ij/r_ij)^6] + ½ k Σ_i max(0, |x_i − c| − r_0)²
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from equiaudit.rotations import haar_rotations

__all__ = [
    "ClusterSpec",
    "LJ13",
    "LJ55",
    "KA13",
    "species_index",
    "lj_energy_forces",
    "sample_clusters",
]


@dataclass(frozen=True)
class ClusterSpec:
    """What to sample. Reduced units (σ_AA = ε_AA = 1) except ``sigma_angstrom``.

    Attributes:
        n_atoms: atoms per cluster.
        species: atomic numbers used as element labels ``z``, one per species.
        fractions: share of each species (``None``: one species). Counts are rounded,
            the first species takes the remainder; every cluster has the same composition.
        epsilon, sigma: symmetric ``(S, S)`` pair parameters, indexed like ``species``.
        temperature: ``k_B T / ε``. LJ13 melts near 0.3; at 0.2 it is a solid but clearly
            anharmonic icosahedron (energy std ≈ 1 ε) that decorrelates within ~1 τ.
        sigma_angstrom: the length of σ in Å (positions and forces are reported in Å).
        confine_radius: flat-bottom wall radius in σ; ``None``: ``0.56·n^{1/3} + 1``
            (the cluster's own radius plus one σ of slack).
        confine_k: wall stiffness in ε/σ².
    """

    n_atoms: int = 13
    species: tuple[int, ...] = (6,)
    fractions: tuple[float, ...] | None = None
    epsilon: tuple[tuple[float, ...], ...] = ((1.0,),)
    sigma: tuple[tuple[float, ...], ...] = ((1.0,),)
    temperature: float = 0.2
    sigma_angstrom: float = 1.2
    confine_radius: float | None = None
    confine_k: float = 2.0

    def __post_init__(self):
        s = len(self.species)
        if self.n_atoms < 2:
            raise ValueError(f"n_atoms must be at least 2, got {self.n_atoms}")
        for name in ("epsilon", "sigma"):
            table = getattr(self, name)
            if len(table) != s or any(len(row) != s for row in table):
                raise ValueError(f"{name} must be a {s}x{s} table for species {self.species}")
        if self.fractions is not None and len(self.fractions) != s:
            raise ValueError(f"fractions must have one entry per species {self.species}")

    @property
    def counts(self) -> tuple[int, ...]:
        """Atoms of each species in every cluster."""
        if self.fractions is None:
            if len(self.species) != 1:
                raise ValueError("several species need fractions")
            return (self.n_atoms,)
        total = sum(self.fractions)
        rest = [round(self.n_atoms * f / total) for f in self.fractions[1:]]
        return (self.n_atoms - sum(rest), *rest)

    @property
    def wall_radius(self) -> float:
        """Flat-bottom wall radius in σ."""
        if self.confine_radius is not None:
            return self.confine_radius
        return 0.56 * self.n_atoms ** (1 / 3) + 1.0


LJ13 = ClusterSpec()
LJ55 = ClusterSpec(n_atoms=55)
# Kob–Andersen 80:20 A/B mixture (A = carbon label, B = oxygen label): two voxel channels.
KA13 = ClusterSpec(
    n_atoms=13,
    species=(6, 8),
    fractions=(0.8, 0.2),
    epsilon=((1.0, 1.5), (1.5, 0.5)),
    sigma=((1.0, 0.8), (0.8, 0.88)),
    temperature=0.3,
)


def species_index(z: torch.Tensor, spec: ClusterSpec) -> torch.Tensor:
    """Atomic numbers ``(..., A)`` → species index ``(..., A)`` into ``spec.species``."""
    table = torch.tensor(spec.species, dtype=z.dtype, device=z.device)
    hits = z.unsqueeze(-1) == table
    # Padded atoms may carry any z (often 0): map them to species 0, masked later.
    return hits.to(torch.int64).argmax(-1)


class _Pairs:
    """The pair list ``i < j`` of A atoms as an incidence matrix, with per-pair parameters.

    ``S`` is ``(P, A)``, +1 at ``i`` and −1 at ``j`` of pair ``p``, so pair separations are one
    matrix product, ``d = x S^T`` (``(N, 3, A) → (N, 3, P)``), and forces are another,
    ``F = (c d) S``. That is half the pairs of a dense ``A × A`` sum and no tiny batched
    matmuls, which dominates the sampler's speed on CPU.
    """

    def __init__(self, z: torch.Tensor, spec: ClusterSpec, valid: torch.Tensor, dtype: torch.dtype):
        n_atoms = z.shape[1]
        i, j = torch.triu_indices(n_atoms, n_atoms, 1, device=z.device)
        p = torch.arange(len(i), device=z.device)
        self.S = torch.zeros(len(i), n_atoms, dtype=dtype, device=z.device)
        self.S[p, i] = 1.0
        self.S[p, j] = -1.0
        idx = species_index(z, spec)
        pair_type = idx[:, i] * len(spec.species) + idx[:, j]  # (N, P)
        eps = torch.tensor(spec.epsilon, dtype=dtype, device=z.device).flatten()
        sig = torch.tensor(spec.sigma, dtype=dtype, device=z.device).flatten()
        self.valid = valid.to(dtype)  # (N, A)
        self.real = valid[:, i] & valid[:, j]  # (N, P): both atoms present
        self.eps = eps[pair_type] * self.real
        self.sig2 = sig.square()[pair_type]


def _reduced_energy_forces(
    xt: torch.Tensor, pairs: _Pairs, spec: ClusterSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy ``(N,)`` and forces ``(N, 3, A)`` in reduced units for positions ``xt`` ``(N, 3, A)`` in σ.

    Coordinates-first layout so both pair products are single matrix multiplications.
    """
    d = xt @ pairs.S.T  # (N, 3, P): x_i − x_j
    r2 = d.square().sum(1)  # (N, P)
    # Padded pairs get r² = 1 so nothing divides by zero; their ε is 0.
    r2 = torch.where(pairs.real, r2, 1.0)
    s2 = pairs.sig2 / r2
    s6 = s2 * s2 * s2
    energy = (4 * pairs.eps * (s6 * s6 - s6)).sum(1)
    # Force on i from pair (i, j): c (x_i − x_j), c = 24 ε (2 s12 − s6) / r²; −c on j.
    coef = 24 * pairs.eps * (2 * s6 * s6 - s6) / r2
    forces = (coef.unsqueeze(1) * d) @ pairs.S  # (N, 3, A)

    # Flat-bottom wall on |x_i − c|, c the centroid of the valid atoms.
    valid = pairs.valid.unsqueeze(1)  # (N, 1, A)
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    rel = xt - (xt * valid).sum(-1, keepdim=True) / count
    dist = rel.square().sum(1).clamp_min(1e-30).sqrt()  # (N, A)
    excess = (dist - spec.wall_radius).clamp_min(0) * pairs.valid
    energy = energy + 0.5 * spec.confine_k * excess.square().sum(1)
    # dE/dx_j = k [s_j u_j − (1/n) Σ_i s_i u_i]: the centroid term keeps Σ F = 0.
    pull = (spec.confine_k * excess / dist).unsqueeze(1) * rel  # k s_i u_i
    wall = pull - (pull * valid).sum(-1, keepdim=True) / count
    return energy, (forces - wall) * valid


def lj_energy_forces(
    pos: torch.Tensor, z: torch.Tensor, spec: ClusterSpec, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy and analytic forces of clusters.

    Args:
        pos: ``(N, A, 3)`` positions in Å.
        z: ``(N, A)`` atomic numbers from ``spec.species``.
        spec: the potential's parameters.
        mask: ``(N, A)`` bool, ``False`` for padded atoms (ignored); ``None``: all valid.

    Returns:
        energy ``(N,)`` in ε and forces ``(N, A, 3)`` in ε/Å (``−dE/dpos``; 0 on padded atoms).
    """
    valid = torch.ones(pos.shape[:2], dtype=torch.bool, device=pos.device) if mask is None else mask.bool()
    known = (z.unsqueeze(-1) == torch.tensor(spec.species, dtype=z.dtype, device=z.device)).any(-1)
    if not (known | ~valid).all():
        raise ValueError(f"atomic numbers {sorted(set(z[valid & ~known].tolist()))} are not in species {spec.species}")
    # Padded atoms are zeroed so whatever they hold (even NaN) cannot leak through a 0 weight.
    pos = torch.where(valid.unsqueeze(-1), pos, 0.0)
    pairs = _Pairs(z, spec, valid, pos.dtype)
    energy, forces = _reduced_energy_forces(pos.transpose(1, 2) / spec.sigma_angstrom, pairs, spec)
    return energy, forces.transpose(1, 2) / spec.sigma_angstrom


@contextmanager
def _single_thread():
    """Run the time loop on one thread: its tensors are tiny, so intra-op threads only add
    synchronisation, and on a busy machine spinning OpenMP workers slow it down tenfold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _initial_positions(n_chains: int, spec: ClusterSpec, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Compact fcc clusters (σ units), randomly oriented: ``(n_chains, A, 3)``.

    The ``A`` fcc sites nearest the origin at the LJ pair minimum 2^{1/6} σ (13 gives the
    cuboctahedron, 55 four full shells) relax quickly to the icosahedral ground states and,
    unlike random gas starts, never overlap.
    """
    n = spec.n_atoms
    side = math.ceil(n ** (1 / 3)) + 2
    r = torch.arange(-side, side + 1, dtype=torch.float64)
    grid = torch.cartesian_prod(r, r, r)
    fcc = grid[grid.sum(-1).remainder(2) == 0]  # integer points with even coordinate sum
    order = torch.argsort(fcc.square().sum(-1), stable=True)
    sites = fcc[order[:n]] * (2 ** (1 / 6) / math.sqrt(2))  # nearest-neighbour distance 2^{1/6}
    sites = sites - sites.mean(0)
    rotations = haar_rotations(n_chains, generator)
    return (sites @ rotations.transpose(-1, -2)).to(dtype)  # (n_chains, n, 3)


def sample_clusters(
    n_samples: int,
    spec: ClusterSpec,
    generator: torch.Generator,
    *,
    n_burn: int = 1000,
    thin: int = 200,
    samples_per_chain: int = 4,
    dt: float = 0.005,
    friction: float = 2.0,
    dtype: torch.dtype = torch.float64,
    dynamics_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Sample equilibrium clusters with BAOAB Langevin dynamics, all chains at once.

    ``ceil(n_samples / samples_per_chain)`` independent chains start from randomly rotated
    fcc clusters (species placed at random), run ``n_burn`` steps, then record a sample every
    ``thin`` steps. With the defaults (dt = 0.005 τ, friction 2/τ) a chain equilibrates for
    5 τ and consecutive samples of a chain are 1 τ apart. Masses are 1. Same generator
    state → identical arrays.

    The dynamics run in ``dynamics_dtype`` (float32 is ~3x faster on CPU and the thermostat's
    noise dwarfs its rounding); energies and forces of the recorded frames are then recomputed
    in ``dtype``, so they are exactly those of the returned positions.

    Returns:
        ``{"pos": (N, A, 3) Å, centred, "z": (N, A) int64, "mask": (N, A) bool (all True),
        "energy": (N,) ε, "forces": (N, A, 3) ε/Å}``, floats in ``dtype``.
    """
    n_chains = math.ceil(n_samples / samples_per_chain)
    n_atoms = spec.n_atoms

    # Species: the same composition in every chain, shuffled over the fcc sites.
    labels = torch.repeat_interleave(torch.tensor(spec.species), torch.tensor(spec.counts))
    shuffle = torch.argsort(torch.rand(n_chains, n_atoms, generator=generator), dim=1)
    z = labels[shuffle]  # (n_chains, A)

    work = dynamics_dtype
    x = _initial_positions(n_chains, spec, generator, work).transpose(1, 2).contiguous()  # (C, 3, A)
    pairs = _Pairs(z, spec, torch.ones(n_chains, n_atoms, dtype=torch.bool), work)
    kt = spec.temperature
    v = math.sqrt(kt) * torch.randn(x.shape, generator=generator, dtype=work)
    _, f = _reduced_energy_forces(x, pairs, spec)
    c1 = math.exp(-friction * dt)
    c2 = math.sqrt((1 - c1 * c1) * kt)

    frames = []
    with _single_thread():
        for step in range(1, n_burn + thin * samples_per_chain + 1):
            v = v + 0.5 * dt * f  # B
            x = x + 0.5 * dt * v  # A
            v = c1 * v + c2 * torch.randn(x.shape, generator=generator, dtype=work)  # O
            x = x + 0.5 * dt * v  # A
            _, f = _reduced_energy_forces(x, pairs, spec)
            v = v + 0.5 * dt * f  # B
            if step > n_burn and (step - n_burn) % thin == 0:
                frames.append(x.transpose(1, 2))

    if not torch.isfinite(torch.stack(frames)).all():
        raise RuntimeError("Langevin dynamics diverged: lower dt or the temperature")
    # (chains, frames, A, 3) → chain-major samples; keep the first n_samples.
    x = torch.stack(frames, 1).reshape(-1, n_atoms, 3)[:n_samples].to(dtype)
    # Centre each cluster (the wall follows the centroid, which drifts); E and F are
    # translation invariant, so centring changes neither.
    pos = (x - x.mean(1, keepdim=True)) * spec.sigma_angstrom
    z = z.repeat_interleave(samples_per_chain, 0)[:n_samples].to(torch.int64)
    energy, forces = lj_energy_forces(pos, z, spec)
    return {
        "pos": pos,
        "z": z,
        "mask": torch.ones(pos.shape[:2], dtype=torch.bool),
        "energy": energy,
        "forces": forces,
    }

"""Reference models for the three tasks: plain transformers, an EGNN baseline, a 3D CNN.

All are small, trainable ``nn.Module``s that run fast on CPU. Builders take keyword
arguments so configs can name them as ``equiaudit.zoo:<builder>``.

* Transformers (NON-equivariant): tokens = Linear(xyz) + Embedding(z); one shared backbone
  (:class:`AtomTransformer`) with different heads for force fields and flow matching.
* EGNN (Satorras et al. 2021): exactly E(3)-equivariant; the equivariant baseline and the
  tool's "REE at the float floor" positive control.
* 3D CNN denoiser (NON-equivariant): a tiny U-Net on voxel grids.

Point-cloud models share one signature: ``pos``/``x_t`` ``(B, A, 3)``, ``z`` ``(B, A)`` int
atomic numbers (``z < n_species``), ``mask`` ``(B, A)`` bool (``True`` = real atom).
Padded atoms never influence real ones, and their vector outputs are 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "masked_self_attention",
    "time_embedding",
    "AtomTransformer",
    "TransformerForceField",
    "TransformerVelocity",
    "EGNN",
    "EGNNForceField",
    "EGNNVelocity",
    "CNNDenoiser",
    "transformer_force_field",
    "transformer_velocity",
    "egnn_force_field",
    "egnn_velocity",
    "cnn_denoiser",
]


# ----------------------------------------------------------------------------- helpers


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``(B, A)`` bool mask; all True when ``mask`` is None."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.to(device=like.device, dtype=torch.bool)


def _zero_padded(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``value`` ``(B, A, ...)`` with padded atoms set to 0 (``where``, so NaN/inf there cannot leak)."""
    keep = valid.reshape(*valid.shape, *([1] * (value.dim() - 2)))
    return torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))


def masked_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention over atoms that ignores padded keys.

    Args:
        q, k, v: ``(B, heads, A, d)``.
        valid: ``(B, A)`` bool, ``True`` for real atoms.

    Returns:
        ``(B, heads, A, d)``. A query may attend to every real atom and to itself; the
        self term only matters for padded queries, which would otherwise see no key at all
        (a NaN softmax) — real queries are unaffected since they are real keys already.

    Written out rather than ``F.scaled_dot_product_attention``: its fused CPU kernel has no
    double backward, which ``grad=True`` force fields need to train on forces.
    """
    n = valid.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    allowed = valid[:, None, None, :] | eye  # (B, 1, A, A)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of flow time ``t`` ``(B,)`` in [0, 1] → ``(B, dim)``.

    Frequencies are geometric from 1 to 1000 rad per unit time, so both coarse and fine
    changes of ``t`` are visible.
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device, dtype=t.dtype))
    angles = t.reshape(-1, 1) * freqs
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=-1), (0, dim - 2 * half))


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


def _energy_and_forces(model: nn.Module, pos: torch.Tensor, run) -> dict[str, torch.Tensor]:
    """Energy from ``run(pos) -> (energy (B,), extras)`` and forces ``−dE/dpos`` by autograd.

    Works whatever the caller's grad mode (it enables grad locally). The graph through the
    forces is kept while training (force loss needs second derivatives) and when ``pos``
    already required grad while a weight requires grad too (the caller differentiates the
    forces further: ``--dynamics``, ``--local``). An audit's plain forward freezes the
    weights (``engine._parameters_frozen``), so it builds no second-order graph.
    """
    create_graph = model.training or (pos.requires_grad and any(p.requires_grad for p in model.parameters()))
    with torch.enable_grad():
        if not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        energy, _ = run(pos)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return {"energy": energy, "forces": -grad}


# ----------------------------------------------------------------------------- transformer


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: masked self-attention, then an MLP, both residual."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = _mlp(hidden, 2 * hidden, hidden)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, a, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, a, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = masked_self_attention(q, k, v, valid).transpose(1, 2).reshape(b, a, d)
        h = h + self.proj(att)
        return h + self.mlp(self.norm2(h))


class AtomTransformer(nn.Module):
    """Shared backbone: per-atom features from raw coordinates and species (NON-equivariant).

    ``forward(pos (B, A, 3), z (B, A), valid (B, A) bool, cond (B, hidden) | None) -> (B, A, hidden)``.
    ``cond`` (e.g. a time embedding) is added to every token.
    """

    def __init__(self, hidden: int = 64, layers: int = 2, heads: int = 4, n_species: int = 10):
        super().__init__()
        self.coords = nn.Linear(3, hidden)
        self.species = nn.Embedding(n_species, hidden)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, pos, z, valid, cond=None):
        # Padded atoms are zeroed first: whatever they hold cannot reach real atoms.
        h = self.coords(_zero_padded(pos, valid)) + self.species(_zero_padded(z, valid))
        if cond is not None:
            h = h + cond.unsqueeze(1)
        for block in self.blocks:
            h = block(h, valid)
        return self.norm(h)


class TransformerForceField(nn.Module):
    """Energy (sum of per-atom readouts) and forces (direct per-atom head, or ``−dE/dpos``).

    ``forward(pos (B, A, 3), z (B, A), mask (B, A) | None) -> {"energy": (B,), "forces": (B, A, 3)}``.
    """

    def __init__(self, hidden: int = 64, layers: int = 2, heads: int = 4, n_species: int = 10, grad: bool = False):
        super().__init__()
        self.grad = grad
        self.backbone = AtomTransformer(hidden, layers, heads, n_species)
        self.energy_head = _mlp(hidden, hidden, 1)
        self.force_head = None if grad else nn.Linear(hidden, 3)

    def _run(self, pos, z, valid):
        h = self.backbone(pos, z, valid)
        energy = _zero_padded(self.energy_head(h).squeeze(-1), valid).sum(1)
        return energy, h

    def forward(self, pos, z, mask=None):
        valid = _valid(mask, pos)
        if self.grad:
            out = _energy_and_forces(self, pos, lambda p: self._run(p, z, valid))
            out["forces"] = _zero_padded(out["forces"], valid)
            return out
        energy, h = self._run(pos, z, valid)
        return {"energy": energy, "forces": _zero_padded(self.force_head(h), valid)}


class TransformerVelocity(nn.Module):
    """Flow-matching velocity field (NON-equivariant).

    ``forward(x_t (B, A, 3), t (B,), z (B, A), mask (B, A) | None) -> {"velocity": (B, A, 3)}``;
    0 on padded atoms.
    """

    def __init__(self, hidden: int = 64, layers: int = 2, heads: int = 4, n_species: int = 10):
        super().__init__()
        self.hidden = hidden
        self.backbone = AtomTransformer(hidden, layers, heads, n_species)
        self.time = _mlp(hidden, hidden, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x_t, t, z, mask=None):
        valid = _valid(mask, x_t)
        cond = self.time(time_embedding(t.to(x_t.dtype).reshape(-1), self.hidden))
        h = self.backbone(x_t, z, valid, cond)
        return {"velocity": _zero_padded(self.head(h), valid)}


# ----------------------------------------------------------------------------- EGNN


class EGNNLayer(nn.Module):
    """One E(n)-equivariant layer (Satorras et al. 2021, eqs. 3–6), mask-aware.

    Messages use only invariants (features, ``|x_i − x_j|²``); coordinates move along
    ``x_i − x_j``, so rotations and translations commute with the layer exactly.
    """

    def __init__(self, hidden: int, update_features: bool = True, update_coords: bool = True):
        super().__init__()
        self.edge = nn.Sequential(nn.Linear(2 * hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.coord = _mlp(hidden, hidden, 1) if update_coords else None
        self.node = _mlp(2 * hidden, hidden, hidden) if update_features else None
        if self.coord is not None:
            # Small coordinate steps at init keep deep stacks stable (as in the reference code).
            nn.init.xavier_uniform_(self.coord[-1].weight, gain=1e-2)

    def forward(self, h, x, pair, n_neighbours):
        """h ``(B, A, H)``, x ``(B, A, 3)``, pair ``(B, A, A, 1)`` 0/1, n_neighbours ``(B, A, 1)``."""
        a = h.shape[1]
        diff = x.unsqueeze(2) - x.unsqueeze(1)  # (B, A, A, 3): x_i − x_j
        d2 = diff.square().sum(-1, keepdim=True)
        hi = h.unsqueeze(2).expand(-1, -1, a, -1)
        hj = h.unsqueeze(1).expand(-1, a, -1, -1)
        m = self.edge(torch.cat([hi, hj, d2], dim=-1)) * pair  # (B, A, A, H)
        # Unit-ish directions bound each step; +1e-8 keeps sqrt's gradient finite at d = 0.
        direction = diff / ((d2 + 1e-8).sqrt() + 1.0)
        if self.coord is not None:
            x = x + (direction * self.coord(m) * pair).sum(2) / n_neighbours
        if self.node is not None:
            h = h + self.node(torch.cat([h, m.sum(2) / n_neighbours], dim=-1))
        return h, x


class EGNN(nn.Module):
    """EGNN backbone: ``forward(pos, z, valid, cond) -> (h (B, A, H), x (B, A, 3))``.

    Padded atoms are cut out of every message; features ``h`` are invariant, coordinates
    ``x`` equivariant (``x − pos`` is a translation-invariant, rotation-equivariant vector).
    """

    def __init__(
        self, hidden: int = 64, layers: int = 3, n_species: int = 10, features_out: bool = True, coords_out: bool = True
    ):
        super().__init__()
        self.species = nn.Embedding(n_species, hidden)
        # The last layer skips the update nobody reads (so no weight goes without a gradient).
        last = layers - 1
        self.layers = nn.ModuleList(
            EGNNLayer(hidden, update_features=features_out or i < last, update_coords=coords_out or i < last)
            for i in range(layers)
        )

    def forward(self, pos, z, valid, cond=None):
        a = pos.shape[1]
        eye = torch.eye(a, dtype=torch.bool, device=pos.device)
        pair = (valid.unsqueeze(2) & valid.unsqueeze(1) & ~eye).unsqueeze(-1).to(pos.dtype)
        n_neighbours = pair.sum(2).clamp_min(1)  # (B, A, 1)
        h = self.species(_zero_padded(z, valid))
        if cond is not None:
            h = h + cond.unsqueeze(1)
        x = _zero_padded(pos, valid)
        for layer in self.layers:
            h, x = layer(h, x, pair, n_neighbours)
        return h, x


class EGNNForceField(nn.Module):
    """Exactly E(3)-equivariant force field; same signature as :class:`TransformerForceField`.

    Forces: the learned displacement ``x_L − x_0`` (``grad=False``) or ``−dE/dpos``.
    """

    def __init__(self, hidden: int = 64, layers: int = 3, n_species: int = 10, grad: bool = False):
        super().__init__()
        self.grad = grad
        self.backbone = EGNN(hidden, layers, n_species, coords_out=not grad)
        self.energy_head = _mlp(hidden, hidden, 1)

    def _run(self, pos, z, valid):
        h, x = self.backbone(pos, z, valid)
        energy = _zero_padded(self.energy_head(h).squeeze(-1), valid).sum(1)
        return energy, x - pos

    def forward(self, pos, z, mask=None):
        valid = _valid(mask, pos)
        if self.grad:
            out = _energy_and_forces(self, pos, lambda p: self._run(p, z, valid))
        else:
            energy, displacement = self._run(pos, z, valid)
            out = {"energy": energy, "forces": displacement}
        out["forces"] = _zero_padded(out["forces"], valid)
        return out


class EGNNVelocity(nn.Module):
    """Exactly E(3)-equivariant velocity field; same signature as :class:`TransformerVelocity`."""

    def __init__(self, hidden: int = 64, layers: int = 3, n_species: int = 10):
        super().__init__()
        self.hidden = hidden
        self.backbone = EGNN(hidden, layers, n_species, features_out=False)
        self.time = _mlp(hidden, hidden, hidden)

    def forward(self, x_t, t, z, mask=None):
        valid = _valid(mask, x_t)
        cond = self.time(time_embedding(t.to(x_t.dtype).reshape(-1), self.hidden))
        _, x = self.backbone(x_t, z, valid, cond)
        return {"velocity": _zero_padded(x - x_t, valid)}


# ----------------------------------------------------------------------------- 3D CNN


class CNNDenoiser(nn.Module):
    """Tiny 3D U-Net denoiser (NON-equivariant): noisy grid ``(B, C, L, L, L)`` → denoised, same shape.

    A full-resolution stem, a stride-2 conv to ⌈L/2⌉ where ``depth`` residual convs do most
    of the work (8x cheaper than at full resolution), a stride-2 transposed conv back, added
    to the stem's features (skip), and an output conv that predicts the clean grid itself
    (as VoxMol's denoiser does). A global residual (``noisy + correction``) would make the
    untrained model nearly the identity map, which is exactly equivariant; it also learnt
    a higher loss in the demo (0.00126 vs 0.00113 after 3000 steps). Any L ≥ 2
    works. With an odd L the stride-2 lattice (voxels 0, 2, …, L−1) is mapped onto itself by
    every cube rotation, so the network *can* become exactly cube-equivariant by learning;
    with an even L a flip moves that lattice by one voxel, an architectural floor on its REE.
    """

    def __init__(self, channels: int = 2, width: int = 32, depth: int = 3):
        super().__init__()
        self.stem = nn.Conv3d(channels, width, 3, padding="same")
        self.down = nn.Conv3d(width, width, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(nn.Conv3d(width, width, 3, padding="same") for _ in range(depth))
        self.up = nn.ConvTranspose3d(width, width, 3, stride=2, padding=1)
        self.out = nn.Conv3d(width, channels, 3, padding="same")

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        skip = F.silu(self.stem(grid))
        h = F.silu(self.down(skip))
        for conv in self.mid:
            h = h + F.silu(conv(h))
        h = F.silu(self.up(h, output_size=skip.shape[-3:])) + skip
        return self.out(h)


# ----------------------------------------------------------------------------- builders


def transformer_force_field(hidden: int = 64, layers: int = 2, heads: int = 4, n_species: int = 10, grad: bool = False) -> TransformerForceField:
    """Plain transformer force field: ``(pos, z, mask) -> {energy, forces}``."""
    return TransformerForceField(hidden, layers, heads, n_species, grad)


def transformer_velocity(hidden: int = 64, layers: int = 2, heads: int = 4, n_species: int = 10) -> TransformerVelocity:
    """Plain transformer flow-matching velocity: ``(x_t, t, z, mask) -> {velocity}``."""
    return TransformerVelocity(hidden, layers, heads, n_species)


def egnn_force_field(hidden: int = 64, layers: int = 3, n_species: int = 10, grad: bool = False) -> EGNNForceField:
    """EGNN force field (exactly equivariant): ``(pos, z, mask) -> {energy, forces}``."""
    return EGNNForceField(hidden, layers, n_species, grad)


def egnn_velocity(hidden: int = 64, layers: int = 3, n_species: int = 10) -> EGNNVelocity:
    """EGNN velocity (exactly equivariant): ``(x_t, t, z, mask) -> {velocity}``."""
    return EGNNVelocity(hidden, layers, n_species)


def cnn_denoiser(channels: int = 2, width: int = 32, depth: int = 3) -> CNNDenoiser:
    """3D CNN voxel denoiser: ``(B, C, L, L, L) -> (B, C, L, L, L)``."""
    return CNNDenoiser(channels, width, depth)

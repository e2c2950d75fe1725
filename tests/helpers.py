"""Small models and data with known answers, shared by the tests."""

from __future__ import annotations

import torch

from equiaudit.engine import HeadSpec, OrbitSpec


class LinearMap(torch.nn.Module):
    """``f(x) = A x`` on every atom (row vectors: ``x @ A.T``)."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.matrix = torch.nn.Parameter(matrix.clone())

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return pos @ self.matrix.T


class RadialScaling(torch.nn.Module):
    """``f(x) = x · φ(|x|)``: exactly rotation-equivariant."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return pos * torch.tanh(self.scale * pos.norm(dim=-1, keepdim=True))


def linear_map_ree(matrix: torch.Tensor) -> float:
    """DESIGN.md's known answer for ``f(x) = A x``, target ``y = x``."""
    c = torch.trace(matrix) / 3
    b = matrix - c * torch.eye(3, dtype=matrix.dtype)
    frob = b.square().sum()
    return float(frob / (frob + 3 * (c - 1) ** 2))


def vector_dataset(n_samples: int, n_atoms: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_samples, n_atoms, 3, generator=g, dtype=torch.float64)
    return {"pos": pos, "target": pos.clone()}


def vector_spec(rep: str = "vector", loss: str = "mse") -> OrbitSpec:
    return OrbitSpec(
        fields={"pos": rep},
        heads=(HeadSpec("out", rep, "target", loss=loss),),
        inputs=["pos"],
        outputs=["out"],
        mask=None,
    )


def random_matrix(seed: int = 1, scale: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(3, dtype=torch.float64) * 0.8 + scale * torch.randn(3, 3, generator=g, dtype=torch.float64)

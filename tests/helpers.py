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


def molecule_clouds(n: int = 64, atoms: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """``pos (n, atoms, 3)`` float64 off the origin, ``z``, ``mask``: every third molecule two
    atoms smaller (padded), for the generative tasks' tests (flow matching, diffusion)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, atoms, 3, generator=g, dtype=torch.float64) * 1.5 + 3.0
    mask = torch.ones(n, atoms, dtype=torch.bool)
    mask[::3, -2:] = False  # some molecules are smaller
    pos = pos * mask[..., None]
    return {"pos": pos, "z": torch.full((n, atoms), 6) * mask, "mask": mask}


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


class Identity(torch.nn.Module):
    """Returns its input: exactly equivariant under any exact action."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.unused


def identity() -> Identity:
    return Identity()


def conv3d(channels: int = 2, symmetrize: bool = False, seed: int = 0) -> torch.nn.Module:
    """A random 3×3×3 Conv3d; with ``symmetrize`` its kernel is averaged over the 24 cube rotations."""
    from equiaudit.actions.voxels import rotate_grid
    from equiaudit.rotations import cube_rotations

    torch.manual_seed(seed)
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1)
    if symmetrize:
        with torch.no_grad():
            kernel = conv.weight.reshape(1, -1, 3, 3, 3).double()  # every (out, in) pair is a scalar field
            orbit = rotate_grid(kernel, cube_rotations().unsqueeze(0))  # (1, 24, out·in, 3, 3, 3)
            conv.weight.copy_(orbit.mean(1).reshape(conv.weight.shape))
    return conv


def run_audit(
    model,
    data: dict[str, torch.Tensor],
    spec: OrbitSpec,
    *,
    group: str = "so3",
    k: int | None = None,
    sampling: str | None = None,
    elements: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
    bootstrap: int = 0,
    float_floor: bool = False,
    **options,
):
    """Audit ``model`` on in-memory ``data`` with a hand-built ``spec`` through the plan, the
    path every face uses: the group ``group`` with ``k`` elements (or explicit ``elements``
    ``(N, K, ...)``, with the group still deciding ``exact``/``blocks``). Returns the AuditResult."""
    import dataclasses

    from equiaudit.groups import make_group
    from equiaudit.plan import AuditPlan, Prepared

    options_group = {"sampling": sampling} if sampling else {}
    atoms = next((v.shape[1] for v in data.values() if v.dim() >= 2), None)
    group_ = make_group(group, k, options_group, n_atoms=atoms)
    plan = AuditPlan(dataclasses.replace(spec, group=group_), seed=seed, batch_size=batch_size, bootstrap=bootstrap,
                     float_floor=float_floor, **options)
    prepared = plan.prepare(data)
    if elements is not None:
        prepared = Prepared(prepared.data, prepared.ids, elements)
    return plan.audit(model, prepared)


def audit_config(config, checkpoint_dir, *, state_dict=None, name: str = "model.pt"):
    """Open ``config`` as the CLI does, save the model's own weights (or ``state_dict``) as a
    checkpoint in ``checkpoint_dir`` and audit it: returns ``(open audit, AuditResult)``."""
    from pathlib import Path

    from equiaudit.io.checkpoints import CheckpointRef
    from equiaudit.runner import audit_checkpoint, open_audit

    audit = open_audit(config, device="cpu")
    checkpoint = Path(checkpoint_dir) / name
    torch.save(audit.model.state_dict() if state_dict is None else state_dict, checkpoint)
    return audit, audit_checkpoint(audit, CheckpointRef(checkpoint, checkpoint.name, "run", 0))


def emt_cu_clusters(n: int, seed: int) -> list:
    """Random Cu clusters of 3-6 atoms (no pair closer than 2.2 Å), labelled by ASE's EMT:
    ``ase.Atoms`` with ``info["energy"]`` and ``arrays["forces"]`` (the family tests' data)."""
    import numpy as np
    from ase import Atoms
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < n:
        size = int(rng.integers(3, 7))
        positions = rng.normal(size=(size, 3)) * 1.7
        distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1) + 10 * np.eye(size)
        if distances.min() < 2.2 or distances.min() > 3.2:
            continue
        atoms = Atoms("Cu" * size, positions=positions)
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
        atoms.info["energy"] = energy
        atoms.arrays["forces"] = forces
        frames.append(atoms)
    return frames

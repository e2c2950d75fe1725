"""Residue frames: Gram–Schmidt construction, exact equivariance, and the closed form of ``R ↦ A R``."""

import math
from pathlib import Path

import pytest
import torch

import equiaudit
from equiaudit.actions.frames import act_on_frames, frames_from_backbone, geodesic_angle
from equiaudit.groups.o3 import O3Set
from equiaudit.groups.rotation import haar
from equiaudit.random import SampleRandom

DATA = Path(__file__).parent / "data" / "structures"


def _backbone():
    pytest.importorskip("gemmi")
    from equiaudit.io.data import load_dataset

    data = load_dataset(DATA / "1A8O.pdb.gz", structures={"atoms": "backbone", "frames": True})
    atoms = data["pos"][0].reshape(-1, 4, 3)
    return atoms, data


def test_gram_schmidt_convention():
    n = torch.tensor([[-0.5, 1.4, 0.0]], dtype=torch.float64)
    ca = torch.zeros(1, 3, dtype=torch.float64)
    c = torch.tensor([[1.5, 0.0, 0.0]], dtype=torch.float64)
    r = frames_from_backbone(n, ca, c)[0]
    # e1 along C − CA, e2 in the (C, N) plane towards N, e3 = e1 × e2
    assert torch.allclose(r, torch.eye(3, dtype=torch.float64), atol=1e-15)
    atoms, data = _backbone()
    frames = data["frames"][0]
    assert torch.allclose(frames.transpose(-1, -2) @ frames, torch.eye(3, dtype=torch.float64).expand_as(frames), atol=1e-14)
    assert torch.allclose(torch.linalg.det(frames), torch.ones(len(frames), dtype=torch.float64), atol=1e-14)
    # the local frame puts N in the e1-e2 plane with a positive e2 component
    local_n = ((atoms[:, 0] - atoms[:, 1])[:, None, :] @ frames)[:, 0]
    assert local_n[:, 2].abs().max() < 1e-12 and (local_n[:, 1] > 0).all()


@pytest.mark.parametrize("improper", [False, True])
def test_frames_from_rotated_atoms_are_rotated_frames(improper):
    atoms, _ = _backbone()
    k = 16
    group = O3Set(k) if improper else None
    g = group.sample(torch.arange(1), 0) if improper else haar(torch.arange(1), SampleRandom.named(0, "rotations"), k)
    moved = torch.einsum("kij,laj->klai", g[0], atoms)  # (K, L, 4, 3): g·x
    built = frames_from_backbone(moved[..., 0, :], moved[..., 1, :], moved[..., 2, :])
    acted = act_on_frames(frames_from_backbone(atoms[:, 0], atoms[:, 1], atoms[:, 2])[None, None].expand(1, k, -1, 3, 3), g)
    assert (built - acted[0]).abs().max() < 1e-13  # float64 floor


def _frame_audit(matrix, k=32, n_samples=64, **options):
    atoms, data = _backbone()

    class LeftMultiply(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(matrix.clone())

        def forward(self, frames):
            return self.a @ frames

    frames = data["frames"].expand(n_samples, -1, -1, -1).clone()
    options.setdefault("heads", {"out": {"rep": "frame", "target": "frames"}})
    return equiaudit.audit(LeftMultiply(), {"frames": frames}, task="custom", fields={"frames": "frame"},
                           inputs=["frames"], outputs=["out"], rotations=k, seed=0, device="cpu", bootstrap=0,
                           float_floor=False, dtype="float64", **options)


def test_left_multiplication_matches_closed_form():
    """``f(R) = A R``, target ``R``: ``P(g) = g⁻¹Ag R`` and ``E_g g⁻¹Ag = c I`` (``c = tr A/3``), so per
    component (MSE over the 9 entries, ``‖R‖_F² = 3``): ``L_sym = (c − 1)²/3`` and
    ``EE = E‖g⁻¹Ag − cI‖²_F/9 = ‖A − cI‖²_F/9`` (right-multiplying by R keeps the Frobenius norm)."""
    a = torch.tensor([[1.4, 0.3, -0.2], [0.1, 1.1, 0.4], [-0.3, 0.2, 1.4]], dtype=torch.float64)
    c = torch.trace(a) / 3
    b = a - c * torch.eye(3, dtype=torch.float64)
    l_sym, ee = float((c - 1) ** 2 / 3), float(b.square().sum() / 9)
    result = _frame_audit(a)
    out = result.heads["out"]
    assert out.equiv_error == pytest.approx(ee, rel=0.05)
    assert out.loss_sym == pytest.approx(l_sym, rel=0.05)
    assert out.rel_equiv_error == pytest.approx(ee / (ee + l_sym), rel=0.05)


def test_equivariant_frame_map_reads_at_floor():
    """``f(R) = R Q`` (a fixed right multiplication: a change of local axes) commutes with ``g·``."""
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0]
    atoms, data = _backbone()

    class RightMultiply(torch.nn.Module):
        def forward(self, frames):
            return frames @ q.to(frames.dtype)

    result = equiaudit.audit(RightMultiply(), {"frames": data["frames"]}, task="custom", fields={"frames": "frame"},
                             heads={"out": {"rep": "frame", "target": "frames"}}, inputs=["frames"], outputs=["out"],
                             rotations=8, seed=0, device="cpu", bootstrap=0, dtype="float64")
    assert result.heads["out"].loss_aug > 0.1 and result.heads["out"].rel_equiv_error < 1e-14


def test_geodesic_angle():
    g = haar(torch.arange(1), SampleRandom(0), 4)[0]
    assert geodesic_angle(g, g).abs().max() < 1e-6
    half_turn = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    assert geodesic_angle(g[0], g[0] @ half_turn).item() == pytest.approx(torch.pi)


def test_geodesic_loss_of_a_fixed_turn():
    """``f(R) = A R`` with ``A`` a turn by θ: every orbit prediction ``g⁻¹Ag R`` is θ from ``R`` (L_aug = θ²
    exactly), and their mean ``(tr A/3) R`` projects back onto ``R`` (L_sym → 0): EE ≈ θ², REE ≈ 1."""
    theta = 0.4
    a = torch.tensor([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)], [0, math.sin(theta), math.cos(theta)]],
                     dtype=torch.float64)
    result = _frame_audit(a, n_samples=16, heads={"out": {"rep": "frame", "target": "frames", "loss": "geodesic"}})
    out = result.heads["out"]
    assert out.loss_aug == pytest.approx(theta**2, rel=1e-9)
    assert out.equiv_error == pytest.approx(theta**2, rel=0.05) and out.rel_equiv_error > 0.95


def test_translation_and_rotation_heads_together():
    """An SE(3) frame model's two heads, positions (``point``) and frames (``frame``), in one audit:
    an exactly equivariant one (CA and frames passed through a rigid-body-consistent map) at the floor."""
    atoms, data = _backbone()

    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))[0]

    class RigidHeads(torch.nn.Module):
        def forward(self, ca, frames):
            return ca * 1.5, frames @ q.to(frames.dtype)

    ca = atoms[None, :, 1]
    result = equiaudit.audit(RigidHeads(), {"ca": ca, "frames": data["frames"], "mask": data["frames_mask"]}, task="custom",
                             fields={"ca": "point", "frames": "frame"}, inputs=["ca", "frames"], outputs=["trans", "rot"],
                             heads={"trans": {"rep": "point", "target": "ca"}, "rot": {"rep": "frame", "target": "frames"}},
                             rotations=8, seed=0, device="cpu", bootstrap=0, dtype="float64")
    assert set(result.heads) == {"trans", "rot"}
    assert result.heads["trans"].loss_aug > 1 and result.heads["rot"].loss_aug > 0.1
    assert result.total.rel_equiv_error <= 10 * result.total.float_floor

import math

import pytest
import torch

from equiaudit import rotations as rot
from equiaudit.groups import make_rotation_set


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_haar_rotations_are_proper_orthonormal(dtype, tol):
    r = rot.haar_rotations(1000, torch.Generator().manual_seed(0), dtype=dtype)
    eye = torch.eye(3, dtype=dtype)
    assert r.dtype == dtype
    assert (r @ r.transpose(-1, -2) - eye).abs().max() < tol
    assert (torch.linalg.det(r) - 1).abs().max() < tol


def test_haar_moments():
    r = rot.haar_rotations(200_000, torch.Generator().manual_seed(1))
    # Haar: E[R] = 0, E[R_ij^2] = 1/3, angle density (1 - cos θ)/π  ->  E[θ] = π/2 + 2/π.
    assert r.mean(0).abs().max() < 0.01
    assert (r.square().mean(0) - 1 / 3).abs().max() < 0.01
    assert abs(rot.rotation_angle(r).mean().item() - (math.pi / 2 + 2 / math.pi)) < 0.01


def test_same_seed_same_rotations():
    a = rot.haar_rotations(10, torch.Generator().manual_seed(3))
    b = rot.haar_rotations(10, torch.Generator().manual_seed(3))
    c = rot.haar_rotations(10, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("elements,order", [(rot.cube_rotations, 24), (rot.icosahedral_rotations, 60)])
def test_finite_groups_are_closed(elements, order):
    g = elements()
    assert g.shape == (order, 3, 3)
    assert torch.allclose(g[0], torch.eye(3, dtype=g.dtype))
    assert (torch.linalg.det(g) - 1).abs().max() < 1e-12
    products = torch.einsum("aij,bjk->abik", g, g).reshape(-1, 1, 9)
    distance = (products - g.reshape(1, -1, 9)).abs().amax(-1)
    assert (distance.min(1).values < 1e-9).all()  # every product is in the group
    assert (torch.cdist(g.reshape(-1, 9), g.reshape(-1, 9)) + torch.eye(order) * 9).min() > 0.1


def test_cube_rotations_are_signed_permutations():
    assert rot.is_signed_permutation(rot.cube_rotations())
    assert not rot.is_signed_permutation(rot.haar_rotations(1, torch.Generator().manual_seed(0)))


def test_generators_and_axis_angle():
    L = rot.so3_generators()
    assert L[0, 2, 1] == 1 and L[0, 1, 2] == -1
    e = torch.eye(3, dtype=torch.float64)
    for j in range(3):  # L_j v = e_j × v
        v = torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64)
        assert torch.allclose(L[j] @ v, torch.linalg.cross(e[j], v))
    r = rot.axis_angle_to_matrix(e[2], torch.tensor(math.pi / 2, dtype=torch.float64))
    assert torch.allclose(r @ e[0], e[1], atol=1e-12)  # counter-clockwise about z
    assert abs(rot.rotation_angle(r).item() - math.pi / 2) < 1e-12


def test_rotation_sets():
    octa = make_rotation_set("octahedral", None)
    assert octa.exact and octa.n_elements == 24
    assert octa.sample(5, 0).shape == (5, 24, 3, 3)
    partial = make_rotation_set("octahedral", 8)
    assert not partial.exact and rot.is_signed_permutation(partial.sample(5, 0))
    haar = make_rotation_set("so3", 16)
    assert not haar.exact and haar.sample(4, 0).shape == (4, 16, 3, 3)
    with pytest.raises(ValueError, match="allowed"):
        make_rotation_set("so4", 8)
    with pytest.raises(ValueError, match="at least 2"):
        make_rotation_set("so3", 1)


def test_tetrahedral_group_and_designs():
    t = rot.tetrahedral_rotations()
    assert t.shape == (12, 3, 3) and torch.allclose(t[0], torch.eye(3, dtype=t.dtype))
    eye = torch.eye(3, dtype=torch.float64)
    haar_second_moment = torch.einsum("ik,jl->ijkl", eye, eye) / 3  # E[R_ij R_kl] under Haar
    for group in (t, rot.cube_rotations(), rot.icosahedral_rotations()):  # 2-, 3- and 5-designs
        assert group.mean(0).abs().max() < 1e-12
        assert (torch.einsum("nij,nkl->ijkl", group, group) / len(group) - haar_second_moment).abs().max() < 1e-12


def test_super_fibonacci_rotations():
    r = rot.super_fibonacci_rotations(256)
    assert r.shape == (256, 3, 3) and r.dtype == torch.float64
    assert (r @ r.transpose(-1, -2) - torch.eye(3, dtype=r.dtype)).abs().max() < 1e-12
    assert (torch.linalg.det(r) - 1).abs().max() < 1e-12
    # Low discrepancy: the first moment is far closer to Haar's (0) than i.i.d. draws (≈ √(3/n) = 0.11).
    assert r.mean(0).norm() < 0.02
    assert torch.equal(r, rot.super_fibonacci_rotations(256))  # deterministic


@pytest.mark.parametrize("k,sampling,blocks", [(24, "quasi", 2), (36, "quasi", 3), (48, "quasi", 2), (120, "quasi", 2), (16, "fibonacci", 2), (16, "haar", 16)])
def test_randomised_rotation_sets(k, sampling, blocks):
    rs = make_rotation_set("so3", k, sampling)
    assert rs.blocks == blocks and not rs.exact
    r = rs.sample(3, 0)
    assert r.shape == (3, k, 3, 3)
    assert (torch.linalg.det(r) - 1).abs().max() < 1e-12
    if sampling != "haar":
        # Each block is the base set turned by one rotation G: R_j = G·Q_j, so R_0ᵀ R_j = Q_0ᵀ Q_j.
        base = rs.base
        blockwise = r.reshape(3, blocks, -1, 3, 3)
        relative = blockwise[:, :, :1].transpose(-1, -2) @ blockwise
        assert torch.allclose(relative, (base[:1].transpose(-1, -2) @ base).expand_as(relative), atol=1e-12)
        assert not torch.allclose(blockwise[:, 0], blockwise[:, 1])  # blocks are turned independently


def test_rotation_set_defaults_and_errors():
    assert make_rotation_set("so3", None) == make_rotation_set("so3", 24, "quasi")
    assert make_rotation_set("so3", 32).sampling == "haar"  # 32 does not suit the designs
    assert make_rotation_set("so3", 48).sampling == "quasi"
    assert make_rotation_set("so3", None, "haar").n_elements == 32
    assert make_rotation_set("octahedral", None).sampling == "haar"
    with pytest.raises(ValueError, match="multiple of 12"):
        make_rotation_set("so3", 32, "quasi")
    with pytest.raises(ValueError, match="even"):
        make_rotation_set("so3", 15, "fibonacci")
    with pytest.raises(ValueError, match="so3 only"):
        make_rotation_set("octahedral", 24, "quasi")
    with pytest.raises(ValueError, match="allowed"):
        make_rotation_set("so3", 24, "sobol")

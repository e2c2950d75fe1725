import pytest
import torch

from equiaudit import actions
from equiaudit.rotations import haar_rotations


def _rotations(b, k, seed=0):
    return haar_rotations(b * k, torch.Generator().manual_seed(seed)).reshape(b, k, 3, 3)


@pytest.mark.parametrize("rep,shape", [("vector", (4, 7, 3)), ("pseudovector", (4, 7, 3)), ("tensor2", (4, 3, 3)),
                                       ("scalar", (4, 5)), ("point", (4, 7, 3))])
def test_round_trip(rep, shape):
    value = torch.randn(*shape, dtype=torch.float64)
    rotations = _rotations(4, 6)
    orbit = actions.rotate(rep, value, rotations)
    back = actions.unrotate(rep, orbit, rotations)
    expected = actions.centre(value) if rep == "point" else value
    assert torch.allclose(back, expected.unsqueeze(1).expand_as(back), atol=1e-12)


def test_vector_convention_matches_matrix_product():
    v = torch.randn(2, 5, 3, dtype=torch.float64)
    rotations = _rotations(2, 3)
    orbit = actions.rotate("vector", v, rotations)
    for b in range(2):
        for k in range(3):
            assert torch.allclose(orbit[b, k], (rotations[b, k] @ v[b].T).T)


def test_tensor2_is_r_t_rt():
    t = torch.randn(2, 3, 3, dtype=torch.float64)
    rotations = _rotations(2, 2)
    orbit = actions.rotate("tensor2", t, rotations)
    r = rotations[1, 1]
    assert torch.allclose(orbit[1, 1], r @ t[1] @ r.T)


def test_point_is_centred_on_valid_atoms_and_padding_stays_zero():
    pos = torch.randn(2, 6, 3, dtype=torch.float64) + 5.0
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    orbit = actions.rotate("point", pos, _rotations(2, 3), mask=mask)
    assert orbit[0, :, 4:].abs().max() == 0
    assert orbit[0, :, :4].mean(1).abs().max() < 1e-12
    assert orbit[1].mean(1).abs().max() < 1e-12


def test_float32_values_rotated_in_float64():
    v = torch.randn(3, 4, 3, dtype=torch.float32)
    rotations = _rotations(3, 2)
    orbit = actions.rotate("vector", v, rotations)
    assert orbit.dtype == torch.float32
    reference = actions.rotate("vector", v.double(), rotations)
    assert (orbit.double() - reference).abs().max() < 1e-6


def test_pseudovector_flips_under_inversion():
    v = torch.randn(1, 2, 3, dtype=torch.float64)
    inversion = -torch.eye(3, dtype=torch.float64).reshape(1, 1, 3, 3)
    assert torch.allclose(actions.rotate("pseudovector", v, inversion)[0, 0], v[0])
    assert torch.allclose(actions.rotate("vector", v, inversion)[0, 0], -v[0])


def test_unknown_representation():
    with pytest.raises(ValueError, match="allowed"):
        actions.rotate("spinor", torch.zeros(1, 3), _rotations(1, 2))

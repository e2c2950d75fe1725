"""CUDA gives the same audit as the CPU (skipped where there is no GPU)."""

import pytest
import torch

from equiaudit.actions.voxels import rotate_grid, unrotate_grid
from equiaudit.engine import audit_model
from equiaudit.groups import make_rotation_set
from equiaudit.rotations import cube_rotations
from helpers import LinearMap, linear_map_ree, random_matrix, vector_dataset, vector_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_linear_map_known_answer_on_cuda_matches_cpu():
    matrix = random_matrix()
    data = vector_dataset(512, 8)
    rotations = make_rotation_set("so3", 16).sample(512, torch.Generator().manual_seed(0))
    results = {}
    for device in ("cpu", "cuda"):
        model = LinearMap(matrix).double().to(device)
        results[device] = audit_model(model, data, rotations, vector_spec(), batch_size=128, device=device).compute(n_bootstrap=100)["total"]
    assert results["cuda"].rel_equiv_error == pytest.approx(results["cpu"].rel_equiv_error, rel=1e-9)
    assert results["cuda"].rel_equiv_error == pytest.approx(linear_map_ree(matrix), rel=0.03)


def test_exact_cube_rotations_on_cuda():
    grid = torch.rand(2, 3, 8, 8, 8, device="cuda")
    rotations = cube_rotations(device="cuda").expand(2, -1, -1, -1)
    orbit = rotate_grid(grid, rotations)
    assert torch.equal(unrotate_grid(orbit, rotations), grid.unsqueeze(1).expand_as(orbit))
    assert torch.equal(orbit.cpu(), rotate_grid(grid.cpu(), rotations.cpu()))

"""CUDA gives the same audit as the CPU (skipped where there is no GPU)."""

import pytest
import torch

from equiaudit.actions.voxels import rotate_grid, unrotate_grid
from equiaudit.rotations import cube_rotations
from helpers import LinearMap, linear_map_ree, random_matrix, run_audit, vector_dataset, vector_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_linear_map_known_answer_on_cuda_matches_cpu():
    matrix = random_matrix()
    data = vector_dataset(512, 8)
    results = {}
    for device in ("cpu", "cuda"):
        model = LinearMap(matrix).double().to(device)
        results[device] = run_audit(model, data, vector_spec(), k=16, sampling="haar", batch_size=128, bootstrap=100,
                                    device=torch.device(device)).total
    assert results["cuda"].rel_equiv_error == pytest.approx(results["cpu"].rel_equiv_error, rel=1e-9)
    assert results["cuda"].rel_equiv_error == pytest.approx(linear_map_ree(matrix), rel=0.03)


def test_exact_cube_rotations_on_cuda():
    grid = torch.rand(2, 3, 8, 8, 8, device="cuda")
    rotations = cube_rotations(device="cuda").expand(2, -1, -1, -1)
    orbit = rotate_grid(grid, rotations)
    assert torch.equal(unrotate_grid(orbit, rotations), grid.unsqueeze(1).expand_as(orbit))
    assert torch.equal(orbit.cpu(), rotate_grid(grid.cpu(), rotations.cpu()))

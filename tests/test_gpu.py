"""CUDA gives the same audit as the CPU (skipped where there is no GPU)."""

import importlib.util

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


# ---------------------------------------------------------------------- the fast path (equiaudit.fast)


def _fast_problem(device: str, n: int = 96):
    import dataclasses

    from equiaudit.fast import pinned
    from equiaudit.groups import make_group
    from equiaudit.plan import AuditPlan

    plan = AuditPlan(dataclasses.replace(vector_spec(), group=make_group("so3", 16)), batch_size=16, bootstrap=100,
                     device=torch.device(device))
    return plan, pinned(plan.prepare(vector_dataset(n, 8)), plan.device)


def test_staged_batches_on_a_side_stream_equal_the_plain_path():
    """Orbit inputs built one batch ahead on a side stream (the default on CUDA) = built in place."""
    from equiaudit.fast import staged_batches
    from equiaudit.plan import evaluation_mode
    from equiaudit.stats import SampleStats

    plan, prepared = _fast_problem("cuda")
    assert prepared.data["pos"].is_pinned() and prepared.elements.is_pinned()
    model = LinearMap(random_matrix()).double().cuda()
    staged = plan.evaluate(model, prepared)  # the default path on CUDA: staged
    plain = SampleStats(plan.heads)
    with evaluation_mode(model):
        for number, batch, ids, elements, index, rotated, chosen in staged_batches(plan, model, prepared, prebuild=False):
            assert rotated is None
            plan.evaluate_batch(model, batch, ids, elements, stats=plain, index=index)
    a, b = staged.finalized().tables["samples"], plain.finalized().tables["samples"]
    for name in a.names():
        assert torch.equal(a.column(name), b.column(name)), name
    cpu_plan, cpu_prepared = _fast_problem("cpu")
    cpu = cpu_plan.audit(LinearMap(random_matrix()).double(), cpu_prepared).total
    assert plan.summarize(staged).total.rel_equiv_error == pytest.approx(cpu.rel_equiv_error, rel=1e-9)


def test_compile_on_cuda_gives_the_plain_numbers():
    from equiaudit.fast import compile_model

    plan, prepared = _fast_problem("cuda")
    plain = plan.audit(LinearMap(random_matrix()).float().cuda(), prepared).total
    compiled = plan.audit(compile_model(LinearMap(random_matrix()).float().cuda()), prepared).total
    assert compiled.rel_equiv_error == pytest.approx(plain.rel_equiv_error, rel=1e-5)


def test_bf16_autocast_runs_and_reads_above_float32():
    import dataclasses

    plan, prepared = _fast_problem("cuda")
    model = LinearMap(torch.eye(3, dtype=torch.float64)).float().cuda()  # exactly equivariant
    fp32 = plan.audit(model, prepared).total
    bf16_plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, autocast=torch.bfloat16))
    bf16 = bf16_plan.audit(model, prepared).total
    assert bf16.float_floor > fp32.float_floor  # bf16 rounding is coarser, and the floor says so


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_fused_voxel_kernel_on_cuda_matches_grid_sample(monkeypatch):
    from equiaudit.actions import voxel_kernel
    from equiaudit.rotations import haar_rotations

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 4, 16, 16, 16, generator=g, dtype=dtype).cuda()
        rotations = haar_rotations(2 * 6, g).view(2, 6, 3, 3).cuda()
        monkeypatch.setenv(voxel_kernel.ENV, "torch")
        reference = rotate_grid(x, rotations, method="trilinear")
        monkeypatch.setenv(voxel_kernel.ENV, "triton")
        assert voxel_kernel.usable(x)
        fused = rotate_grid(x, rotations, method="trilinear")
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        assert (fused - reference).abs().max().item() <= tolerance * reference.abs().max().item()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_nccl_two_gpus_equal_one(tmp_path):
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    from run_helpers import make_run, write_config

    config = write_config(tmp_path, samples=64, rotations=8)
    config.write_text(config.read_text() + "batch_size: 8\n")
    run = make_run(tmp_path, "aug")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    args = ["audit", str(config), str(run), "--no-plot", "--device", "cuda"]
    one = subprocess.run([sys.executable, "-m", "equiaudit", *args, "--out", str(tmp_path / "one")], env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "equiaudit", *args, "--out", str(tmp_path / "two"), "--distribute", "samples"], env=env)
    assert one.returncode == 0 and two.returncode == 0
    read = lambda p: list(csv.DictReader((p / "summary.csv").open()))  # noqa: E731
    for a, b in zip(read(tmp_path / "one"), read(tmp_path / "two")):
        assert a["rel_equiv_error"] == b["rel_equiv_error"] and a["rel_equiv_error_ci_low"] == b["rel_equiv_error_ci_low"]

"""The opt-in fused Triton voxel kernel against the torch path (its reference and test oracle).

Runs wherever Triton can be imported: on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess so the setting holds from Triton's first import),
on CUDA natively in ``tests/test_gpu.py``. Skipped where Triton is absent (the CPU wheel of
torch does not ship it): the default path never uses the kernel.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from equiaudit.actions import voxel_kernel, voxels

CHECK = textwrap.dedent("""
    import os, torch
    from equiaudit.actions import voxels, voxel_kernel
    from equiaudit.rotations import haar_rotations
    g = torch.Generator().manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.float64):
        for shape, align in (((2, 3, 8, 8, 8), False), ((2, 2, 5, 6, 7), True), ((3, 1, 6, 6, 6), False)):
            x = torch.randn(*shape, generator=g, dtype=dtype)
            R = haar_rotations(shape[0] * 3, g).view(shape[0], 3, 3, 3)
            os.environ[voxel_kernel.ENV] = "torch"
            ref = voxels.rotate_grid(x, R, method="trilinear", align_corners=align)
            back_ref = voxels.unrotate_grid(ref, R, method="trilinear", align_corners=align)
            os.environ[voxel_kernel.ENV] = "triton"
            assert voxel_kernel.usable(x)
            got = voxels.rotate_grid(x, R, method="trilinear", align_corners=align)
            back = voxels.unrotate_grid(got, R, method="trilinear", align_corners=align)
            assert got.shape == ref.shape and got.dtype == ref.dtype
            scale = ref.abs().max().item()
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), (got - ref).abs().max().item() / scale,
                                    (back - back_ref).abs().max().item() / scale)
    print(worst)
    assert worst["torch.float32"] < 1e-5 and worst["torch.float64"] < 1e-12, worst
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (not in the CPU torch wheel)")
def test_fused_kernel_matches_grid_sample_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_kernel_is_off_unless_asked_and_falls_back_cleanly(monkeypatch):
    x = torch.randn(1, 1, 4, 4, 4)
    monkeypatch.delenv(voxel_kernel.ENV, raising=False)
    assert not voxel_kernel.enabled() and not voxel_kernel.usable(x)
    monkeypatch.setenv(voxel_kernel.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not voxel_kernel.usable(x)  # a CPU grid without the interpreter: the torch path
    rotations = torch.eye(3, dtype=torch.float64).expand(1, 1, 3, 3)
    assert torch.allclose(voxels.rotate_grid(x, rotations, method="trilinear")[:, 0], x, atol=1e-6)

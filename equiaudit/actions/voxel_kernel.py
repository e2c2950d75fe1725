"""A fused Triton kernel for trilinear voxel-grid rotation (opt-in; the torch path is the reference).

The torch path (:func:`equiaudit.actions.voxels._resample`) makes the orbit of a grid in
three passes over memory: ``affine_grid`` writes a sampling grid of 3 coordinates per
output voxel, ``grid_sample`` reads it and writes ``(N, C, M·D, H, W)``, and a transpose
copies that to ``(N, M, C, D, H, W)``. :func:`rotate_trilinear` does it in one: each
program takes a block of output voxels of one ``(n, m)``, computes their source points
``θ·p`` from the 3×4 matrix itself, and writes every channel's trilinear value straight
into the orbit's layout. The arithmetic is ``grid_sample``'s (``bilinear`` on 5-D input,
zero padding, the same ``align_corners`` unnormalisation), so the two agree to rounding
(the coordinates are computed in the grid's dtype, as ``affine_grid`` does).

Status: validated against the torch path with ``TRITON_INTERPRET=1`` on the CPU
(``tests/test_voxels_kernel.py``, wherever Triton is installed) and on CUDA by
``tests/test_gpu.py`` / ``benchmarks/gpu_check.sh``, which also time it against
``grid_sample``. It stays off the default path until that GPU check shows it faster:
``EQUIAUDIT_VOXEL_KERNEL=triton`` turns it on (CUDA grids only; anything else, or a
missing Triton, falls back to the torch path). Triton is imported on first use only.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["enabled", "available", "rotate_trilinear", "ENV"]

ENV = "EQUIAUDIT_VOXEL_KERNEL"
_BLOCK = 256


def enabled() -> bool:
    """``EQUIAUDIT_VOXEL_KERNEL=triton`` was asked for."""
    return os.environ.get(ENV, "torch").strip().lower() == "triton"


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Triton can be imported (it is not part of the CPU torch wheel)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: the torch path is used
        return False
    return True


def usable(x: torch.Tensor) -> bool:
    """The fused kernel applies to ``x``: asked for, Triton present, and a CUDA grid (or
    Triton's interpreter, ``TRITON_INTERPRET=1``, which runs it on CPU tensors)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return enabled() and available() and (x.is_cuda or interpreted) and x.dtype in (torch.float32, torch.float64)


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rotate(x_ptr, theta_ptr, out_ptr, M, C, D, H, W, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
        # program (voxel block, n·M + m); theta (N·M, 3, 4) row-major; x (N, C, D, H, W); out (N, M, C, D, H, W)
        block = tl.program_id(0)
        nm = tl.program_id(1)
        n = nm // M
        size = D * H * W
        offs = block * BLOCK + tl.arange(0, BLOCK)
        live = offs < size
        w = offs % W
        h = (offs // W) % H
        d = offs // (W * H)
        t = theta_ptr + nm * 12
        t00, t01, t02, t03 = tl.load(t + 0), tl.load(t + 1), tl.load(t + 2), tl.load(t + 3)
        t10, t11, t12, t13 = tl.load(t + 4), tl.load(t + 5), tl.load(t + 6), tl.load(t + 7)
        t20, t21, t22, t23 = tl.load(t + 8), tl.load(t + 9), tl.load(t + 10), tl.load(t + 11)
        dtype = t00.dtype
        fw, fh, fd = W.to(dtype), H.to(dtype), D.to(dtype)
        # Normalised output coordinates (affine_grid's base grid), x = W axis, y = H, z = D.
        if ALIGN:  # linspace(-1, 1, L): -1 for L = 1
            bx = w.to(dtype) * 2 / tl.maximum(fw - 1, 1) - 1
            by = h.to(dtype) * 2 / tl.maximum(fh - 1, 1) - 1
            bz = d.to(dtype) * 2 / tl.maximum(fd - 1, 1) - 1
        else:
            bx = (w.to(dtype) * 2 + 1) / fw - 1
            by = (h.to(dtype) * 2 + 1) / fh - 1
            bz = (d.to(dtype) * 2 + 1) / fd - 1
        gx = t00 * bx + t01 * by + t02 * bz + t03
        gy = t10 * bx + t11 * by + t12 * bz + t13
        gz = t20 * bx + t21 * by + t22 * bz + t23
        # grid_sample's unnormalisation to voxel indices.
        if ALIGN:
            ix = (gx + 1) / 2 * (fw - 1)
            iy = (gy + 1) / 2 * (fh - 1)
            iz = (gz + 1) / 2 * (fd - 1)
        else:
            ix = ((gx + 1) * fw - 1) / 2
            iy = ((gy + 1) * fh - 1) / 2
            iz = ((gz + 1) * fd - 1) / 2
        x0f, y0f, z0f = tl.floor(ix), tl.floor(iy), tl.floor(iz)
        fx, fy, fz = ix - x0f, iy - y0f, iz - z0f
        x0, y0, z0 = x0f.to(tl.int32), y0f.to(tl.int32), z0f.to(tl.int32)
        x1, y1, z1 = x0 + 1, y0 + 1, z0 + 1
        vx0, vx1 = (x0 >= 0) & (x0 < W), (x1 >= 0) & (x1 < W)
        vy0, vy1 = (y0 >= 0) & (y0 < H), (y1 >= 0) & (y1 < H)
        vz0, vz1 = (z0 >= 0) & (z0 < D), (z1 >= 0) & (z1 < D)
        gx0, gx1 = 1 - fx, fx
        gy0, gy1 = 1 - fy, fy
        gz0, gz1 = 1 - fz, fz
        src = x_ptr + n * C * size
        dst = out_ptr + nm * C * size + offs
        for c in range(0, C):
            base = src + c * size
            acc = tl.zeros([BLOCK], dtype=dtype)
            acc += tl.load(base + (z0 * H + y0) * W + x0, mask=live & vz0 & vy0 & vx0, other=0.0).to(dtype) * (gz0 * gy0 * gx0)
            acc += tl.load(base + (z0 * H + y0) * W + x1, mask=live & vz0 & vy0 & vx1, other=0.0).to(dtype) * (gz0 * gy0 * gx1)
            acc += tl.load(base + (z0 * H + y1) * W + x0, mask=live & vz0 & vy1 & vx0, other=0.0).to(dtype) * (gz0 * gy1 * gx0)
            acc += tl.load(base + (z0 * H + y1) * W + x1, mask=live & vz0 & vy1 & vx1, other=0.0).to(dtype) * (gz0 * gy1 * gx1)
            acc += tl.load(base + (z1 * H + y0) * W + x0, mask=live & vz1 & vy0 & vx0, other=0.0).to(dtype) * (gz1 * gy0 * gx0)
            acc += tl.load(base + (z1 * H + y0) * W + x1, mask=live & vz1 & vy0 & vx1, other=0.0).to(dtype) * (gz1 * gy0 * gx1)
            acc += tl.load(base + (z1 * H + y1) * W + x0, mask=live & vz1 & vy1 & vx0, other=0.0).to(dtype) * (gz1 * gy1 * gx0)
            acc += tl.load(base + (z1 * H + y1) * W + x1, mask=live & vz1 & vy1 & vx1, other=0.0).to(dtype) * (gz1 * gy1 * gx1)
            tl.store(dst + c * size, acc.to(out_ptr.dtype.element_ty), mask=live)

    return rotate


def rotate_trilinear(x: torch.Tensor, theta: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """The orbit ``(N, M, C, D, H, W)`` of grids ``x`` ``(N, C, D, H, W)`` under the normalised
    affine maps ``theta`` ``(N, M, 3, 4)`` (what ``affine_grid`` takes): ``grid_sample``
    (trilinear, zero padding) of ``x[n]`` at ``theta[n, m]·p`` for every output point ``p``."""
    n, c, d, h, w = x.shape
    m = theta.shape[1]
    x = x.contiguous()
    theta = theta.reshape(n * m, 3, 4).to(device=x.device, dtype=x.dtype).contiguous()
    out = torch.empty((n, m, c, d, h, w), dtype=x.dtype, device=x.device)
    grid = (-(-(d * h * w) // _BLOCK), n * m)
    _kernel()[grid](x, theta, out, m, c, d, h, w, ALIGN=bool(align_corners), BLOCK=_BLOCK)
    return out

"""Time voxel-grid rotations and the voxelizer against a plain copy of the same output bytes.

    python benchmarks/bench_voxels.py --device auto --batch 8 --grid 32

Each kernel is compared with ``tensor.clone()`` of a tensor the size of its output: the
memory-bound floor. Goals: the exact cube rotations within 3x of that copy (1.5x on a GPU);
the fused Triton kernel (a row where Triton and CUDA exist) against ``grid_sample``'s row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from equiaudit.actions import voxel_kernel
from equiaudit.actions.voxels import rotate_grid
from equiaudit.rotations import cube_rotations, haar_rotations
from equiaudit.voxelize import VoxelGridSpec, voxelize


def timed_pair(fn, reference, device: torch.device, warmup: int, repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``fn()`` and of ``reference()``, and the median of their per-repeat ratio.

    The two are timed alternately, so both see the same machine load (shared CPUs are noisy).
    """

    def once(f) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        fn()
        reference()
    pairs = [(once(fn), once(reference)) for _ in range(repeats)]
    times, refs = zip(*pairs)
    return statistics.median(times), statistics.median(refs), statistics.median(t / r for t, r in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch", type=int, default=8, help="samples (grids or molecules) B")
    parser.add_argument("--grid", type=int, default=32, help="grid side L")
    parser.add_argument("--channels", type=int, default=8, help="channels C of the rotated grids")
    parser.add_argument("--atoms", type=int, default=20, help="atoms per molecule for the voxelizer")
    parser.add_argument("--rotations", type=int, default=24, help="K for the trilinear case")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    b, c, size, k = args.batch, args.channels, args.grid, args.rotations

    grid = torch.randn(b, c, size, size, size, generator=gen, dtype=dtype).to(device)
    cube = cube_rotations().expand(b, 24, 3, 3).to(device)
    haar = haar_rotations(b * k, gen).view(b, k, 3, 3).to(device)
    spec = VoxelGridSpec(grid_size=size)
    pos = (torch.randn(b, args.atoms, 3, generator=gen, dtype=torch.float64) * 1.5).to(device)
    z = torch.tensor(spec.elements)[torch.randint(0, 5, (b, args.atoms), generator=gen)].to(device)
    mask = torch.ones(b, args.atoms, dtype=torch.bool, device=device)

    def fused():  # the opt-in Triton kernel (equiaudit.actions.voxel_kernel), same call
        os.environ[voxel_kernel.ENV] = "triton"
        try:
            return rotate_grid(grid, haar)
        finally:
            os.environ[voxel_kernel.ENV] = "torch"

    os.environ[voxel_kernel.ENV] = "torch"
    cases = [
        (f"exact 24 cube rotations  ({b},{c},{size}^3) -> ({b},24,...)", lambda: rotate_grid(grid, cube)),
        (f"trilinear K={k} rotations ({b},{c},{size}^3) -> ({b},{k},...)", lambda: rotate_grid(grid, haar)),
        (f"voxelize {b} x {args.atoms} atoms -> ({b},{spec.n_channels},{size}^3)",
         lambda: voxelize(pos, z, mask, spec, dtype=dtype)),
    ]
    if voxel_kernel.available() and grid.is_cuda:
        err = (fused() - rotate_grid(grid, haar)).abs().max().item()
        cases.insert(2, (f"trilinear fused Triton K={k} (max |diff| {err:.1e})", fused))

    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"median of {args.repeats} after {args.warmup} warm-up; ratio = median of paired (case / clone)")
    print(f"{'case':<58} {'out MB':>8} {'time ms':>9} {'clone ms':>9} {'ratio':>7}")
    for name, fn in cases:
        out = fn()
        reference = torch.empty_like(out)
        t_case, t_clone, ratio = timed_pair(fn, reference.clone, device, args.warmup, args.repeats)
        megabytes = out.numel() * out.element_size() / 2**20
        print(f"{name:<58} {megabytes:>8.1f} {1e3 * t_case:>9.2f} {1e3 * t_clone:>9.2f} {ratio:>6.1f}x")


if __name__ == "__main__":
    main()

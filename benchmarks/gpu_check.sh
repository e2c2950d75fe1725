#!/usr/bin/env bash
# One pass of the GPU checks, sized for about 10 minutes on one H200: the CUDA tests, the
# GPU goals, and a short demo. Run from the repository root on a machine with CUDA (after the
# README's install). Everything printed also goes to $OUT/gpu_check.log when OUT is set,
# each benchmark's output to its own $OUT/<name>.txt. A step that fails or runs past its
# time limit is reported and the next one still runs; the script exits 1 if any failed.
#
# Goals (README "Speed"):
#   engine <= 1.05 x a plain forward, >= 50 x the naive loop   (bench_engine.py)
#   exact cube rotations <= 1.5 x a clone of the same bytes     (bench_voxels.py)
#   fused Triton voxel kernel vs grid_sample + transpose        (bench_voxels.py, when Triton imports)
#   ~100M-parameter transformer at bf16: samples x rotations/s, engine/forward <= 1.05 (bench_throughput.py)
#   --dynamics gradients <= ~3 forward-equivalents of the audit's orbit pass (bench_dynamics_audit.py; issue 12)
#   chunk_size auto <= 1.15 x the best plain forward over chunk sizes 32..8192 (bench_chunking.py; issue 21)
#
# Parts, so that each fits a 10-minute command (the device machine's limit per call; the sums of
# the time limits are 510 s each):  gpu_check.sh 1   tests, engine, voxels, dynamics
#                                   gpu_check.sh 2   100M-parameter throughput (eager, compiled), demo
#                                   gpu_check.sh 3   chunk_size auto against the best chunk (about 4 minutes)
#                                   gpu_check.sh     all three
set -uo pipefail
part="${1:-all}"
case "$part" in 1|2|3|all) ;; *) echo "usage: gpu_check.sh [1|2|3]" >&2; exit 2 ;; esac
out="${OUT:-}"
if [ -n "$out" ]; then mkdir -p "$out"; exec > >(tee "$out/gpu_check.log") 2>&1; fi
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  if [ -n "$out" ]; then
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"; rc=${PIPESTATUS[0]}
  else
    timeout "$limit" "$@"; rc=$?
  fi
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name($rc)")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
python -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not installed (the fused voxel kernel is skipped)"

if [ "$part" = 1 ] || [ "$part" = all ]; then
    step tests 150 python -m pytest -q -m gpu tests/test_gpu.py tests/test_voxels_kernel.py tests/test_fast.py
    step engine 90 python benchmarks/bench_engine.py --device cuda --naive-repeats 1
    step engine_large 60 python benchmarks/bench_engine.py --device cuda --batch 1024 --rotations 32 --naive-repeats 0
    step voxels 60 python benchmarks/bench_voxels.py --device cuda
    step voxels_64 60 python benchmarks/bench_voxels.py --device cuda --grid 64 --batch 4
    step dynamics 90 python benchmarks/bench_dynamics_audit.py --device cuda --samples 512 --rotations 16 --hidden 256 --layers 4
fi
if [ "$part" = 2 ] || [ "$part" = all ]; then
    step throughput_bf16 120 python benchmarks/bench_throughput.py --device cuda --hidden 1024 --layers 12 --autocast bfloat16
    step throughput_bf16_compile 150 python benchmarks/bench_throughput.py --device cuda --hidden 1024 --layers 12 --autocast bfloat16 --compile --repeats 3
    step demo 240 equiaudit demo --device cuda --task flow_matching --out "${out:-/tmp}/demo_gpu"
fi
if [ "$part" = 3 ] || [ "$part" = all ]; then
    # The transformer (256 x 16 atoms x 32 rotations) at 4x the samples, the EGNN, the voxel U-Net.
    step chunking 150 python benchmarks/bench_chunking.py --device cuda --scale 4 --repeats 5
    step chunking_sevennet 90 python benchmarks/bench_chunking.py --device cuda --models graph --graph sevennet --scale 2
fi

if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all GPU checks ran"

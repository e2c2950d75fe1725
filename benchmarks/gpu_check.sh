#!/usr/bin/env bash
# One pass of the GPU checks: the CUDA tests, the benchmarks on the GPU, and a short demo.
# Run from the repository root on a machine with CUDA (after the README's install).
set -uo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -m gpu tests/test_gpu.py
python benchmarks/bench_engine.py --device cuda --naive-repeats 1
python benchmarks/bench_engine.py --device cuda --batch 1024 --rotations 32 --naive-repeats 0
python benchmarks/bench_voxels.py --device cuda
time equiaudit demo --device cuda --out /tmp/demo_gpu

"""One process against two torchrun ranks (gloo, CPU) on the same audit: speed-up, and every number compared.

    python benchmarks/bench_distributed.py [--samples 256 | --pool 1000] [--rotations 16] [--repeats 3] [--modes samples,checkpoints]

The audit is the flow-matching run of ``equiaudit train flow_matching --steps 300`` (trained
once into ``--workdir`` if it is not there: about a minute on 2 cores): 5 checkpoints of a
2-layer transformer, K = 16 rotations, ``--samples`` of the run's test file (or ``--pool`` of its
training file: a longer audit, so process start-up weighs less). Runs alternate
(one, two ranks sharing samples, two ranks splitting checkpoints, one, ...) so they see the
same machine load; each run writes a fresh ``OUT``. Every rank runs one intra-op thread, and
so does the reference process ("one"); "one/T threads" is one process with all ``--threads``
(on a shared, loaded machine intra-op threads can be slower than one: ranks do not contend
for a thread pool).

Printed: the median wall time of each command (process start, imports and rendezvous
included) and of the audit itself (``run.json``'s ``seconds``), the speed-ups, and for
every numeric column of ``summary.csv`` and ``breakdown.csv`` the largest absolute and
relative difference from the one-process run (the timing column ``seconds`` excepted).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ensure_run(workdir: Path, steps: int) -> Path:
    config = workdir / "flow_matching" / "config.yaml"
    if not config.is_file():
        print(f"training flow_matching for {steps} steps into {workdir} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "equiaudit", "train", "flow_matching", "--steps", str(steps), "--out", str(workdir)],
                       check=True, stdout=subprocess.DEVNULL)
    return config


def pool_config(config: Path, pool: int, workdir: Path) -> Path:
    """The run's config, auditing ``pool`` samples of its *training* file (the test file has 256)."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["data"] = {**raw["data"], "path": str(Path(raw["data"]["path"]).with_name("lj13_train.npz")), "samples": pool}
    out = workdir / f"pool_{pool}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def read(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def differences(one: Path, other: Path) -> dict[str, tuple[float, float]]:
    """``{file:column: (max |a − b|, max |a − b| / |a|)}`` over the numeric columns."""
    out: dict[str, tuple[float, float]] = {}
    for name in ("summary.csv", "breakdown.csv"):
        a, b = read(one / name), read(other / name)
        if len(a) != len(b):
            raise SystemExit(f"{name}: {len(a)} rows vs {len(b)}")
        for x, y in zip(a, b):
            for key in x:
                if key == "seconds":
                    continue
                try:
                    u, v = float(x[key]), float(y[key])
                except ValueError:
                    if x[key] != y[key]:
                        raise SystemExit(f"{name}: {key} {x[key]!r} != {y[key]!r}") from None
                    continue
                if math.isnan(u) and math.isnan(v):
                    continue
                absolute = abs(u - v)
                relative = absolute / abs(u) if u else (0.0 if absolute == 0 else math.inf)
                got = out.get(f"{name}:{key}", (0.0, 0.0))
                out[f"{name}:{key}"] = (max(got[0], absolute), max(got[1], relative))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "equiaudit_bench_fm")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pool", type=int, help="audit this many samples of the run's training file (up to 1000)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads of the 'one/T threads' setup")
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--modes", default="samples,checkpoints")
    args = parser.parse_args()
    config = ensure_run(args.workdir, args.steps)
    if args.pool:
        config, args.samples = pool_config(config, args.pool, args.workdir), args.pool
    modes = [m for m in args.modes.split(",") if m]
    scratch = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    base = ["audit", str(config), "--samples", str(args.samples), "--rotations", str(args.rotations), "--no-plot",
            "--device", "cpu", "--format", "json"]
    runs = {"one": ([sys.executable, "-m", "equiaudit", *base], 1)}
    if args.threads > 1:
        runs[f"one/{args.threads} threads"] = ([sys.executable, "-m", "equiaudit", *base], args.threads)
    for mode in modes:
        runs[f"two/{mode}"] = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "-m", "equiaudit", *base, "--distribute", mode], 1)
    wall: dict[str, list[float]] = {name: [] for name in runs}
    inner: dict[str, list[float]] = {name: [] for name in runs}
    last: dict[str, Path] = {}
    for repeat in range(args.repeats):
        for name, (cmd, threads) in runs.items():
            out = scratch / f"{name.replace('/', '_')}_{repeat}"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            start = time.perf_counter()
            proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
            wall[name].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            inner[name].append(json.loads((out / "run.json").read_text())["seconds"])
            last[name] = out
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); "
          f"{config.name}: {len(read(last['one'] / 'summary.csv')) // 2} checkpoints, N={args.samples}, "
          f"K={args.rotations}; median of {args.repeats} interleaved runs; speed-ups against 'one' (1 thread)")
    print(f"{'setup':<18}{'wall s':>9}{'audit s':>9}{'speed-up wall':>15}{'speed-up audit':>16}")
    for name in runs:
        w, a = statistics.median(wall[name]), statistics.median(inner[name])
        w1, a1 = statistics.median(wall["one"]), statistics.median(inner["one"])
        print(f"{name:<18}{w:>9.2f}{a:>9.2f}{w1 / w:>14.2f}x{a1 / a:>15.2f}x")
    for name in runs:
        if name == "one":
            continue
        diffs = differences(last["one"], last[name])
        worst_abs = max(d[0] for d in diffs.values())
        worst_rel = max(d[1] for d in diffs.values())
        print(f"{name}: {len(diffs)} numeric columns compared; max |difference| {worst_abs:.3g}, max relative {worst_rel:.3g}")
        for key, (absolute, relative) in sorted(diffs.items()):
            if absolute:
                print(f"    {key}: {absolute:.3g} ({relative:.3g} relative)")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Audit throughput of a large model: samples × rotations per second, against its plain forward passes.

    python benchmarks/bench_throughput.py --device cuda [--hidden 1024 --layers 12] [--autocast bfloat16] [--compile]

The model is the zoo's transformer force field (direct force head) at ``--hidden`` ×
``--layers`` (1024 × 12 ≈ 101M parameters); each sample is ``--atoms`` atoms, every batch
``--batch`` samples × ``--rotations`` rotations (one forward of B·K inputs, in chunks of
``--chunk``). Timed, interleaved, after warm-up:

  forward — the model on the B·K pre-rotated inputs under the same autocast (the limit);
  engine  — ``AuditPlan.evaluate`` over ``--batches`` batches (on CUDA: pinned inputs, the
            next batch staged on a side stream), everything the audit adds included.

Prints samples × rotations per second of both and their ratio (goal on a GPU: ≤ 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from equiaudit import actions
from equiaudit.engine import HeadSpec, OrbitSpec
from equiaudit.fast import compile_model, pinned
from equiaudit.groups import make_group
from equiaudit.plan import AuditPlan
from equiaudit.zoo import transformer_force_field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--atoms", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--autocast", choices=["none", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = transformer_force_field(hidden=args.hidden, layers=args.layers, heads=args.heads).to(device).eval()
    if args.compile:
        model = compile_model(model)
    autocast = None if args.autocast == "none" else getattr(torch, args.autocast)
    n, k, b = args.batch * args.batches, args.rotations, args.batch
    g = torch.Generator().manual_seed(0)
    data = {
        "pos": torch.randn(n, args.atoms, 3, generator=g, dtype=torch.float64),
        "z": torch.randint(1, 5, (n, args.atoms), generator=g),
        "mask": torch.ones(n, args.atoms, dtype=torch.bool),
        "energy": torch.randn(n, generator=g, dtype=torch.float64),
        "forces": torch.randn(n, args.atoms, 3, generator=g, dtype=torch.float64),
    }
    spec = OrbitSpec(fields={"pos": "point", "z": "scalar"},
                     heads=(HeadSpec("energy", "scalar", "energy"), HeadSpec("forces", "vector", "forces")),
                     inputs=["pos", "z", "mask"], group=make_group("so3", k), chunk_size=args.chunk, autocast=autocast)
    plan = AuditPlan(spec, batch_size=b, device=device, float_floor=False, bootstrap=0)
    prepared = pinned(plan.prepare(data), device)

    # The plain forwards of the same B·K inputs, batch after batch, pre-rotated and on the device.
    inputs = []
    for fields, _, elements, _ in prepared.batches(b):
        fields = {f: v.to(device) for f, v in fields.items()}
        rot = elements.to(device)
        pos = actions.rotate("point", fields["pos"], rot, fields["mask"]).reshape(b * k, -1, 3).float()
        inputs.append((pos, fields["z"].repeat_interleave(k, 0), fields["mask"].repeat_interleave(k, 0)))

    def forward():
        context = torch.autocast(device.type, dtype=autocast) if autocast else torch.no_grad()
        with torch.inference_mode(), context:
            for pos, z, mask in inputs:
                for start in range(0, len(pos), args.chunk):
                    model(pos[start:start + args.chunk], z[start:start + args.chunk], mask[start:start + args.chunk])

    def engine():
        plan.evaluate(model, prepared)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up (compilation, cuBLAS heuristics, the allocator)
        forward(), engine()
    times = {"forward": [], "engine": []}
    for _ in range(args.repeats):
        times["forward"].append(timed(forward))
        times["engine"].append(timed(engine))
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}; transformer_force_field {args.hidden}x{args.layers}: "
          f"{params / 1e6:.1f}M parameters; autocast {args.autocast}; compile {args.compile}")
    print(f"{n} samples x {k} rotations x {args.atoms} atoms in batches of {b} (chunks of {args.chunk}); "
          f"median of {args.repeats}")
    for what, values in times.items():
        median = statistics.median(values)
        print(f"{what:<8} {median:8.3f} s   {n * k / median:12.0f} samples x rotations / s")
    ratio = statistics.median(times["engine"]) / statistics.median(times["forward"])
    print(f"engine / forward = {ratio:.3f}   (goal on a GPU <= 1.05)")


if __name__ == "__main__":
    main()

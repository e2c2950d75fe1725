"""How much does the audit add on top of the model's own forward passes?

Times, in one process and interleaved (A B C A B C ...), on the same B·K rotated inputs:

  (a) engine  — `AuditPlan.evaluate` (the path of every face): rotate (float64), forward,
                un-rotate, bias-corrected per-sample statistics (no floor, no breakdown);
  (b) naive   — a Python loop: one forward per sample per rotation, then the same statistics;
  (c) forward — one plain batched forward of the B·K pre-rotated inputs (the physical limit).

and prints the medians and the ratios engine/forward (goal ≤ 1.15 on a CPU, ≤ 1.05 on a GPU) and
naive/engine (goal ≥ 50× on a GPU).

    python benchmarks/bench_engine.py [--device cpu|cuda] [--batch 256] [--rotations 32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from equiaudit import actions
from equiaudit.engine import HeadSpec, OrbitSpec
from equiaudit.groups import make_group
from equiaudit.plan import AuditPlan
from equiaudit.metrics import orbit_terms, reduce_per_sample
from equiaudit.zoo import transformer_force_field


def make_problem(batch: int, atoms: int, rotations: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    data = {
        "pos": torch.randn(batch, atoms, 3, generator=g, dtype=torch.float64),
        "z": torch.randint(1, 5, (batch, atoms), generator=g),
        "mask": torch.ones(batch, atoms, dtype=torch.bool),
        "energy": torch.randn(batch, generator=g, dtype=torch.float64),
        "forces": torch.randn(batch, atoms, 3, generator=g, dtype=torch.float64),
    }
    data = {k: v.to(device) for k, v in data.items()}
    spec = OrbitSpec(
        fields={"pos": "point", "z": "scalar"},
        heads=(HeadSpec("energy", "scalar", "energy"), HeadSpec("forces", "vector", "forces")),
        inputs=["pos", "z", "mask"],
        group=make_group("so3", rotations),
    )
    plan = AuditPlan(spec, batch_size=batch, device=device, float_floor=False)
    prepared = plan.prepare(data)  # the elements are drawn once per audit, not per checkpoint
    return data, prepared.elements.to(device), plan, prepared


def run_engine(model, plan, prepared):
    return plan.evaluate(model, prepared).tables["samples"].column("equiv_error/forces")


def run_naive(model, data, rots, spec, device):
    """One forward per (sample, rotation): what a hand-written equivariance check usually does."""
    b, k = rots.shape[:2]
    energies, forces = [], []
    with torch.inference_mode():
        for i in range(b):
            pos = actions.centre(data["pos"][i : i + 1], data["mask"][i : i + 1])
            for j in range(k):
                r = rots[i, j]
                out = model((pos @ r.T).float(), data["z"][i : i + 1], data["mask"][i : i + 1])
                energies.append(out["energy"].double())
                forces.append(out["forces"].double() @ r)  # row vectors: R^T f  ==  f @ R
    energy = torch.stack(energies).reshape(b, k)
    force = torch.stack(forces).reshape(b, k, *data["forces"].shape[1:])
    e = orbit_terms(energy, data["energy"], "mse")
    f = orbit_terms(force, data["forces"], "mse")
    return reduce_per_sample(e.equiv_error), reduce_per_sample(f.equiv_error, data["mask"])


def make_forward(model, data, rots):
    b, k = rots.shape[:2]
    pos = actions.rotate("point", data["pos"], rots, data["mask"]).reshape(b * k, -1, 3).float()
    z = data["z"].repeat_interleave(k, 0)
    mask = data["mask"].repeat_interleave(k, 0)

    def forward():
        with torch.inference_mode():
            return model(pos, z, mask)

    return forward


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rotations", type=int, default=32)
    parser.add_argument("--atoms", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = transformer_force_field(hidden=64, layers=2).to(device).eval()
    data, rots, plan, prepared = make_problem(args.batch, args.atoms, args.rotations, device)
    forward = make_forward(model, data, rots)

    engine = lambda: run_engine(model, plan, prepared)
    naive = lambda: run_naive(model, data, rots, plan.spec, device)
    if args.naive_repeats:  # same numbers both ways: the engine is the loop, batched
        engine_forces = engine()
        naive_forces = naive()[1].cpu()
        assert torch.allclose(engine_forces, naive_forces, rtol=1e-3, atol=1e-9), "engine and naive loop disagree"
    forward(), engine()  # warm-up

    times = {"engine": [], "naive": [], "forward": []}
    for i in range(args.repeats):
        times["forward"].append(timed(forward, device))
        times["engine"].append(timed(engine, device))
        if i < args.naive_repeats:
            times["naive"].append(timed(naive, device))
    median = {name: statistics.median(values) for name, values in times.items() if values}

    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: transformer_force_field(hidden=64, layers=2), {sum(p.numel() for p in model.parameters())} parameters; "
          f"B={args.batch} samples x K={args.rotations} rotations x {args.atoms} atoms = {args.batch * args.rotations} forwards")
    print(f"{'what':<10}{'median s':>12}{'runs':>6}")
    for name in median:
        print(f"{name:<10}{median[name]:>12.4f}{len(times[name]):>6}")
    goal = "<= 1.05" if device.type == "cuda" else "<= 1.15"
    print(f"engine / forward = {median['engine'] / median['forward']:.3f}   (goal {goal})")
    if "naive" in median:
        print(f"naive / engine   = {median['naive'] / median['engine']:.1f}x speed-up of the batched engine"
              + ("   (goal >= 50x)" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()

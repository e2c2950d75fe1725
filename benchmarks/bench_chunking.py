"""Does ``chunk_size: auto`` make the audit cost what the model's best-batched forward costs?

For each model (a transformer, a graph network, a 3D CNN) the same rotated inputs (every
sample × every rotation, built once) are run:

  forward@c    plain forwards in chunks of c rows, c = 32, 64, …, 8192 (at most all rows):
               a one-pass screen of every c, then the two fastest timed again below;
  auto, fresh  ``AuditPlan.evaluate`` (the path of every face: rotate, forward, map back,
               per-sample statistics) with a NEW ``chunk_size: auto`` search each time — an
               audit of a run's first checkpoint, the search's cost included;
  auto, tuned  the same with the size already chosen — every later checkpoint of the run;

timed interleaved (A B C A B C …, :mod:`timing`), medians, and prints each one's ratio to the
best plain forward (goal ≤ 1.15 on a CPU) and how much it raised the process's peak memory
(``VmHWM`` / ``max_memory_allocated`` over what was in use before, one run each).

    python benchmarks/bench_chunking.py [--device cpu|cuda] [--models transformer,egnn,cnn]
                                        [--graph egnn|sevennet] [--repeats 3] [--threads 1]

Models: ``transformer`` is the issue's held-out performance model (3 layers, width 128,
256 samples × 16 atoms × 32 rotations); ``egnn`` the zoo's EGNN (3 layers, width 64) on
32-atom Lennard-Jones-like clusters (all-pairs messages: memory grows with the chunk);
``sevennet`` SevenNet-0's network (``pip install sevenn``; slow on a CPU: few samples);
``cnn`` the zoo's voxel U-Net (2 channels, width 32) on 17³ grids under the 24 cube rotations.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, machine_line  # noqa: E402

import equiaudit  # noqa: E402
from equiaudit.chunking import AutoChunks  # noqa: E402
from equiaudit.engine import _parameters_frozen, call_model, orbit_inputs  # noqa: E402
from equiaudit.io.resources import memory_probe  # noqa: E402
from equiaudit.zoo import cnn_denoiser, egnn_force_field, transformer_force_field  # noqa: E402

FORCE_FIELD = dict(task="force_field")


def transformer_problem(scale: float):
    torch.manual_seed(0)
    n = max(8, int(256 * scale))
    g = torch.Generator().manual_seed(0)
    data = {"pos": torch.randn(n, 16, 3, generator=g, dtype=torch.float64) * 1.5,
            "z": torch.randint(1, 5, (n, 16), generator=g),
            "energy": torch.randn(n, generator=g, dtype=torch.float64),
            "forces": torch.randn(n, 16, 3, generator=g, dtype=torch.float64)}
    return ("transformer (3 layers, width 128)", transformer_force_field(hidden=128, layers=3, heads=4), data,
            dict(FORCE_FIELD, rotations=32))


def egnn_problem(scale: float):
    torch.manual_seed(0)
    n, atoms = max(8, int(64 * scale)), 32
    g = torch.Generator().manual_seed(1)
    # Clusters on a jittered cubic lattice of spacing 1.1 (no two atoms on top of each other).
    grid = torch.stack(torch.meshgrid(*[torch.arange(4.0)] * 3, indexing="ij"), -1).reshape(-1, 3)[:atoms]
    pos = (grid * 1.1 + 0.1 * torch.randn(n, atoms, 3, generator=g)).double()
    data = {"pos": pos, "z": torch.randint(1, 4, (n, atoms), generator=g),
            "energy": torch.randn(n, generator=g, dtype=torch.float64),
            "forces": torch.randn(n, atoms, 3, generator=g, dtype=torch.float64)}
    return ("EGNN (3 layers, width 64), 32-atom clusters", egnn_force_field(hidden=64, layers=3), data,
            dict(FORCE_FIELD, rotations=32))


def sevennet_problem(scale: float):
    from ase.collections import g2

    from equiaudit.zoo.sevennet import sevennet_force_field

    names = [m for m in g2.names if set(g2[m].get_chemical_symbols()) <= {"H", "C", "N", "O"} and len(g2[m]) >= 3]
    names = names[: max(4, int(32 * scale))]
    atoms = max(len(g2[m]) for m in names)
    pos = torch.zeros(len(names), atoms, 3, dtype=torch.float64)
    z = torch.zeros(len(names), atoms, dtype=torch.int64)
    mask = torch.zeros(len(names), atoms, dtype=torch.bool)
    for i, m in enumerate(names):
        a = g2[m]
        pos[i, : len(a)] = torch.from_numpy(a.get_positions())
        z[i, : len(a)] = torch.from_numpy(a.get_atomic_numbers())
        mask[i, : len(a)] = True
    data = {"pos": pos, "z": z, "mask": mask, "energy": torch.zeros(len(names), dtype=torch.float64),
            "forces": torch.zeros(len(names), atoms, 3, dtype=torch.float64)}
    model = sevennet_force_field("7net-0")
    return ("SevenNet-0 (grad forces), g2 molecules", model, data, dict(FORCE_FIELD, rotations=8, grad=True))


def cnn_problem(scale: float):
    torch.manual_seed(0)
    n = max(2, int(16 * scale))
    g = torch.Generator().manual_seed(2)
    grid = torch.randn(n, 2, 17, 17, 17, generator=g, dtype=torch.float64)
    settings = dict(task="custom", fields={"grid": "voxel"}, heads={"out": {"rep": "voxel", "target": "grid", "loss": "mse"}},
                    inputs=["grid"], outputs=["out"], group="octahedral")
    return "voxel U-Net (2 channels, width 32), 17³ grids", cnn_denoiser(channels=2, width=32), {"grid": grid}, settings


PROBLEMS = {"transformer": transformer_problem, "egnn": egnn_problem, "sevennet": sevennet_problem, "cnn": cnn_problem}


def peak_extra(fn, device) -> int | None:
    """How much one call of ``fn`` raised the process's memory above what was in use before."""
    probe = memory_probe(device)
    before = probe.in_use()
    probe.start()
    fn()
    peak = probe.peak()
    return None if peak is None or before is None else peak - before


def run(name: str, args, device: torch.device) -> dict[str, float]:
    title, model, data, settings = PROBLEMS[name](args.scale)
    model = model.to(device).eval()
    auditor = equiaudit.Auditor(data, device=device, seed=0, float_floor=False, bootstrap=0, **settings)
    plan = auditor.plan(model)
    prepared = auditor.prepared(plan)
    spec = plan.spec
    on_device = {k: v.to(device) for k, v in prepared.data.items()}
    rotated = orbit_inputs(model, on_device, prepared.elements.to(device), spec)
    rows = next(iter(rotated.values())).shape[0]
    needed = {h.output_name for h in spec.heads}

    def forward(chunk: int):
        def go():
            grad = torch.enable_grad() if spec.grad else torch.inference_mode()
            with grad, _parameters_frozen(model) if spec.grad else torch.no_grad():
                for start in range(0, rows, chunk):
                    piece = {f: v[start:start + chunk] for f, v in rotated.items()}
                    if spec.grad:
                        piece = {f: v.detach().requires_grad_(True) if v.is_floating_point() else v for f, v in piece.items()}
                    out = call_model(model, spec, piece)
                    for n in needed:
                        out[n].detach()
        return go

    decisions: list[str] = []

    def fresh():
        chunks = AutoChunks()
        chunks.listeners.append(lambda search: decisions.append(search.summary()))
        dataclasses.replace(plan, spec=dataclasses.replace(spec, chunks=chunks)).evaluate(model, prepared)

    tuned_plan = dataclasses.replace(plan, spec=dataclasses.replace(spec, chunks=AutoChunks()))
    tuned_plan.evaluate(model, prepared)  # the search, once (and a warm-up)
    tuned = lambda: tuned_plan.evaluate(model, prepared)  # noqa: E731

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes = [c for c in (2 ** i for i in range(5, 14)) if c < rows] + [min(rows, 8192)]
    screen = {}
    forward(sizes[0])()  # warm-up
    for c in sizes:  # one pass over every size, to find the contenders
        sync()
        start = time.perf_counter()
        forward(c)()
        sync()
        screen[c] = time.perf_counter() - start
    contenders = sorted(screen, key=screen.get)[:2]
    cases = {f"forward@{c}": forward(c) for c in contenders}
    cases.update({"auto, fresh": fresh, "auto, tuned": tuned})
    medians = interleaved_medians(cases, args.repeats, warmup=0, sync=sync)
    memory = {case: peak_extra(fn, device) for case, fn in cases.items()}
    best = min(medians[f"forward@{c}"] for c in contenders)

    print(f"\n## {title}: {len(prepared)} samples x {plan.group.n_elements} rotations = {rows} rows "
          f"(batches of {plan.batch_size} samples = {plan.batch_size * plan.group.n_elements} rows)")
    print("screen (one pass, s): " + ", ".join(f"{c}: {t:.3f}" for c, t in screen.items()))
    print(f"{'what':<14}{'median s':>10}{'/ best fwd':>12}{'peak +MiB':>11}")
    for case, seconds in medians.items():
        mib = "" if memory[case] is None else f"{memory[case] / 2**20:.0f}"
        print(f"{case:<14}{seconds:>10.3f}{seconds / best:>12.3f}{mib:>11}")
    print("decision (tuned): " + tuned_plan.spec.chunks.summaries()[0])
    if decisions:
        sizes_chosen = [d.split("→ ")[1].split(" ")[0] for d in decisions if "→" in d]
        print(f"decisions of the {len(decisions)} fresh searches: {', '.join(sizes_chosen)}")
    return {"fresh": medians["auto, fresh"] / best, "tuned": medians["auto, tuned"] / best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="transformer,graph,cnn")
    parser.add_argument("--graph", default="egnn", choices=["egnn", "sevennet"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every problem's sample count")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = ""
    try:
        load = f", load average {Path('/proc/loadavg').read_text().split()[0]}"
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(machine_line() + gpu + load)
    ratios = {}
    for name in args.models.split(","):
        name = args.graph if name == "graph" else name
        ratios[name] = run(name, args, device)
    print("\nauto / best plain forward (goal <= 1.15):")
    for name, r in ratios.items():
        print(f"  {name:<12} first checkpoint (search included) {r['fresh']:.3f}   later checkpoints {r['tuned']:.3f}")
    if ratios:
        worst = max(max(r.values()) for r in ratios.values())
        print(f"worst {worst:.3f} ({'within' if worst <= 1.15 else 'OVER'} 1.15)")


if __name__ == "__main__":
    main()

"""What does the audit add on top of a model family's own batched evaluation?

For every batched route whose package is installed — Orb (the ``orb_v3_direct_20_omat``
architecture, randomly initialised: nothing is downloaded), TorchSim's Lennard-Jones model,
SevenNet-0 (shipped in the sevenn wheel) — times, in one process and interleaved
(A B A B ..., :mod:`benchmarks.timing`), on the same ``B·K`` rotated structures:

  (a) audit   — ``AuditPlan.evaluate`` (the path of every face): rotate in float64, ONE forward of
                the ``B·K`` structures through the family's module, un-rotate, bias-corrected
                per-sample statistics (no float floor, no bootstrap);
  (b) forward — one plain forward of the same pre-rotated ``B·K`` structures through the same
                module (padded batch → the family's one graph / one SimState → energy, forces).

and prints the ratio audit/forward (goal ≤ 1.15). Beside them, the ASE route (EMT: one structure
at a time, the only per-structure loop equiaudit has): its measured cost per structure, and that
divided by the per-structure cost of the batched routes' forward.

    python benchmarks/bench_routes.py [--batch 16] [--rotations 24] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, machine_line  # noqa: E402

import equiaudit  # noqa: E402
from equiaudit.engine import _parameters_frozen, call_model, orbit_inputs  # noqa: E402


def cu_clusters(n: int, seed: int = 0):
    """``n`` padded Cu clusters of 4-6 atoms (no pair closer than 2.2 Å), float64."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.zeros(n, 6, 3, dtype=torch.float64)
    mask = torch.zeros(n, 6, dtype=torch.bool)
    b = 0
    while b < n:
        size = int(torch.randint(4, 7, (1,), generator=g))
        p = torch.randn(size, 3, generator=g, dtype=torch.float64) * 1.7
        d = torch.cdist(p, p) + 10 * torch.eye(size, dtype=torch.float64)
        if d.min() < 2.2 or d.min() > 3.2:
            continue
        pos[b, :size], mask[b, :size] = p, True
        b += 1
    z = torch.where(mask, 29, 0)
    return {"pos": pos, "z": z, "mask": mask, "energy": torch.zeros(n, dtype=torch.float64),
            "forces": torch.zeros(n, 6, 3, dtype=torch.float64)}


def families():
    """(name, model, grad) of every batched route whose package is installed."""
    out = []
    try:
        from equiaudit.zoo.families.orb import orb_force_field

        torch.manual_seed(0)
        out.append(("orb (orb_v3_direct_20_omat, random weights)", orb_force_field(name="orb_v3_direct_20_omat").eval(),
                    False))
    except ImportError as exc:
        print(f"orb: skipped ({exc})")
    try:
        from torch_sim.models.lennard_jones import LennardJonesModel

        from equiaudit.adapters import TorchSimForceField

        lj = LennardJonesModel(sigma=2.3, epsilon=0.4, cutoff=6.0, dtype=torch.float64)
        out.append(("torchsim (LennardJonesModel, float64)", TorchSimForceField(lj), False))
    except ImportError as exc:
        print(f"torchsim: skipped ({exc})")
    try:
        from equiaudit.io.checkpoints import load_into_model, read_checkpoint
        from equiaudit.zoo.families.sevennet import resolve_checkpoint, sevennet_force_field

        sevennet = sevennet_force_field("7net-0")
        load_into_model(sevennet, read_checkpoint(resolve_checkpoint("7net-0")))  # as an audit loads it
        out.append(("sevennet (7net-0, autograd forces)", sevennet.eval(), True))
    except (ImportError, FileNotFoundError) as exc:
        print(f"sevennet: skipped ({exc})")
    return out


def cases(model, grad: bool, data, rotations: int):
    auditor = equiaudit.Auditor(data, task="force_field", rotations=rotations, seed=0, float_floor=False,
                                grad=grad, dtype=None, batch_size=len(data["pos"]), device="cpu")
    plan = auditor.plan(model)
    prepared = auditor.prepared(plan)
    batch = {k: v for k, v in prepared.data.items()}
    inputs = orbit_inputs(model, batch, prepared.elements, plan.spec)

    def audit():
        return plan.evaluate(model, prepared)

    def forward():
        context = (torch.enable_grad(), _parameters_frozen(model)) if grad else (torch.inference_mode(),)
        with contextlib.ExitStack() as stack:
            for c in context:
                stack.enter_context(c)
            return call_model(model, plan.spec, inputs)

    return audit, forward, len(inputs["pos"])


def ase_cost(data, structures: int) -> float | None:
    """Seconds per structure of EMT behind the ASE route (the same clusters, ``structures`` of them)."""
    try:
        from ase.calculators.emt import EMT
    except ImportError:
        return None
    from equiaudit.adapters import ASECalculatorForceField

    wrapped = ASECalculatorForceField(EMT())
    n = len(data["pos"])
    repeat = max(1, structures // n)
    wrapped(data["pos"].repeat(repeat, 1, 1), data["z"].repeat(repeat, 1), data["mask"].repeat(repeat, 1))
    return wrapped.seconds_per_structure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rotations", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    data = cu_clusters(args.batch)
    print(f"B = {args.batch} Cu clusters of 4-6 atoms, K = {args.rotations} rotations: "
          f"{args.batch * args.rotations} structures per forward")
    per_structure = {}
    for name, model, grad in families():
        audit, forward, structures = cases(model, grad, data, args.rotations)
        medians = interleaved_medians({"audit": audit, "forward": forward}, args.repeats)
        ratio = medians["audit"] / medians["forward"]
        per_structure[name] = medians["forward"] / structures
        verdict = "ok" if ratio <= 1.15 else "over the 1.15 goal"
        print(f"{name:48s} audit/forward = {ratio:.3f} ({verdict}); "
              f"forward {1e3 * per_structure[name]:.3f} ms per structure")
    cost = ase_cost(data, 96)
    if cost is None:
        print("ase: skipped (ase not installed)")
    else:
        beside = ", ".join(f"{cost / v:.2g}x {name.split(' ')[0]}'s" for name, v in per_structure.items())
        print(f"{'ase (EMT, one structure at a time)':48s} {1e3 * cost:.3f} ms per structure"
              + (f" ({beside} forward per structure)" if beside else ""))


if __name__ == "__main__":
    main()

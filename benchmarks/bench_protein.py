"""What does the protein_flow audit add to the model's own forward passes?

On the committed structures (tests/data/structures: 1A8O twice, 2BEG, 3JQH; Cα in nm, padded
to 130 residues), repeated to ``--structures`` samples, the protein preset (every structure at
the 8 fixed flow times) and the zoo's non-equivariant transformer over residue tokens, times
in one process, interleaved (medians):

  audit     — ``AuditPlan.evaluate`` on the prepared rows (rotate in float64, forward, rotate
              back, bias-corrected per-sample statistics; no float floor, no breakdown);
  +breakdown — the same with the breakdown columns (t, residue, position, length);
  forward   — one plain forward of the same B·T·K rotated inputs, built beforehand.

and prints audit / forward (goal ≤ 1.15).

    python benchmarks/bench_protein.py [--structures 8] [--rotations 16] [--hidden 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from equiaudit.api import settings
from equiaudit.engine import orbit_inputs
from equiaudit.io.data import load_dataset
from equiaudit.plan import resolve
from equiaudit.zoo import transformer_velocity

from timing import interleaved_medians, machine_line

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "structures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", type=int, default=8)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    config = settings(task="protein_flow", rotations=args.rotations, float_floor=False, bootstrap=0)
    data = load_dataset(DATA, structures=config.data.structures)
    repeat = -(-args.structures // len(data["pos"]))
    data = {k: v.repeat(repeat, *[1] * (v.dim() - 1))[: args.structures] for k, v in data.items()}
    model = transformer_velocity(hidden=args.hidden, layers=2, heads=4, n_species=21).to(device).eval()
    plan = resolve(config, data, device=device)
    prepared = plan.prepare(data)
    rows = len(prepared)
    plan = dataclasses.replace(plan, batch_size=rows, breakdown=None)  # one batch: the rows of the forward below
    with_breakdown = dataclasses.replace(plan, breakdown=resolve(settings(task="protein_flow"), data).breakdown)
    batch = {k: v.to(device) for k, v in prepared.data.items()}
    elements = prepared.elements.to(device)
    inputs = orbit_inputs(model, batch, elements, plan.spec)  # the B·T·K rotated inputs, built once

    def forward():
        with torch.inference_mode():
            return model(*(inputs[f] for f in plan.spec.input_fields))

    cases = {
        "audit": lambda: plan.evaluate(model, prepared),
        "+breakdown": lambda: with_breakdown.evaluate(model, prepared),
        "forward": forward,
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    median = interleaved_medians(cases, args.repeats, sync=sync)
    print(machine_line())
    print(f"model: transformer_velocity(hidden={args.hidden}, layers=2) over residue tokens, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    print(f"batch: {args.structures} structures x {rows // args.structures} fixed t x K={args.rotations} rotations "
          f"= {rows * args.rotations} forwards of {data['pos'].shape[1]} residues")
    print(f"{'what':<12}{'median s':>10}")
    for name, seconds in median.items():
        print(f"{name:<12}{seconds:>10.4f}")
    print(f"audit / forward = {median['audit'] / median['forward']:.3f}   (goal <= 1.15)")
    print(f"audit with breakdown / forward = {median['+breakdown'] / median['forward']:.3f}")


if __name__ == "__main__":
    main()

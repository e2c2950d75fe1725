"""What does ``--dynamics`` add to an audit, in forward-equivalents of the audit's own orbit pass?

One process, interleaved (A B C A B C ...), the demo's flow-matching transformer on LJ13
clusters (same samples, rotations, seed):

  orbit pass    the plan's evaluation alone (rotate, one forward of B·K inputs, statistics;
                no floor): one forward-equivalent;
  audit         ``equiaudit.audit`` as the CLI runs it (with the float floor, bootstrap);
  + gradients   the same with ``dynamics={"twirl": False}``: the gradient split of L_sym and EE;
  + twirl       with ``dynamics=True`` (gradient split and test-time twirling);
  split alone   the gradient split in a pass of its own (``plan.objective``: one differentiable
                forward and two backward passes), what the audit did before it shared its forward;

and prints the medians and ``(audit with dynamics − audit) / orbit pass``: what the dynamics add
in forward-equivalents (goal: at most ~3 for the gradients). The split needs two vector-Jacobian
products through the model (∇L_sym and ∇EE share no backward pass), so its floor is the model's
two backward passes plus the graph's keep: "split alone" shows it.

    python benchmarks/bench_dynamics_audit.py [--samples 128] [--rotations 16] [--repeats 5]
        [--device cuda] [--hidden 64] [--layers 2]
"""

from __future__ import annotations

import argparse

import torch

import equiaudit
from equiaudit import dynamics as dyn
from equiaudit.plan import evaluation_mode
from equiaudit.lj import LJ13, sample_clusters
from equiaudit.zoo import transformer_velocity
from timing import interleaved_medians, machine_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    data = sample_clusters(args.samples, LJ13, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = transformer_velocity(hidden=args.hidden, layers=args.layers).to(args.device)
    settings = dict(task="flow_matching", rotations=args.rotations, seed=0, device=args.device)
    auditor = equiaudit.Auditor(data, **settings)
    plan = auditor.plan(model)
    prepared = auditor.prepared(plan)
    bare = plan.__class__(plan.spec, seed=plan.seed, batch_size=plan.batch_size, bootstrap=0, device=plan.device,
                          task=plan.task, task_options=plan.task_options, float_floor=False)
    with_grads = equiaudit.Auditor(data, dynamics={"twirl": False}, **settings)
    with_twirl = equiaudit.Auditor(data, dynamics=True, **settings)
    weights = {h.name: h.weight for h in plan.spec.heads}
    params = list(model.parameters())

    def split_alone():
        with evaluation_mode(model):
            return dyn.gradient_splits(plan.objective(model, prepared), params, weights)

    runs = {
        "orbit pass": lambda: bare.evaluate(model, prepared),
        "audit": lambda: auditor(model),
        "audit + gradients": lambda: with_grads(model),
        "audit + gradients + twirl": lambda: with_twirl(model),
        "split alone": split_alone,
    }
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    median = interleaved_medians(runs, args.repeats, sync=sync)
    print(machine_line() if not args.device.startswith("cuda") else f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"transformer_velocity({args.hidden}, {args.layers} layers), {sum(p.numel() for p in model.parameters())} parameters; "
          f"N={args.samples} × K={args.rotations} rotations")
    print(f"{'what':<28}{'median s':>10}{'forward-equivalents':>22}")
    unit = median["orbit pass"]
    for name in runs:
        print(f"{name:<28}{median[name]:>10.4f}{median[name] / unit:>22.2f}")
    print(f"gradients add          {(median['audit + gradients'] - median['audit']) / unit:.2f} forward-equivalents  (goal <= ~3)")
    print(f"the split alone costs  {median['split alone'] / unit:.2f} forward-equivalents  (its floor: 1 differentiable forward + 2 backward)")
    print(f"gradients + twirl add  {(median['audit + gradients + twirl'] - median['audit']) / unit:.2f} forward-equivalents")


if __name__ == "__main__":
    main()

"""What does the gradient split cost, in forward passes of the same orbit objective?

Times, in one process and interleaved (A B C ... A B C ...), on the same batches and rotations
of a small non-equivariant MLP on 3D point sets (the orbit objective: rotate, forward,
un-rotate, bias-corrected L_sym and EE per batch):

  forward        the objective evaluated under torch.no_grad (the audit's own cost)
  forward+graph  the same with autograd recording (no backward)
  train step     forward + one backward of L_aug (what an optimiser step pays)
  split two_pass gradient_split(method="two_pass"): ∇L_sym and ∇EE, two backward passes
  split batched  gradient_split(method="batched"): one vmapped backward, two cotangents
  hvp×p batched  one pass of p Hessian-vector products (the Lanczos step), vmapped
  hvp×p loop     the same, one double backward per vector

and prints the medians and every ratio to `forward` (forward-equivalents).

    python benchmarks/bench_dynamics.py [--batch 64] [--rotations 16] [--atoms 8] [--width 64]
                                        [--batches 2] [--block 3] [--repeats 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform

import torch

from equiaudit import actions
from equiaudit.dynamics import _hvp_blocks, gradient_split, orbit_contribution
from equiaudit.groups import make_rotation_set
from equiaudit.random import SampleRandom, sample_ids
from timing import interleaved_medians


class PointMLP(torch.nn.Module):
    """Flattened coordinates (A·3) → hidden → hidden → A·3: not equivariant."""

    def __init__(self, atoms: int, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(atoms * 3, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, atoms * 3),
        )

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.net(pos.flatten(-2)).reshape(pos.shape)


def make_objective(model, pos, target, rotations, batch):
    n = len(pos)

    def objective():
        for start in range(0, n, batch):
            x, y, r = pos[start : start + batch], target[start : start + batch], rotations[start : start + batch]
            b, k = r.shape[:2]
            orbit = actions.rotate("vector", x, r).reshape(b * k, *x.shape[1:]).float()
            pred = actions.unrotate("vector", model(orbit).double().reshape(b, k, *x.shape[1:]), r)
            yield orbit_contribution(pred, y, "mse", n_total=n)

    return objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--atoms", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = PointMLP(args.atoms, args.width).to(device)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.batches
    pos = torch.randn(n, args.atoms, 3, generator=g, dtype=torch.float64).to(device)
    target = torch.randn(n, args.atoms, 3, generator=g, dtype=torch.float64).to(device)
    rotations = make_rotation_set("so3", args.rotations, "haar").sample(sample_ids(n), SampleRandom.named(0, "rotations")).to(device)
    objective = make_objective(model, pos, target, rotations, args.batch)
    n_params = sum(p.numel() for p in params)
    block = torch.randn(args.block, n_params, generator=g, dtype=torch.float64).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            return sum(float(s + e) for s, e in objective())

    def forward_graph():
        return sum(float((s + e).detach()) for s, e in objective())

    def train_step():
        for s, e in objective():
            torch.autograd.grad(s + e, params)

    cases = {
        "forward": forward,
        "forward+graph": forward_graph,
        "train step": train_step,
        "split two_pass": lambda: gradient_split(objective, params, method="two_pass"),
        "split batched": lambda: gradient_split(objective, params, method="batched"),
        f"hvp×{args.block} batched": lambda: _hvp_blocks(objective, params, {"equiv": block}, batched=True),
        f"hvp×{args.block} loop": lambda: _hvp_blocks(objective, params, {"equiv": block}, batched=False),
    }
    a = gradient_split(objective, params, method="two_pass")
    b = gradient_split(objective, params, method="batched")
    agree = max((x - y).abs().max().item() for x, y in zip(a.grad_sym + a.grad_equiv, b.grad_sym + b.grad_equiv))
    median = interleaved_medians(cases, args.repeats, sync=sync)

    print(
        f"# {platform.machine()} {platform.processor() or ''} torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}; MLP width {args.width} ({n_params} params), {args.batches} batch(es) of B={args.batch} × "
        f"K={args.rotations} × {args.atoms} atoms; two_pass vs batched gradients agree to {agree:.1e}"
    )
    base = median["forward"]
    print(f"{'what':<18}{'median ms':>11}{'× forward':>11}")
    for name, value in median.items():
        print(f"{name:<18}{value * 1e3:>11.2f}{value / base:>11.2f}")
    split, batched = median["split two_pass"], median["split batched"]
    print(f"gradient split (two_pass) = {split / base:.2f} forward-equivalents; batched / two_pass = {batched / split:.2f}")


if __name__ == "__main__":
    main()

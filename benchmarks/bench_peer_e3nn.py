"""equiaudit.audit against e3nn's own checker, side by side in one process, on one e3nn network.

The same e3nn-built network (spherical harmonics of the positions, a fully connected tensor
product, an equivariant linear layer to one vector per atom), the same samples and the same
number of rotations K:

  (a) e3nn  — ``e3nn.util.test.equivariance_error(..., ntrials=K, do_parity=False,
              do_translation=False)``: per trial one forward on rotated inputs and one on the
              originals (2K forwards of the whole batch); returns the max-abs deviation;
  (b) equiaudit — ``equiaudit.audit(model, data, rotations=K, ...)``: all B·K rotated inputs
              in one batched pass (K forwards' worth), returning REE with its 95 % interval,
              with and without the float floor (which adds a null orbit of 4 copies of 64 samples).

Timed interleaved (e3nn, audit, audit-no-floor, e3nn, ...), medians printed with the ratio.

    pip install e3nn        # the benchmark extra: pip install -e ".[bench]"
    python benchmarks/bench_peer_e3nn.py [--samples 256] [--atoms 8] [--rotations 24] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

import equiaudit
from timing import interleaved_medians, machine_line


def make_model():
    from e3nn import o3

    class E3Vectors(torch.nn.Module):
        """One vector per atom from its position: exactly O(3)-equivariant by construction."""

        def __init__(self):
            super().__init__()
            self.irreps_sh = o3.Irreps.spherical_harmonics(2)
            hidden = o3.Irreps("16x0e + 8x1o + 4x2e")
            self.tp = o3.FullyConnectedTensorProduct(self.irreps_sh, self.irreps_sh, hidden)
            self.out = o3.Linear(hidden, "1x1o")

        def forward(self, pos):  # (B, A, 3) -> (B, A, 3)
            sh = o3.spherical_harmonics(self.irreps_sh, pos, normalize=False)
            return self.out(self.tp(sh, sh))

    torch.manual_seed(0)
    return E3Vectors().eval()  # float32, as e3nn models usually run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--atoms", type=int, default=8)
    parser.add_argument("--rotations", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from e3nn.util.test import equivariance_error

    model = make_model()
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(args.samples, args.atoms, 3, generator=g, dtype=torch.float64)
    data = {"pos": pos, "y": pos.clone()}
    settings = dict(task="custom", fields={"pos": "vector"}, heads={"out": {"rep": "vector", "target": "y", "loss": "mse"}},
                    inputs=["pos"], outputs=["out"], rotations=args.rotations, seed=0, device="cpu")

    def e3nn_check():
        with torch.no_grad():
            return max_deviation(equivariance_error(model, [pos.float()], irreps_in=["1x1o"], irreps_out=["1x1o"],
                                                     ntrials=args.rotations, do_parity=False, do_translation=False))

    def max_deviation(errors):
        return max(float(v.max()) for v in errors.values())

    runs = {
        "e3nn equivariance_error": e3nn_check,
        "equiaudit.audit": lambda: equiaudit.audit(model, data, **settings),
        "equiaudit.audit, no floor": lambda: equiaudit.audit(model, data, float_floor=False, **settings),
    }
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the answers
    median = interleaved_medians(runs, args.repeats, warmup=0)  # (the answers above were the warm-up)

    print(machine_line())
    print(f"e3nn network: SH(l<=2) ⊗ SH → 16x0e+8x1o+4x2e → 1x1o, float32; B={args.samples} samples × "
          f"{args.atoms} atoms, K={args.rotations} rotations")
    print(f"{'what':<28}{'median s':>10}{'runs':>6}  answer")
    result, no_floor = outputs["equiaudit.audit"].total, outputs["equiaudit.audit, no floor"].total
    answers = {
        "e3nn equivariance_error": f"max |Δ| = {outputs['e3nn equivariance_error']:.3g} (2K = {2 * args.rotations} forwards of B)",
        "equiaudit.audit": f"REE {100 * result.rel_equiv_error:.3g} % [{100 * result.rel_equiv_error_ci_low:.3g}, "
                           f"{100 * result.rel_equiv_error_ci_high:.3g}], float floor {100 * result.float_floor:.3g} %, {result.flag}",
        "equiaudit.audit, no floor": f"REE {100 * no_floor.rel_equiv_error:.3g} % (one pass of B·K = K forwards of B)",
    }
    for name in runs:
        print(f"{name:<28}{median[name]:>10.4f}{args.repeats:>6}  {answers[name]}")
    e3 = median["e3nn equivariance_error"]
    print(f"e3nn / equiaudit.audit            = {e3 / median['equiaudit.audit']:.2f}x   (goal >= 1.5)")
    print(f"e3nn / equiaudit.audit (no floor) = {e3 / median['equiaudit.audit, no floor']:.2f}x")


if __name__ == "__main__":
    main()

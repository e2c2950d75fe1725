"""How many rotations does each rotation set need for a given precision of the REE?

For two models — the linear-map known answer ``f(x) = A x`` (target ``y = x``) and a plain
transformer force field (``equiaudit.zoo.transformer_force_field``, random weights) on LJ13
clusters — and each sampling of SO(3) (``haar`` i.i.d., ``quasi`` randomised
tetrahedral/octahedral/icosahedral designs, ``fibonacci`` randomised super-Fibonacci
spirals), the full engine audits the same samples at several K and reports:

* ``REE``       the estimate;
* ``rot_sd``    the standard deviation of the dataset REE due to the rotations alone (data
                fixed). Measured with two independent rotation draws per sample:
                ``Var_rot(r̂) ≈ Σ_i ½(u_i¹ − u_i²)² / (Σ_i L_i)²``, ``u_i = EE_i − r̂·L_i``;
* ``ci_half``   the half-width of the reported 95 % interval (data + rotation noise).

All sets audit the same samples, so their intervals share the data part of the variance
and reach the same width exactly when their rotation noise is the same. The script prints
the K each set needs for the rotation noise (hence the CI width) of Haar at K = 32, the
rotations' share of the interval variance, and how many Haar rotations the smallest quasi
set (K = 24) is worth. About 40 s on 2 CPU cores:

    python benchmarks/bench_rotation_sets.py [--samples 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from equiaudit import lj
import dataclasses

from equiaudit.engine import HeadSpec, OrbitSpec
from equiaudit.groups import make_rotation_set
from equiaudit.plan import AuditPlan
from equiaudit.metrics import summarize
from equiaudit.zoo import transformer_force_field

GRID = {"haar": (8, 16, 32, 64, 128), "quasi": (24, 48, 120), "fibonacci": (16, 32, 64, 128)}
REFERENCE_K = 32


class LinearMap(torch.nn.Module):
    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.matrix = torch.nn.Parameter(matrix)

    def forward(self, pos):
        return pos @ self.matrix.T


def linear_problem(n_samples: int):
    g = torch.Generator().manual_seed(0)
    matrix = 0.8 * torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    pos = torch.randn(n_samples, 8, 3, generator=g, dtype=torch.float64)
    spec = OrbitSpec(fields={"pos": "vector"}, heads=(HeadSpec("out", "vector", "target"),), inputs=["pos"], outputs=["out"], mask=None)
    return LinearMap(matrix).double(), {"pos": pos, "target": pos.clone()}, spec


def transformer_problem(n_samples: int, sharpness: float = 1.0):
    """Random-weight transformer force field on LJ13 clusters; the forces head is audited.

    ``sharpness`` scales the coordinate embedding: larger values make the output vary
    faster with orientation (more weight at high angular degree ℓ, where designs do not
    integrate exactly), a stress test standing in for a trained model's sharper features.
    """
    data = lj.sample_clusters(n_samples, lj.LJ13, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = transformer_force_field(hidden=32, layers=2, heads=4).eval()
    with torch.no_grad():
        model.backbone.coords.weight.mul_(sharpness)
    spec = OrbitSpec(fields={"pos": "point", "z": "scalar"}, heads=(HeadSpec("forces", "vector", "forces"),), inputs=["pos", "z", "mask"])
    return model, data, spec


def per_sample(model, data, spec, rotation_set, seed):
    """``(loss_aug, equiv_error)`` per sample ``(N,)`` of the problem's one head."""
    plan = AuditPlan(dataclasses.replace(spec, group=rotation_set), seed=seed, float_floor=False)
    samples = plan.evaluate(model, plan.prepare(data)).finalized().tables["samples"]
    (head,) = (h.name for h in spec.heads)
    return samples.column(f"loss_aug/{head}"), samples.column(f"equiv_error/{head}")


def measure(model, data, spec, sampling: str, k: int) -> dict[str, float]:
    rotation_set = make_rotation_set("so3", k, sampling)
    (a1, e1), (a2, e2) = (per_sample(model, data, spec, rotation_set, seed) for seed in (1, 2))
    ratio = ((e1 + e2).sum() / (a1 + a2).sum()).item()
    u1, u2 = e1 - ratio * a1, e2 - ratio * a2
    rot_sd = (0.5 * (u1 - u2).square().sum()).sqrt().item() / (0.5 * (a1 + a2).sum()).item()
    summary = summarize(a1, e1, n_bootstrap=1000, generator=torch.Generator().manual_seed(0))
    return {"ree": summary.rel_equiv_error, "rot_sd": rot_sd, "ci_half": (summary.ci_high - summary.ci_low) / 2}


def rotations_to_match(ks, values, target: float) -> str:
    """Smallest K at which ``values`` (decreasing in K) reach ``target``, by log-log
    interpolation between grid points; ``≤ K₀`` when the smallest set already does."""
    if values[0] <= target:
        return f"<= {ks[0]}"
    for k0, v0, k1, v1 in zip(ks, values, ks[1:], values[1:]):
        if v1 <= target < v0:
            slope = (math.log(v1) - math.log(v0)) / (math.log(k1) - math.log(k0))
            return f"{k0 * math.exp((math.log(target) - math.log(v0)) / slope):.0f}"
    return f"> {ks[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="samples per model (linear map: 4x)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    start = time.perf_counter()
    problems = {
        "linear map": linear_problem(4 * args.samples),
        "transformer": transformer_problem(args.samples),
        "transformer, sharp x6": transformer_problem(args.samples, sharpness=6.0),
    }
    for name, (model, data, spec) in problems.items():
        results = {s: [measure(model, data, spec, s, k) for k in ks] for s, ks in GRID.items()}
        print(f"\n{name} (N = {len(data['pos'])})")
        print(f"{'sampling':>10} {'K':>4} {'REE':>9} {'rot_sd':>9} {'ci_half':>9}")
        for sampling, rows in results.items():
            for k, row in zip(GRID[sampling], rows):
                print(f"{sampling:>10} {k:>4} {row['ree']:>9.5f} {row['rot_sd']:>9.2e} {row['ci_half']:>9.2e}")
        haar = results["haar"][GRID["haar"].index(REFERENCE_K)]
        # Every set audits the same samples, so the intervals share the data part of their
        # variance: the same CI width means the same rotation noise (rot_sd).
        needs = {s: rotations_to_match(GRID[s], [row["rot_sd"] for row in results[s]], haar["rot_sd"]) for s in ("quasi", "fibonacci")}
        print(f"  K for the CI width of haar K={REFERENCE_K} (same rot_sd, {haar['rot_sd']:.2e}): " + ", ".join(f"{s} {k}" for s, k in needs.items()))
        share = {s: results[s][i]["rot_sd"] ** 2 / max(results[s][i]["ci_half"] / 1.96, 1e-300) ** 2 for s, i in (("haar", GRID["haar"].index(REFERENCE_K)), ("quasi", 0))}
        quasi_share = "exact" if results["quasi"][0]["ci_half"] < 1e-12 else f"{share['quasi']:.1%}"
        print(f"  rotations' share of the interval's variance: haar K={REFERENCE_K} {share['haar']:.1%}, quasi K=24 {quasi_share}")
        # What the smallest quasi set is worth in Haar rotations (Haar rotation noise ∝ 1/√K).
        quasi = results["quasi"][0]
        if quasi["rot_sd"] <= 1e-12 * abs(quasi["ree"]):
            print("  quasi K=24 is exact here (no rotation noise)")
        else:
            worth = REFERENCE_K * (haar["rot_sd"] / quasi["rot_sd"]) ** 2
            print(f"  quasi K=24 has the rotation noise of haar K = {worth:.3g}: {worth / 24:.3g}x fewer rotations for it")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

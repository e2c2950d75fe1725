"""The held-out loss of ``equiaudit.Symmetrized(model, k)`` against k, beside the audit's ``L_sym + EE/k``.

Run after the demo (or ``equiaudit train TASK``), from the repository root::

    equiaudit train force_field --out demo_out           # or: equiaudit demo
    python docs/examples/symmetrize_demo.py demo_out/force_field/config.yaml

For the run's last checkpoint it prints, per k:

* ``measured``: the held-out loss of the wrapped model ``mean_j g_j⁻¹·f(g_j·x)`` with k fresh
  Haar rotations per call, as the audit measures any model (its own rotations of the input
  compose with the wrapper's: the result is the expected loss of the k-average);
* ``predicted``: ``L_sym + EE/k`` from the audit of the raw model (no wrapper, no extra forward);
* ``twirl.csv``: the audit's own test-time twirling estimate from the same orbits
  (``--dynamics``), and the smallest k that removes 90 % of EE.

Same data, same seed, so the columns differ only by the noise of the k draws.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import equiaudit
from equiaudit.io.checkpoints import discover_checkpoints
from equiaudit.io.config import load_config
from equiaudit.runner import load_weights, open_audit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the run's audit config (demo_out/<task>/config.yaml)")
    parser.add_argument("--ks", default="1,2,4,8,16", help="k values, comma-separated")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rotations", type=int, default=32, help="the audit's own rotations per sample")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.config, overrides={"data.samples": args.samples, "group.rotations": args.rotations,
                                                 "group.sampling": "haar"})
    opened = open_audit(config, device="cpu")
    last = discover_checkpoints([str(config.checkpoints)])[-1]
    load_weights(opened, last)
    model = opened.model
    keys = dict(config=config.raw, samples=args.samples, rotations=args.rotations, sampling="haar", bootstrap=0,
                float_floor=False)
    data = str(config.data.path)

    base = equiaudit.audit(model, data, dynamics={"gradients": False, "twirl": True}, **keys)
    started = time.perf_counter()
    equiaudit.audit(model, data, **keys)  # the cost unit: a plain audit of the raw model
    seconds_base = time.perf_counter() - started
    twirl = {r["k"]: r for r in base.twirl if r["head"] == "total"}
    t = base.total
    print(f"{last.path.name} (step {last.step}): L_aug {t.loss_aug:.5g}, L_sym {t.loss_sym:.5g}, EE {t.equiv_error:.4g} "
          f"(REE {100 * t.rel_equiv_error:.3g} %), N={t.n_samples}, K={args.rotations}")
    print(f"{'k':>3}  {'measured':>10}  {'predicted':>10}  {'twirl.csv':>10}  {'EE removed':>10}  {'cost':>6}")
    print(f"{'':>3}  {'Symmetrized':>10}  {'L_sym+EE/k':>10}  {'':>10}  {'(measured)':>10}  {'(x audit)':>6}")
    for k in [int(v) for v in args.ks.split(",")]:
        sym = equiaudit.Symmetrized(model, k, seed=k, config=config.raw)
        started = time.perf_counter()
        measured = equiaudit.audit(sym, data, **keys).total.loss_aug
        cost = (time.perf_counter() - started) / seconds_base
        predicted = t.loss_sym + t.equiv_error / k
        row = twirl.get(k)
        twirled = f"{row['loss_twirled']:10.5g}" if row else f"{'':>10}"
        removed = (t.loss_aug - measured) / t.equiv_error if t.equiv_error > 0 else float("nan")
        print(f"{k:>3}  {measured:10.5g}  {predicted:10.5g}  {twirled}  {100 * removed:9.1f} %  {cost:5.1f}x")
    smallest = next(iter(twirl.values()))["smallest_k"] if twirl else None
    print(f"smallest k removing 90 % of EE (twirl.csv): {smallest}")


if __name__ == "__main__":
    main()

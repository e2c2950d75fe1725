"""``--target-ci W`` against a fixed sample count that reaches the same width: forwards saved.

    python benchmarks/bench_target_ci.py [--widths 0.0002,0.0005,0.001,0.003] [--pool 1000]

The checkpoints are the flow-matching run of ``equiaudit train flow_matching --steps 300``
(trained once into ``--workdir`` if absent), audited on a pool of ``--pool`` samples of the
run's *training* file (its test file has only 256; what is measured here is how many samples
a width needs, not generalisation), K = 16. For every width W:

* **target** — the audit with ``target_ci = W`` (the runner's path): each checkpoint stops at
  the first batch whose 95 % interval of the total REE is at most ±W, or at the pool's end;
  the forwards are Σ_c n_c·K.
* **fixed** — the smallest fixed N (a multiple of the batch size) at which *every* checkpoint's
  interval is at most ±W, found from one full evaluation of each checkpoint (the half-width of
  every prefix of the same seeded order: common random numbers), then audited at that N; its
  forwards are C·N·K. A checkpoint that never gets there on the pool makes N the pool.

Both are real audits, run side by side; their wall times are printed too, and the target's
n_c are checked against the prefix scan (the same rule, computed two ways).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_distributed import ensure_run, pool_config
from equiaudit.io.checkpoints import discover_checkpoints
from equiaudit.io.config import load_config
from equiaudit.plan import TARGET_MIN_SAMPLES
from equiaudit.runner import audit_checkpoint, evaluate_share, open_audit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "equiaudit_bench_fm")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--widths", default="0.0002,0.0005,0.001,0.003")
    args = parser.parse_args()
    config_path = pool_config(ensure_run(args.workdir, args.steps), args.pool, args.workdir)
    base = load_config(config_path, {"seed": 0})
    audit = open_audit(base, device="cpu")
    plan, n_pool, k = audit.plan, len(audit.prepared), audit.plan.group.n_elements
    refs = discover_checkpoints([str(base.checkpoints)])
    bs = plan.batch_size
    print(f"{len(refs)} checkpoints of {config_path.parent.name}, pool N={n_pool}, K={k}, batches of {bs}, "
          f"bootstrap {plan.bootstrap}; widths are ± in REE fraction units")

    # Half-width of the total REE's interval for every prefix of whole batches, per checkpoint.
    start = time.perf_counter()
    prefixes = list(range(bs, n_pool + 1, bs)) + ([n_pool] if n_pool % bs else [])
    half: dict[str, dict[int, float]] = {}
    for ref in refs:
        stats = evaluate_share(audit, ref).stats
        half[ref.name] = {}
        for n in prefixes:
            low, high = plan.total_interval(stats.select_ids(lambda ids: ids < n))  # ids are positions 0 … N−1
            half[ref.name][n] = (high - low) / 2
    print(f"prefix scan: {time.perf_counter() - start:.1f} s (every checkpoint on the whole pool once)")
    print(f"{'W':>8} {'checkpoint n_c (target)':>40} {'fwd target':>11} {'N fixed':>8} {'fwd fixed':>10} "
          f"{'saved':>6} {'s target':>9} {'s fixed':>8}")
    for width in (float(w) for w in args.widths.split(",")):
        # Target: the real --target-ci audit.
        target = open_audit(load_config(config_path, {"target_ci": width}), device="cpu")
        t0 = time.perf_counter()
        used = {ref.name: audit_checkpoint(target, ref).total.n_samples for ref in refs}
        t_target = time.perf_counter() - t0
        # The same rule from the prefix scan (a cross-check), and the smallest fixed N that reaches W everywhere.
        for name, n_c in used.items():
            expected = next((n for n in prefixes if n >= TARGET_MIN_SAMPLES and half[name][n] <= width), n_pool)
            assert n_c == expected, (name, n_c, expected)
        fixed_n = next((n for n in prefixes if all(half[name][n] <= width for name in half)), n_pool)
        fixed = open_audit(load_config(config_path, {"data.samples": fixed_n}), device="cpu")
        t0 = time.perf_counter()
        widths_fixed = []
        for ref in refs:
            total = audit_checkpoint(fixed, ref).total
            widths_fixed.append((total.rel_equiv_error_ci_high - total.rel_equiv_error_ci_low) / 2)
        t_fixed = time.perf_counter() - t0
        forwards_target, forwards_fixed = sum(used.values()) * k, len(refs) * fixed_n * k
        shown = ", ".join(str(n) for n in used.values())
        print(f"{width:>8g} {shown:>40} {forwards_target:>11} {fixed_n:>8} {forwards_fixed:>10} "
              f"{1 - forwards_target / forwards_fixed:>6.0%} {t_target:>9.1f} {t_fixed:>8.1f}"
              + ("" if max(widths_fixed) <= width else "  (fixed N = the pool: some checkpoint never reaches W)"))


if __name__ == "__main__":
    main()

"""What does the Lightning callback cost a training run?

In one process, on the zoo's transformer force field (width 64, 2 layers) and random
13-atom clusters:

  prepare   — ``equiaudit.Auditor(data, **settings)``: settings checked, data prepared once;
  audit     — ``auditor(model)``: one audit on the prepared data (what the callback does per audit);
  audit()   — ``equiaudit.audit(model, data, **settings)``: the same, preparing the data each call;
  fit       — ``Trainer.fit`` of STEPS steps without the callback, then with it every EVERY steps:
              (with − without) / audits = the callback's cost per audit, hooks and logging included.

Each figure is the fastest of ``--repeats`` interleaved runs on ``--threads`` threads (1 by
default: on a shared, loaded machine one thread and the minimum are the least disturbed).

    python benchmarks/bench_callback.py [--samples 128] [--rotations 16] [--steps 60] [--every 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
import warnings

import torch

import equiaudit
from equiaudit.zoo import transformer_force_field


def clusters(n: int, atoms: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pos": torch.randn(n, atoms, 3, generator=g), "z": torch.randint(1, 5, (n, atoms), generator=g),
            "mask": torch.ones(n, atoms, dtype=torch.bool), "energy": torch.randn(n, generator=g),
            "forces": torch.randn(n, atoms, 3, generator=g)}


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU time (all threads) is what a loaded machine distorts least."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def best_time(fn, runs: int) -> tuple[float, float]:
    """The fastest of ``runs`` (wall, CPU): on a shared machine the minimum is the least disturbed."""
    times = [timed(fn) for _ in range(runs)]
    return min(t[0] for t in times), min(t[1] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from equiaudit.lightning import EquivarianceCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    settings = dict(task="force_field", rotations=args.rotations, seed=0)
    held_out = clusters(args.samples, 13, seed=1)
    train = clusters(args.batch * args.steps, 13, seed=2)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = transformer_force_field()

        def training_step(self, batch, batch_idx):
            out = self.net(batch["pos"], batch["z"], batch["mask"])
            return (out["energy"] - batch["energy"]).square().mean() + (out["forces"] - batch["forces"]).square().mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    model = Module().net
    prepare = best_time(lambda: equiaudit.Auditor(held_out, **settings).prepared(), args.repeats)
    auditor = equiaudit.Auditor(held_out, **settings)
    auditor(model)  # warm-up
    audit = best_time(lambda: auditor(model), args.repeats)
    one_call = best_time(lambda: equiaudit.audit(model, held_out, **settings), args.repeats)

    def fit(callbacks) -> tuple[float, float]:
        rows = [{k: v[i] for k, v in train.items()} for i in range(len(train["pos"]))]
        loader = torch.utils.data.DataLoader(rows, batch_size=args.batch)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = pl.Trainer(max_steps=args.steps, logger=CSVLogger(tmp), callbacks=callbacks, enable_progress_bar=False,
                                 enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1)
            return timed(lambda: trainer.fit(Module(), loader))

    fit([])  # warm-up
    plain, audited, callbacks = [], [], []
    for _ in range(args.repeats):  # interleaved: without, with, without, with ...
        plain.append(fit([]))
        callbacks.append(EquivarianceCallback(held_out, every_n_train_steps=args.every, model="net", **settings))
        audited.append(fit([callbacks[-1]]))
    without = [min(t[i] for t in plain) for i in (0, 1)]
    with_cb = [min(t[i] for t in audited) for i in (0, 1)]
    audits = args.steps // args.every
    inside = min(r.seconds for cb in callbacks for _, r in cb.results)

    print(f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.samples} samples x {args.rotations} rotations, 13 atoms (best of {args.repeats}, wall / CPU)")
    print(f"prepare (Auditor, once)        {prepare[0] * 1e3:8.1f} ms wall {prepare[1] * 1e3:8.1f} ms CPU")
    print(f"audit   (auditor(model))       {audit[0] * 1e3:8.1f} ms wall {audit[1] * 1e3:8.1f} ms CPU")
    print(f"audit() (prepares each call)   {one_call[0] * 1e3:8.1f} ms wall {one_call[1] * 1e3:8.1f} ms CPU")
    print(f"audit inside fit (result.seconds)   {inside * 1e3:8.1f} ms wall")
    print(f"fit {args.steps} steps, no callback     {without[0]:8.2f} s wall  {without[1]:8.2f} s CPU  "
          f"({without[1] / args.steps * 1e3:.1f} ms CPU/step)")
    print(f"fit {args.steps} steps, {audits} audits        {with_cb[0]:8.2f} s wall  {with_cb[1]:8.2f} s CPU")
    per_audit = (with_cb[1] - without[1]) / audits
    print(f"callback cost per audit        {per_audit * 1e3:8.1f} ms CPU (= {per_audit / (without[1] / args.steps):.1f} "
          f"training steps; audit alone {audit[1] * 1e3:.1f} ms CPU)")

if __name__ == "__main__":
    main()

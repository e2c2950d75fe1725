"""What does auditing a model family cost, next to the family's own batched evaluation?

For the metatrain family (a PET ``model_N.ckpt``; ``pip install "equiaudit[metatrain]"``):

  plain    — metatrain's own batched evaluation of the same ``B·K`` rotated structures, as
             ``mtt eval`` does a batch: metatomic Systems (``systems_to_torch``), metatrain's
             neighbour lists (``get_system_with_neighbor_lists``), one PET forward, forces by
             autograd; "of which PET + forces" is the forward alone on prebuilt systems;
  family   — the family's forward on the padded ``(B·K, A, 3)`` batch (its own systems and
             batched neighbour lists built inside, timed);
  audit    — ``auditor(model)`` with ``rotations=K`` on the ``B`` structures, float floor off
             (``float_floor=False``: the floor is one more forward per batch, reported apart);
  audit+floor — the default audit (float floor on).

Ratios are against ``plain``. Each figure is the fastest of ``--repeats`` runs on one thread.

    python benchmarks/bench_families.py RUN_DIR/model_2.ckpt VAL.xyz [--rotations 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--rotations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    import metatomic.torch as mta
    from ase.io import read
    from metatrain.utils.neighbor_lists import get_requested_neighbor_lists, get_system_with_neighbor_lists

    import equiaudit
    from equiaudit.io.checkpoints import load_into_model, read_checkpoint
    from equiaudit.zoo.families import build

    model = build("metatrain", args.checkpoint)
    load_into_model(model, read_checkpoint(args.checkpoint))
    frames = read(args.data, ":")
    k = args.rotations
    rotated = []
    g = torch.Generator().manual_seed(0)
    for atoms in frames:
        for _ in range(k):
            q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
            copy = atoms.copy()
            copy.positions = copy.positions @ q.numpy().T
            rotated.append(copy)
    width = max(len(a) for a in rotated)
    pos = torch.zeros(len(rotated), width, 3)
    z = torch.zeros(len(rotated), width, dtype=torch.long)
    mask = torch.zeros(len(rotated), width, dtype=torch.bool)
    for b, a in enumerate(rotated):
        pos[b, : len(a)], z[b, : len(a)], mask[b, : len(a)] = torch.from_numpy(a.positions), torch.from_numpy(a.numbers), True

    network = model.model
    requested = get_requested_neighbor_lists(network)

    def metatrain_systems():
        return [get_system_with_neighbor_lists(mta.systems_to_torch(a, dtype=torch.float32, positions_requires_grad=True),
                                               requested) for a in rotated]

    systems = metatrain_systems()
    outputs = {model.target: mta.ModelOutput(unit=model.unit, sample_kind="system")}

    def forward_only():
        energy = network(systems, outputs)[model.target].block().values.sum()
        torch.autograd.grad(energy, [s.positions for s in systems])

    def plain():  # what mtt eval does for a batch: systems, neighbour lists, forward, forces
        batch = metatrain_systems()
        energy = network(batch, outputs)[model.target].block().values.sum()
        torch.autograd.grad(energy, [s.positions for s in batch])

    def family():
        model(pos, z, mask)

    auditor = equiaudit.Auditor(args.data, task="force_field", grad=True, rotations=k, float_floor=False,
                                batch_size=len(frames))
    with_floor = equiaudit.Auditor(args.data, task="force_field", grad=True, rotations=k, batch_size=len(frames))
    auditor(model), with_floor(model)  # warm up, prepare
    t_plain = fastest(plain, args.repeats)
    t_forward = fastest(forward_only, args.repeats)
    t_family = fastest(family, args.repeats)
    t_audit = fastest(lambda: auditor(model), args.repeats)
    t_floor = fastest(lambda: with_floor(model), args.repeats)
    n = len(rotated)
    print(f"metatrain PET, {len(frames)} structures x K={k} = {n} forwards' worth, 1 thread")
    for name, seconds in (("plain (metatrain's own)", t_plain), ("  of which PET + forces", t_forward),
                          ("family forward", t_family), ("audit", t_audit),
                          ("audit + float floor", t_floor)):
        print(f"  {name:24s} {seconds * 1e3:8.1f} ms  {seconds / n * 1e3:6.2f} ms/structure  {seconds / t_plain:5.2f}x plain")


if __name__ == "__main__":
    main()

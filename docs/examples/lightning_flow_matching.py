"""Train a transformer flow-matching model with Lightning and audit its equivariance while it trains.

    pip install -e ".[lightning,tensorboard]"
    python docs/examples/lightning_flow_matching.py          # writes lightning_example/

Makes Lennard-Jones clusters (LJ13), trains ``equiaudit.zoo.transformer_velocity`` by
conditional flow matching with random-rotation augmentation and an EMA of the weights, and
audits the EMA weights every 50 steps on 128 held-out clusters × 24 rotations. The figures
land in the CSVLogger's ``metrics.csv`` beside ``train_loss`` (and in
``lightning_example/audit/summary.csv``); ``ModelCheckpoint`` files are written at the same
steps, so

    equiaudit audit lightning_example/audit.yaml lightning_example/logs/fm/version_0/checkpoints \\
        --out lightning_example/cli --tensorboard lightning_example/logs/fm/version_0

reports the same numbers and writes them as TensorBoard scalars beside the run's own.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from equiaudit.lightning import EquivarianceCallback
from equiaudit.lj import LJ13, sample_clusters
from equiaudit.zoo import transformer_velocity
from equiaudit.zoo.train import flow_matching_loss

OUT = Path("lightning_example")
SETTINGS = dict(task="flow_matching", rotations=24, seed=0)


class FlowMatching(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = transformer_velocity(hidden=64, layers=2)
        self.loss = flow_matching_loss(augment=True)
        self.generator = torch.Generator().manual_seed(1)  # rotations, noise and times of training

    def training_step(self, batch, batch_idx):
        loss = self.loss(self.net, batch, self.generator)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    data = sample_clusters(384, LJ13, torch.Generator().manual_seed(0), dtype=torch.float32)
    train = {k: v[:256] for k, v in data.items()}
    held_out = {k: v[256:].numpy() for k, v in data.items()}
    np.savez(OUT / "held_out.npz", **held_out)  # for the CLI's config below

    rows = [{k: v[i] for k, v in train.items()} for i in range(256)]
    loader = torch.utils.data.DataLoader(rows, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(2))
    audit = EquivarianceCallback(held_out, every_n_train_steps=50, model="net", out=OUT / "audit", **SETTINGS)
    trainer = pl.Trainer(
        max_steps=200, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(OUT / "logs", name="fm", version=0), log_every_n_steps=10,
        callbacks=[EMAWeightAveraging(decay=0.99), audit,  # the average first: it is updated, then audited
                   ModelCheckpoint(every_n_train_steps=50, save_top_k=-1)],
    )
    trainer.fit(FlowMatching(), loader)

    (OUT / "audit.yaml").write_text(
        "task: flow_matching\n"
        "model: {factory: 'equiaudit.zoo:transformer_velocity', kwargs: {hidden: 64, layers: 2}}\n"
        f"data: {{path: '{OUT / 'held_out.npz'}'}}\n"
        "group: {name: so3, rotations: 24}\n"
        "seed: 0\n"
    )
    metrics = Path(trainer.logger.log_dir) / "metrics.csv"
    with open(metrics, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("equiaudit/rel_equiv_error"):
                print(f"step {row['step']:>4}  equiaudit/rel_equiv_error {float(row['equiaudit/rel_equiv_error']):.5f}  "
                      f"equiaudit/loss_aug {float(row['equiaudit/loss_aug']):.4f}  "
                      f"equiaudit/loss_sym {float(row['equiaudit/loss_sym']):.4f}")
    print(f"weights audited: {audit.weights_used}; metrics in {metrics}")


if __name__ == "__main__":
    main()

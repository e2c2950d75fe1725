"""The demo's three experiments: data, model, training and audit settings per task. Pure.

Each :class:`Recipe` is everything ``equiaudit demo`` / ``equiaudit train`` need to make a
small dataset (Lennard-Jones clusters, :mod:`equiaudit.lj`), train a non-equivariant zoo
model with rotation augmentation, and audit its checkpoints. Sizes are chosen so that all
three tasks train and audit in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from equiaudit.lj import KA13, LJ13, ClusterSpec, sample_clusters
from equiaudit.voxelize import VoxelGridSpec
from equiaudit.zoo import models
from equiaudit.zoo.train import LossFn, TrainSettings, flow_matching_loss, force_field_loss, voxel_denoising_loss

__all__ = ["Recipe", "RECIPES", "TASKS", "make_cluster_data", "split"]

TASKS = ("force_field", "flow_matching", "voxel_denoising")

# The force field trains on 0.1·MSE(energy) + MSE(forces); its audit weighs the heads the
# same way, so that REE is the share of the loss that was actually trained.
FORCE_FIELD_ENERGY_WEIGHT = 0.1
# Weight averaging (the EMA that diffusion and force-field trainers evaluate). It also averages
# out the optimiser noise that is a large part of a plain iterate's equivariance error: with
# the same steps, final REE fell from 9.8 % to 3.8 % (force field), 1.7 % to 0.2 % (flow
# matching) and 2.0 % to 0.7 % (voxels).
EMA_DECAY = 0.999


@dataclass(frozen=True)
class Recipe:
    """One task's experiment.

    Attributes:
        cluster: the LJ system sampled for data; ``n_train`` + ``n_test`` samples.
        builder: a :mod:`equiaudit.zoo` builder name; ``kwargs`` its arguments.
        settings: training settings (``steps`` is the default; the CLI may override it).
        audit: the audit config's extra sections (group, heads, voxel options, samples).
    """

    task: str
    cluster: ClusterSpec
    data_name: str
    n_train: int
    n_test: int
    builder: str
    kwargs: dict[str, Any]
    settings: TrainSettings
    audit: dict[str, Any] = field(default_factory=dict)
    loss_options: dict[str, Any] = field(default_factory=dict)
    # An exactly equivariant model trained the same way, briefly: its REE shows the floor.
    baseline: str | None = None
    baseline_kwargs: dict[str, Any] = field(default_factory=dict)
    baseline_steps: int = 100

    def build_model(self, seed: int | None = None) -> torch.nn.Module:
        torch.manual_seed(self.settings.seed if seed is None else seed)
        return getattr(models, self.builder)(**self.kwargs)

    def baseline_recipe(self) -> "Recipe | None":
        """The same experiment with the equivariant baseline model, or None."""
        if self.baseline is None:
            return None
        settings = replace(self.settings, steps=self.baseline_steps)
        return replace(self, builder=self.baseline, kwargs=dict(self.baseline_kwargs), settings=settings, baseline=None)

    def loss(self, augment: bool = True) -> LossFn:
        if self.task == "force_field":
            return force_field_loss(augment, **self.loss_options)
        if self.task == "flow_matching":
            return flow_matching_loss(augment)
        voxel = self.audit["voxel"]
        grid = VoxelGridSpec(voxel["grid_size"], voxel["resolution"], voxel["atom_radius"], tuple(voxel["elements"]))
        return voxel_denoising_loss(grid, voxel["noise"], augment)


# One dataset for both LJ13 tasks: they write and read the same data/lj13_*.npz files.
LJ13_DATA: dict[str, Any] = {"cluster": LJ13, "data_name": "lj13", "n_train": 1000, "n_test": 256}

RECIPES: dict[str, Recipe] = {
    "force_field": Recipe(
        task="force_field",
        **LJ13_DATA,
        builder="transformer_force_field",
        kwargs={"hidden": 64, "layers": 2},
        settings=TrainSettings(steps=10000, batch_size=32, lr=3e-4, ema_decay=EMA_DECAY),
        loss_options={"energy_weight": FORCE_FIELD_ENERGY_WEIGHT},
        audit={
            "group": {"name": "so3", "rotations": 16},
            "samples": 128,
            "heads": {
                "energy": {"rep": "scalar", "target": "energy", "loss": "mse", "weight": FORCE_FIELD_ENERGY_WEIGHT},
                "forces": {"rep": "vector", "target": "forces", "loss": "mse", "weight": 1.0},
            },
        },
    ),
    "flow_matching": Recipe(
        task="flow_matching",
        **LJ13_DATA,
        builder="transformer_velocity",
        kwargs={"hidden": 64, "layers": 2},
        settings=TrainSettings(steps=2000, batch_size=32, lr=1e-3, ema_decay=EMA_DECAY),
        audit={
            "group": {"name": "so3", "rotations": 16},
            "samples": 128,
            # Why symmetry is learned fast: the gradient split at every checkpoint, and one loss
            # landscape along the Hessian's eigendirections at an early one (9×9, 32 samples).
            "dynamics": {"gradients": True, "twirl": True, "landscape": [100], "grid": 9, "samples": 32},
        },
        baseline="egnn_velocity",
        baseline_kwargs={"hidden": 32, "layers": 2},
    ),
    "voxel_denoising": Recipe(
        task="voxel_denoising",
        cluster=KA13,
        data_name="ka13",
        n_train=600,
        n_test=64,
        builder="cnn_denoiser",
        kwargs={"channels": 2, "width": 16, "depth": 2},
        settings=TrainSettings(steps=3000, batch_size=8, lr=2e-3, ema_decay=EMA_DECAY),
        audit={
            "group": {"name": "octahedral"},
            "samples": 32,
            # VoxMol's 8 Å box at 0.5 Å (coarser, so that a CPU trains it in a minute); an odd
            # size keeps the CNN's stride-2 lattice cube-symmetric (see cnn_denoiser).
            "voxel": {"grid_size": 17, "resolution": 0.5, "atom_radius": 0.5, "elements": [6, 8], "noise": 0.9},
        },
    ),
}


def make_cluster_data(spec: ClusterSpec, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """LJ samples with energies centred and energies/forces scaled to unit force RMS.

    One scale for both keeps ``F = −∇E`` exact in the scaled units; the model then sees
    targets of order one.
    """
    data = sample_clusters(n_samples, spec, torch.Generator().manual_seed(seed))
    scale = data["forces"].square().mean().sqrt()
    data["energy"] = (data["energy"] - data["energy"].mean()) / scale
    data["forces"] = data["forces"] / scale
    return data


def split(data: dict[str, torch.Tensor], n_train: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """First ``n_train`` samples for training, the rest held out."""
    return {k: v[:n_train] for k, v in data.items()}, {k: v[n_train:] for k, v in data.items()}

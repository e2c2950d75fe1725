"""Orb (orb-models, Orbital Materials): Orb v2/v3 networks behind equiaudit's padded signature.

A model family (:mod:`equiaudit.zoo.families.base`). Orb's ``finetune.py`` saves
``torch.save(model.state_dict(), "checkpoint_epochN.ckpt")``: weights only, no architecture.
equiaudit recognises such a file from its keys (``model.gnn_stacks.*`` beside ``heads.energy.*``)
and builds the network with orb-models' OWN architecture function, which must be named:

* ``model: {family: orb, name: orb_v3_direct_20_omat}`` — one of Orb's pretrained model names
  (:data:`NAMED`, hyphens or underscores): the architecture function and the graph settings
  (``radius``, ``max_num_neighbors``) that ``orb_models.forcefield.pretrained`` uses for it;
  its weight download is NOT called (the weights are the audited checkpoint's);
* or the architecture function's keyword arguments: ``model: {family: orb, kwargs:
  {architecture: orb_v3_direct_architecture, latent_dim: 256, num_message_passing_steps: 5,
  radius: 6.0, max_num_neighbors: 20}}`` (``radius``/``max_num_neighbors`` are the
  ``SystemConfig``; defaults 6.0 and 20).

Extra: ``pip install "equiaudit[orb]"`` (``orb-models``; keeps torch at its pinned version).

The padded batch → ONE ``AtomGraphs`` for all ``B·K`` rotated structures, built with tensor
operations (:func:`atom_graphs`): the k-nearest-neighbour graph within the radius from
:func:`equiaudit.batching.radius_graph` (``max_neighbors`` = Orb's ``max_num_neighbors``), the
same node, edge and system features ``ase_atoms_to_atom_graphs`` + ``batch_graphs`` produce
for molecules (one-hot ``atomic_numbers_embedding`` of 118 classes, zero cell, ``pbc`` False,
``lattice`` ``[0, 0, 0, 90, 90, 90]``). Then ``model.predict(graphs)``: energy ``(B,)`` and forces
``(B, A, 3)`` (direct models: the forces head; conservative models: ``grad_forces``). Molecules
only (equiaudit's data carry no cell), so the stress head is not audited.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from equiaudit.batching import _valid, radius_graph, unflatten
from equiaudit.zoo.families.base import FamilyDefaults, Peek, Recognition

__all__ = ["NAME", "EXTRA", "READS", "NAMED", "OrbForceField", "atom_graphs", "orb_force_field", "recognise", "build",
           "defaults"]

NAME = "orb"
EXTRA = "orb"
READS = "finetune.py's checkpoint_epochN.ckpt (weights only: name the architecture, model.name=orb_v3_direct_20_omat)"

#: Orb's pretrained names → (architecture function, its keyword arguments, radius,
#: max_num_neighbors), as ``orb_models/forcefield/pretrained.py`` (0.5.5) builds them before
#: downloading weights.
NAMED: dict[str, tuple[str, dict[str, Any], float, int]] = {
    "orb_v3_conservative_omol": ("orb_v3_conservative_architecture",
                                 {"has_charge_spin_cond": True, "has_stress": False}, 6.0, 120),
    "orb_v3_direct_omol": ("orb_v3_direct_architecture", {"has_charge_spin_cond": True, "has_stress": False}, 6.0, 120),
    "orb_v3_conservative_20_omat": ("orb_v3_conservative_architecture", {}, 6.0, 20),
    "orb_v3_conservative_inf_omat": ("orb_v3_conservative_architecture", {}, 6.0, 120),
    "orb_v3_direct_20_omat": ("orb_v3_direct_architecture", {}, 6.0, 20),
    "orb_v3_direct_inf_omat": ("orb_v3_direct_architecture", {}, 6.0, 120),
    "orb_v3_conservative_20_mpa": ("orb_v3_conservative_architecture", {}, 6.0, 20),
    "orb_v3_conservative_inf_mpa": ("orb_v3_conservative_architecture", {}, 6.0, 120),
    "orb_v3_direct_20_mpa": ("orb_v3_direct_architecture", {}, 6.0, 20),
    "orb_v3_direct_inf_mpa": ("orb_v3_direct_architecture", {}, 6.0, 120),
    "orb_v2": ("orb_v2_architecture", {}, 6.0, 20),
    "orb_mptraj_only_v2": ("orb_v2_architecture", {}, 6.0, 20),
    "orb_d3_v2": ("orb_v2_architecture", {}, 6.0, 20),
    "orb_d3_sm_v2": ("orb_v2_architecture", {"num_message_passing_steps": 10}, 6.0, 20),
    "orb_d3_xs_v2": ("orb_v2_architecture", {"num_message_passing_steps": 5}, 6.0, 20),
}
ARCHITECTURES = ("orb_v3_direct_architecture", "orb_v3_conservative_architecture", "orb_v2_architecture")
N_ELEMENTS = 118  # Orb's one-hot atomic-number embedding (featurization_utilities.get_atom_embedding)


def _orb():
    try:
        from orb_models.forcefield import base, pretrained
        from orb_models.forcefield.atomic_system import SystemConfig
    except ImportError as exc:
        raise ImportError(f"orb-models is not installed ({exc}): pip install \"equiaudit[orb]\"") from exc
    return base, pretrained, SystemConfig


def atom_graphs(pos: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None, radius: float, max_num_neighbors: int):
    """ONE Orb ``AtomGraphs`` for a padded batch of molecules, built with tensor operations.

    Args: ``pos`` ``(B, A, 3)`` (its dtype is the graph's float dtype), ``z`` ``(B, A)``,
    ``mask`` ``(B, A)`` bool or None, Orb's ``radius`` and ``max_num_neighbors``.
    Returns what ``batch_graphs([ase_atoms_to_atom_graphs(atoms_b, SystemConfig(radius, k))
    for b])`` returns for the same molecules (edges in another order: Orb sorts each sender's
    by distance), with ``positions`` a differentiable function of ``pos``.
    """
    base = _orb()[0]
    valid = _valid(mask, pos)
    batch_size = valid.shape[0]
    device, dtype = pos.device, pos.dtype
    graph = radius_graph(pos, valid, radius, max_neighbors=max_num_neighbors)
    flat_pos = pos[valid]
    numbers = z.to(device)[valid].long()
    n_node = graph.n_node
    first = torch.cumsum(n_node, 0) - n_node  # each structure's first flat index
    senders, receivers = graph.edge_index
    cell = torch.zeros((batch_size, 3, 3), dtype=dtype, device=device)
    lattice = torch.tensor([0.0, 0.0, 0.0, 90.0, 90.0, 90.0], dtype=dtype, device=device).expand(batch_size, 6)
    return base.AtomGraphs(
        senders=senders,
        receivers=receivers,
        n_node=n_node,
        n_edge=graph.n_edge,
        node_features={
            "positions": flat_pos,
            "atomic_numbers": numbers,
            "atomic_numbers_embedding": torch.nn.functional.one_hot(numbers, N_ELEMENTS).to(dtype),
            "atom_identity": torch.arange(len(numbers), device=device) - first[graph.batch],
        },
        edge_features={"vectors": graph.vectors(flat_pos), "unit_shifts": graph.unit_shifts.to(dtype)},
        system_features={"cell": cell, "pbc": torch.zeros((batch_size, 3), dtype=torch.bool, device=device),
                         "lattice": lattice.clone()},
        node_targets={},
        edge_targets={},
        system_targets={},
        system_id=None,
        fix_atoms=None,
        tags=torch.zeros(len(numbers), dtype=dtype, device=device),
        radius=float(radius),
        max_num_neighbors=torch.full((batch_size,), int(max_num_neighbors), dtype=torch.long, device=device),
    )


class OrbForceField(nn.Module):
    """An Orb regressor (``DirectForcefieldRegressor`` / ``ConservativeForcefieldRegressor``)
    behind the padded ``(pos, z, mask)`` signature; ``self.model`` is Orb's own module, so a
    ``finetune.py`` state dict loads into it with the ``model.`` prefix equiaudit adds."""

    def __init__(self, network: nn.Module, radius: float, max_num_neighbors: int, name: str | None = None):
        super().__init__()
        self.model = network
        self.radius = float(radius)
        self.max_num_neighbors = int(max_num_neighbors)
        self.name = name
        self.conservative = hasattr(network, "grad_forces_name")

    def upgrade_state_dict(self, state_dict: dict) -> dict:
        """Orb's own key renames for orb-v2-era files (``node_head.`` → ``heads.forces.`` …),
        as ``orb_models.forcefield.load.load_forcefield_state_dict`` applies them."""
        renames = {"node_head.": "heads.forces.", "graph_head.": "heads.energy.", "stress_head.": "heads.stress."}
        out = {}
        for key, value in state_dict.items():
            for old, new in renames.items():
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            out[key] = value
        return out

    def forward(self, pos: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        valid = _valid(mask, pos)
        batch_size = valid.shape[0]
        if self.conservative:
            from equiaudit.adapters import _outside_inference_mode

            with _outside_inference_mode() as left:
                inputs = (pos.clone(), z.clone(), valid.clone()) if left else (pos, z, valid)
                out = self.model.predict(atom_graphs(*inputs, self.radius, self.max_num_neighbors))
                energy, forces = out["energy"], out[self.model.grad_forces_name]
                if left:
                    energy, forces = energy.detach(), forces.detach()
        else:
            out = self.model.predict(atom_graphs(pos, z, valid, self.radius, self.max_num_neighbors))
            energy, forces = out["energy"], out["forces"]
        return {"energy": energy.reshape(batch_size), "forces": unflatten(forces, valid)}


def _named(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in NAMED:
        raise ValueError(f"unknown Orb model name {name!r}; known: {', '.join(sorted(NAMED))}")
    return key


def orb_force_field(name: str | None = None, architecture: str | None = None, radius: float | None = None,
                    max_num_neighbors: int | None = None, **architecture_kwargs: Any) -> OrbForceField:
    """Orb's network, built by orb-models' architecture function (randomly initialised: the
    weights come from the audited checkpoints; nothing is downloaded).

    ``name``: a pretrained name (:data:`NAMED`); or ``architecture`` (one of
    :data:`ARCHITECTURES`, default ``orb_v3_direct_architecture``) with its keyword arguments.
    ``radius`` / ``max_num_neighbors`` override the graph settings (``SystemConfig``)."""
    _, pretrained, system_config_class = _orb()
    if name is not None:
        if architecture is not None or architecture_kwargs:
            raise ValueError("give the Orb model's name or its architecture keyword arguments, not both")
        key = _named(name)
        architecture, architecture_kwargs, named_radius, named_neighbors = NAMED[key]
        architecture_kwargs = dict(architecture_kwargs)
        radius = named_radius if radius is None else radius
        max_num_neighbors = named_neighbors if max_num_neighbors is None else max_num_neighbors
    else:
        key = None
        architecture = architecture or "orb_v3_direct_architecture"
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown Orb architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    builder = getattr(pretrained, architecture)
    accepted = set(inspect.signature(builder).parameters) - {"device", "system_config"}
    unknown = sorted(set(architecture_kwargs) - accepted)
    if unknown:
        raise TypeError(f"{architecture} takes no argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")
    radius = 6.0 if radius is None else float(radius)
    max_num_neighbors = 20 if max_num_neighbors is None else int(max_num_neighbors)
    system_config = system_config_class(radius=radius, max_num_neighbors=max_num_neighbors)
    network = builder(device="cpu", system_config=system_config, **architecture_kwargs)
    return OrbForceField(network, radius, max_num_neighbors, name=key)


# --------------------------------------------------------------------------- the family protocol


def _is_orb_state(state: Any) -> bool:
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        return False
    keys = list(state)
    gns = any(k.startswith("model.gnn_stacks.") or k.startswith("gnn_stacks.") for k in keys)
    heads = any(k.startswith(("heads.energy.", "graph_head.", "node_head.")) for k in keys)
    return gns and heads and all(isinstance(v, torch.Tensor) for v in state.values())


def recognise(peek: Peek) -> Recognition | None:
    """A ``finetune.py`` checkpoint: a flat state dict of Orb's regressor (``model.gnn_stacks.*``
    — MoleculeGNS — beside ``heads.energy.*``), every value a tensor."""
    contents = peek.contents()
    if not _is_orb_state(contents):
        return None
    layers = {k.split(".")[2] for k in contents if k.startswith("model.gnn_stacks.")}
    kind = "direct" if any(k.startswith(("heads.forces.", "node_head.")) for k in contents) else "conservative"
    return Recognition(NAME, "checkpoint", architecture=kind,
                       details={"message_passing_steps": len(layers),
                                "stress": any(k.startswith("heads.stress.") for k in contents)})


def build(source: Path | None, name: str | None = None, architecture: str | None = None, radius: float | None = None,
          max_num_neighbors: int | None = None, **architecture_kwargs: Any) -> OrbForceField:
    """The network named by ``name`` or described by ``architecture`` + kwargs (``source`` holds
    only weights, which equiaudit loads afterwards)."""
    if name is None and architecture is None and not architecture_kwargs:
        raise ValueError("an Orb checkpoint holds only weights: name its architecture, e.g. "
                         "--set model.name=orb_v3_direct_20_omat (or model: {family: orb, name: ...})")
    return orb_force_field(name, architecture, radius, max_num_neighbors, **architecture_kwargs)


def defaults(model: nn.Module) -> FamilyDefaults:
    """Energy and forces in float32 (Orb's precision); conservative models take forces by autograd."""
    return FamilyDefaults(task="force_field", heads=("energy", "forces"), group="so3",
                          grad=bool(getattr(model, "conservative", False)), dtype="float32")

"""SevenNet (Park et al. 2024) as an equiaudit force field: a published E(3)-equivariant
interatomic potential, built from its own package and loaded from its shipped checkpoints.

A model family (:mod:`equiaudit.zoo.families.base`): ``equiaudit audit RUN_DIR --data FILE``
recognises a SevenNet training checkpoint from its contents (a ``config`` dict with SevenNet's
``cutoff`` and ``_number_of_species`` beside ``model_state_dict``) and builds it with no
config. Also ``model: {family: sevennet}`` or, as before,
``model.factory: "equiaudit.zoo.sevennet:sevennet_force_field"`` (an alias of this module's
function) with ``model.kwargs: {checkpoint: 7net-0}`` (a name shipped in the installed
``sevenn`` wheel) or ``{checkpoint: path/to/checkpoint_N.pth}`` (a SevenNet training run's
file). Needs the extra ``pip install "equiaudit[sevennet]"`` (``sevenn`` and ``e3nn``).

What runs and what does not:

* The architecture comes from the checkpoint's ``config``, read through equiaudit's
  weights-only loader (numpy's data globals and ``torch.device`` allowlisted): nothing in the
  file runs. SevenNet's own ``SevenNetCheckpoint`` is not used because it unpickles
  the whole file with torch's weights-only guard switched off. The config then goes through SevenNet's own
  ``_config_cp_routine`` (defaults, old-version patches, shift/scale) and
  ``build_E3_equivariant_model``, so the network is the one SevenNet builds.
* The weights are NOT loaded here: equiaudit loads each audited checkpoint's
  ``model_state_dict`` into the built network, as for any factory (the keys gain the
  wrapper's ``model.`` prefix automatically).

Signature (the ``force_field`` task's): ``pos`` ``(B, A, 3)`` in Å, ``z`` ``(B, A)`` atomic
numbers, ``mask`` ``(B, A)`` bool (``True`` = real atom) → ``{"energy": (B,), "forces":
(B, A, 3)}`` in eV and eV/Å; padded atoms get zero force. Forces are ``−dE/dpos`` by
autograd (set ``model.grad: true``), so ``--dynamics`` can differentiate through them.

The graph is every pair of real atoms of one structure closer than the model's cutoff, built
for the whole batch by :func:`equiaudit.batching.radius_graph` (no Python loop over structures). Molecules
only: no periodic cell (``cell_volume`` is 0, as SevenNet sets it for non-periodic input).
Edge vectors follow SevenNet's convention ``pos[dst] − pos[src]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from equiaudit.batching import radius_graph
from equiaudit.zoo.families.base import FamilyDefaults, Peek, Recognition
from equiaudit.zoo.models import _energy_and_forces, _valid, _zero_padded

__all__ = ["SevenNetForceField", "sevennet_force_field", "shipped_checkpoints", "resolve_checkpoint",
           "read_sevennet_config", "NAME", "EXTRA", "READS", "recognise", "build", "defaults"]

NAME = "sevennet"
EXTRA = "sevennet"
READS = "checkpoint_N.pth: config (the architecture), model_state_dict"

#: Short names SevenNet's docs use for the checkpoints its wheel ships (``sevenn._const``).
_ALIASES = {
    "7net-0": "SEVENNET_0_11Jul2024",
    "7net-0_11jul2024": "SEVENNET_0_11Jul2024",
    "7net-0_22may2024": "SEVENNET_0_22May2024",
    "7net-l3i5": "SEVENNET_l3i5",
    "7net-mf-0": "SEVENNET_MF_0",
}


def _sevenn():
    try:
        import sevenn._const as const
        import sevenn._keys as keys
        from sevenn import model_build
        from sevenn.checkpoint import _config_cp_routine
    except ImportError as exc:
        raise ImportError(f"SevenNet is not installed ({exc}): pip install \"equiaudit[sevennet]\"") from exc
    return const, keys, model_build, _config_cp_routine


def shipped_checkpoints() -> dict[str, Path]:
    """The SevenNet checkpoints present in the installed wheel: alias → file (nothing downloaded)."""
    const = _sevenn()[0]
    out = {}
    for alias, attribute in _ALIASES.items():
        path = Path(getattr(const, attribute, ""))
        if path.is_file():
            out[alias] = path
    return out


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A path as given, or a shipped alias (``7net-0`` …). Never downloads: SevenNet's own
    ``pretrained_name_to_path`` fetches the models its wheel lacks; equiaudit refuses instead."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    shipped = shipped_checkpoints()
    key = str(checkpoint).lower()
    if key in shipped:
        return shipped[key]
    known = ", ".join(sorted(shipped)) or "none"
    raise FileNotFoundError(
        f"SevenNet checkpoint {str(checkpoint)!r} is neither a file nor a model shipped in the installed "
        f"sevenn wheel (shipped: {known}); equiaudit downloads nothing: fetch it yourself and pass its path"
    )


def read_sevennet_config(path: str | Path) -> dict:
    """The architecture ``config`` of a SevenNet checkpoint, read weights-only."""
    from equiaudit.io.safe_load import load_weights_only

    raw = load_weights_only(path, safe_globals=[torch.device])
    config = raw.get("config") if isinstance(raw, dict) else None
    if not isinstance(config, dict) or not config:
        raise ValueError(f"{path}: no SevenNet 'config' in this checkpoint (is it a SevenNet training checkpoint?)")
    return dict(config)


class SevenNetForceField(nn.Module):
    """A SevenNet network behind the padded ``(pos, z, mask)`` signature.

    ``self.model`` is SevenNet's ``AtomGraphSequential`` without its ``force_output``
    module: forces are taken here, by autograd through ``pos``, which is the same
    ``−dE/dpos`` as SevenNet's edge-gradient force output (that module only reorders the
    chain rule) and lets equiaudit's grad-mode handling (eval, training, ``--dynamics``) apply.
    """

    def __init__(self, network: nn.Module, cutoff: float, keys, modal: str | None = None, version: str | None = None):
        super().__init__()
        self.model = network
        self.version = version
        self.cutoff = float(cutoff)
        self._keys = keys
        modal_map = getattr(network, "modal_map", None)
        if modal_map:
            if modal is None:
                raise ValueError(f"this SevenNet model is multi-fidelity: pass modal= one of {sorted(modal_map)}")
            if modal not in modal_map:
                raise ValueError(f"modal {modal!r} is not one of this model's {sorted(modal_map)}")
        elif modal is not None:
            raise ValueError("modal= was given but this SevenNet model has a single fidelity")
        self.modal = modal
        # The modal index is set here per batch (SevenNet's own lookup needs its Data class).
        self._modal_index = modal_map[modal] if modal_map else None
        network.eval_modal_map = False

    def upgrade_state_dict(self, state_dict: dict) -> dict:
        """Older SevenNet layouts (< 0.11: other module names, unsorted convolution weights)
        mapped onto this network by SevenNet's own patch; called by equiaudit's loader."""
        from sevenn.scripts.backward_compatibility import patch_state_dict_if_old

        if self.version is None or any(k.startswith("model.") for k in state_dict):
            return state_dict
        return patch_state_dict_if_old(state_dict, {"version": self.version}, self.model)

    def _energy(self, pos: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(B,)`` total energies of the padded batch ``pos`` ``(B, A, 3)``."""
        k = self._keys
        batch_size = valid.shape[0]
        z_real = z[valid].long()
        onehot = self.model.z_to_onehot_tensor.to(z_real.device)
        unknown = (z_real < 0) | (z_real >= onehot.numel())
        unknown[~unknown] = onehot[z_real[~unknown]] < 0
        if bool(unknown.any()):
            bad = sorted({int(v) for v in z_real[unknown]})
            raise ValueError(f"this SevenNet model was not trained on atomic numbers {bad}")
        # One radius graph for the whole batch (equiaudit.batching: tensor operations, no loop).
        graph = radius_graph(pos, valid, self.cutoff)
        flat_pos = pos[valid]
        data = {
            k.NODE_FEATURE: z_real,
            k.ATOMIC_NUMBERS: z_real,
            k.POS: flat_pos,
            k.EDGE_IDX: graph.edge_index,
            k.EDGE_VEC: graph.vectors(flat_pos),
            k.BATCH: graph.batch,
            k.NUM_ATOMS: graph.n_node,
            k.CELL_VOLUME: torch.zeros(batch_size, dtype=pos.dtype, device=pos.device),
        }
        if self._modal_index is not None:
            data[k.MODAL_TYPE] = torch.full((batch_size,), self._modal_index, dtype=torch.long, device=pos.device)
        energy = self.model(data)[k.PRED_TOTAL_ENERGY].reshape(batch_size)
        return energy, None

    def forward(self, pos: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        valid = _valid(mask, pos)
        out = _energy_and_forces(self, pos, lambda p: self._energy(p, z, valid))
        out["forces"] = _zero_padded(out["forces"], valid)
        return out


def sevennet_force_field(checkpoint: str = "7net-0", modal: str | None = None) -> SevenNetForceField:
    """Build SevenNet's network from ``checkpoint``'s config (weights come from the audited files)."""
    const, keys, model_build, config_routine = _sevenn()
    config = config_routine(read_sevennet_config(resolve_checkpoint(checkpoint)))
    cueq = config.get(keys.CUEQUIVARIANCE_CONFIG)
    if isinstance(cueq, dict) and cueq.get("use"):
        # cuEquivariance stores its weights in another layout; SevenNet converts them on load.
        raise ValueError("this checkpoint was trained with cuEquivariance: convert it to e3nn with SevenNet first")
    for flag in (keys.USE_FLASH_TP, keys.USE_OEQ):  # accelerated kernels off: plain e3nn, same weights
        config[flag] = False
    network = model_build.build_E3_equivariant_model(config)
    network.delete_module_by_key("force_output")
    network.set_is_batch_data(True)
    return SevenNetForceField(network, config[keys.CUTOFF], keys, modal, version=config.get("version"))


# --------------------------------------------------------------------------- the family protocol


def recognise(peek: Peek) -> Recognition | None:
    """A SevenNet training checkpoint: ``config`` holds SevenNet's architecture keys beside
    ``model_state_dict`` (``sevenn.checkpoint``'s layout)."""
    contents = peek.contents()
    if not isinstance(contents, dict) or "model_state_dict" not in contents:
        return None
    config = contents.get("config")
    if not isinstance(config, dict) or not {"cutoff", "_number_of_species"} <= set(config):
        return None
    epoch = contents.get("epoch")
    version = config.get("version")
    return Recognition(NAME, "checkpoint", architecture=str(config.get("_model_type", "E3_equivariant_model")),
                       details={"epoch": epoch if isinstance(epoch, int) else None,
                                "version": version if isinstance(version, str) else None})


def build(source: Path | None, checkpoint: str | None = None, modal: str | None = None) -> SevenNetForceField:
    """The network of ``source`` (or ``checkpoint``: a path or a shipped alias)."""
    if source is None and checkpoint is None:
        raise ValueError("the sevennet family needs a checkpoint: a SevenNet file or a shipped name (7net-0)")
    return sevennet_force_field(str(checkpoint if checkpoint is not None else source), modal=modal)


def defaults(model: nn.Module) -> FamilyDefaults:
    """Energy and forces (autograd through ``pos``), in float32 as SevenNet runs."""
    return FamilyDefaults(task="force_field", heads=("energy", "forces"), group="so3", grad=True, dtype="float32")

"""metatrain (PET and the other architectures ``mtt train`` trains) as an equiaudit model family.

``equiaudit audit RUN_DIR --data val.xyz`` with ``RUN_DIR`` a ``mtt train`` output folder
(``outputs/DATE/TIME/``): every ``model_N.ckpt`` is one audited checkpoint (epoch N); the
run's support files are recognised and skipped. Needs ``pip install "equiaudit[metatrain]"``.

Reading (nothing in any file runs): a metatrain checkpoint is a ``torch.save`` dict of
``architecture_name``, ``model_ckpt_version``, ``epoch``, ``model_data: {model_hypers,
dataset_info}``, ``model_state_dict`` (the weights of epoch N, plus a non-tensor
``finetune_config``), ``best_model_state_dict`` and optimizer state; ``metadata`` and the
``dataset_info`` layouts are TorchScript objects (metatomic/metatensor). It is read by
:func:`equiaudit.io.safe_opaque.read_opaque`: torch's weights-only unpickler with those
objects (and metatrain's ``DatasetInfo``/``TargetInfo`` classes) as inert placeholders.

Building: the ``DatasetInfo`` is rebuilt from the placeholders' recorded data (length unit,
atomic types, and per target its quantity, unit, description and layout, the layout parsed
by metatensor's own ``load_buffer`` from the bytes the checkpoint stores), the checkpoint
upgraded by the architecture's own ``upgrade_checkpoint`` when it is older than the
installed metatrain, and the network built and loaded by the architecture's own
``load_checkpoint(checkpoint, context="restart")``: the weights of epoch N
(``model_state_dict``), not the best-so-far weights (``best_model_state_dict``) that
``mtt eval``/``mtt export`` take from the same file. The energy is what metatrain's model
returns in evaluation mode: the network, its scaler and its composition (additive) models,
i.e. what ``mtt eval`` reports for the same weights.

Evaluating (:class:`MetatrainForceField`): the padded batch ``pos (B, A, 3)``, ``z (B, A)``,
``mask (B, A)`` becomes ONE list of ``B`` metatomic ``System``s (no cell: molecules and
clusters) whose neighbour lists (every list the model requests: ``full_list``, cutoff) are
computed for the whole batch in one tensor expression and split per system; energies come
back from one forward, forces are ``-dE/dpos`` by autograd through ``pos``.

Each audited checkpoint's weights are then loaded by equiaudit's own loader (the same
opaque reader; ``model_state_dict``, with ``finetune_config`` dropped and named) into the
wrapper, whose ``load_state_dict`` post-hook re-syncs the composition model's and the
scaler's TensorMaps from their buffers (metatrain's ``sync_tensor_maps``, as its
``load_checkpoint`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from equiaudit.zoo.families.base import FamilyDefaults, Opaque, Peek, Recognition
from equiaudit.zoo.models import _energy_and_forces, _valid, _zero_padded

__all__ = ["NAME", "EXTRA", "READS", "recognise", "build", "defaults", "MetatrainForceField", "AtomisticForceField",
           "metatomic_force_field", "is_atomistic_model", "read_metatrain_checkpoint", "rebuild_dataset_info"]

NAME = "metatrain"
EXTRA = "metatrain"
READS = "model_N.ckpt: architecture_name, model_hypers, dataset_info, model_state_dict (epoch N); skips composition_model/scaler/model.ckpt copies and exported model.pt"

#: Architectures that are parts of a model, fitted once before training, saved beside the run.
SUPPORT_ARCHITECTURES = {"composition": "metatrain's composition model, fitted before training (part of every model_N.ckpt)",
                         "scaler": "metatrain's target scaler, fitted before training (part of every model_N.ckpt)"}


def _packages():
    try:
        import metatensor.torch as mts
        import metatomic.torch as mta
        from metatrain.utils.architectures import import_architecture
    except ImportError as exc:
        raise ImportError(f"metatrain is not installed ({exc})") from exc
    return mts, mta, import_architecture


# --------------------------------------------------------------------------- recognising


def _is_metatrain_dict(contents: Any) -> bool:
    return (isinstance(contents, dict) and isinstance(contents.get("architecture_name"), str)
            and isinstance(contents.get("model_data"), dict) and "model_state_dict" in contents)


def recognise(peek: Peek) -> Recognition | None:
    """A metatrain checkpoint (its contents: ``architecture_name``, ``model_data``,
    ``model_state_dict``), a support file of a run, or a metatomic export (a TorchScript
    archive with ``extra/metatomic-version``)."""
    if peek.is_torchscript():
        if any(n.endswith("extra/metatomic-version") for n in peek.zip_names()):
            return Recognition(NAME, "torchscript", architecture="metatomic AtomisticModel",
                               reason="a metatomic model exported by `mtt export` (a TorchScript archive: a program); "
                                      "the model_N.ckpt checkpoints beside it are audited instead, or run it with "
                                      "--allow-torchscript if you trust it")
        return None
    contents = peek.contents()
    if not _is_metatrain_dict(contents):
        return None
    architecture = contents["architecture_name"]
    if architecture in SUPPORT_ARCHITECTURES:
        return Recognition(NAME, "support", architecture=architecture, reason=SUPPORT_ARCHITECTURES[architecture])
    epoch = contents.get("epoch") if isinstance(contents.get("epoch"), int) else None
    details = {"epoch": epoch, "model_ckpt_version": contents.get("model_ckpt_version"),
               "targets": sorted(_targets(contents))}
    # The final checkpoint `mtt train` writes (model.ckpt) holds the last epoch; when a
    # model_E.ckpt of the same epoch sits beside it, it is that checkpoint's copy.
    twin = peek.path.with_name(f"model_{epoch}.ckpt") if epoch is not None else None
    if twin is not None and twin != peek.path and twin.is_file() and not peek.path.stem.startswith("model_"):
        twin_contents = Peek(twin).contents()
        if _is_metatrain_dict(twin_contents) and twin_contents.get("epoch") == epoch:
            return Recognition(NAME, "support", architecture=architecture,
                               reason=f"the final copy of {twin.name} (epoch {epoch}), audited there", details=details)
    return Recognition(NAME, "checkpoint", architecture=architecture, details=details)


def _targets(contents: dict) -> dict[str, Opaque]:
    info = contents["model_data"].get("dataset_info")
    state = info.state if isinstance(info, Opaque) else None
    targets = state.get("targets") if isinstance(state, dict) else None
    return dict(targets) if isinstance(targets, dict) else {}


# --------------------------------------------------------------------------- building


def read_metatrain_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of ``path``, read with TorchScript objects as inert placeholders."""
    from equiaudit.io.safe_opaque import read_opaque

    contents = read_opaque(path)
    if not _is_metatrain_dict(contents):
        raise ValueError(f"{Path(path).name}: not a metatrain checkpoint (no architecture_name/model_data/model_state_dict)")
    return contents


def _state(placeholder: Any, what: str) -> dict:
    if not isinstance(placeholder, Opaque) or not isinstance(placeholder.state, dict):
        raise ValueError(f"metatrain checkpoint: {what} is not the recorded object expected")
    return placeholder.state


def _tensor_map(placeholder: Any, what: str):
    """A metatensor ``TensorMap`` from the bytes its TorchScript object pickled: metatensor's
    own buffer format, parsed as data by ``metatensor.torch.load_buffer``."""
    mts = _packages()[0]
    state = placeholder.state if isinstance(placeholder, Opaque) else None
    if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], torch.Tensor)
            and str(state[1]).endswith("metatensor.TensorMap")):
        raise ValueError(f"metatrain checkpoint: {what} is not a stored metatensor TensorMap")
    return mts.load_buffer(state[0])


def rebuild_dataset_info(placeholder: Any):
    """metatrain's ``DatasetInfo`` rebuilt from a checkpoint's recorded placeholder."""
    from metatrain.utils.data import DatasetInfo, TargetInfo

    state = _state(placeholder, "dataset_info")

    def target(name: str, value: Any) -> TargetInfo:
        recorded = _state(value, f"target {name!r}")
        return TargetInfo(layout=_tensor_map(recorded.get("layout"), f"the layout of {name!r}"),
                          quantity=str(recorded.get("quantity", "")), unit=str(recorded.get("unit", "")),
                          description=str(recorded.get("description", "")))

    targets = {str(k): target(str(k), v) for k, v in (state.get("targets") or {}).items()}
    extra = {str(k): target(str(k), v) for k, v in (state.get("extra_data") or {}).items()}
    return DatasetInfo(length_unit=str(state.get("length_unit", "")),
                       atomic_types=[int(t) for t in state.get("_atomic_types", [])], targets=targets, extra_data=extra)


def _build_network(contents: dict) -> nn.Module:
    """metatrain's own model class, built and loaded (epoch N's weights) by its own code."""
    import_architecture = _packages()[2]
    name = contents["architecture_name"]
    architecture = import_architecture(name)
    checkpoint = {k: v for k, v in contents.items() if k != "metadata"}  # a TorchScript object: left out
    checkpoint["model_data"] = {**contents["model_data"],
                                "dataset_info": rebuild_dataset_info(contents["model_data"].get("dataset_info"))}
    checkpoint["model_state_dict"] = dict(contents["model_state_dict"])
    version = checkpoint.get("model_ckpt_version") or 1
    checkpoint["model_ckpt_version"] = version
    current = architecture.__model__.__checkpoint_version__
    if version > current:
        raise ValueError(f"this {name} checkpoint has format version {version}; the installed metatrain reads up to "
                         f"{current}: upgrade metatrain")
    if version < current:
        checkpoint = architecture.__model__.upgrade_checkpoint(checkpoint)
    return architecture.__model__.load_checkpoint(checkpoint, context="restart")


class MetatrainForceField(nn.Module):
    """A metatrain model behind the padded ``(pos, z, mask)`` signature.

    ``self.model`` is metatrain's own model (``PET`` ...), always run in evaluation mode:
    that is where it adds its scaler and composition contributions (``PET.forward``), and
    what ``mtt eval`` evaluates. ``target``: the energy target (``"energy"``); ``unit``:
    its unit (the model's, e.g. ``eV``); ``length_unit`` the positions' (``angstrom``).
    """

    def __init__(self, network: nn.Module, target: str, unit: str, length_unit: str):
        super().__init__()
        self.model = network
        self.target = target
        self.unit = unit
        self.length_unit = length_unit
        self._requested = self._requested_neighbor_lists(network)
        self.register_load_state_dict_post_hook(_sync_tensor_maps)
        network.eval()

    @staticmethod
    def _requested_neighbor_lists(network: nn.Module) -> list:
        from metatrain.utils.neighbor_lists import get_requested_neighbor_lists

        return get_requested_neighbor_lists(network)

    def _atomic_types(self) -> set[int]:
        return {int(t) for t in self.model.atomic_types}

    def _run(self, systems: list, outputs: dict) -> dict:
        return self.model(systems, outputs)

    def train(self, mode: bool = True) -> MetatrainForceField:
        super().train(mode)
        self.model.eval()  # metatrain adds scaler and composition only in eval mode; no dropout to train
        return self

    def _systems(self, pos: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> list:
        """One metatomic ``System`` per structure, with every requested neighbour list.

        Pairs come from one ``cdist`` over the padded batch (``(B, A, A)``) and are split per
        structure with one ``split``; only the ``System`` objects are made one by one (the
        model takes a list of them)."""
        mts, mta, _ = _packages()
        batch_size, n_atoms = valid.shape
        counts = valid.sum(1)
        local = torch.cumsum(valid.long(), 1) - 1  # index of each real atom within its structure
        flat_pos, flat_z = pos[valid], z[valid].to(torch.int32)
        distance = torch.cdist(pos.detach(), pos.detach())
        eye = torch.eye(n_atoms, dtype=torch.bool, device=pos.device)
        real_pairs = valid[:, :, None] & valid[:, None, :] & ~eye
        lists = []
        for options in self._requested:
            pairs = real_pairs & (distance <= options.cutoff)
            if not options.full_list:
                pairs = pairs & torch.ones_like(eye).triu(1)
            b, i, j = pairs.nonzero(as_tuple=True)  # sorted by structure b
            vectors = pos[b, j] - pos[b, i]
            samples = torch.zeros(len(b), 5, dtype=torch.int32, device=pos.device)
            samples[:, 0], samples[:, 1] = local[b, i].to(torch.int32), local[b, j].to(torch.int32)
            per_system = torch.bincount(b, minlength=batch_size).tolist()
            lists.append((options, torch.split(samples, per_system), torch.split(vectors, per_system)))
        components = [mts.Labels.range("xyz", 3).to(pos.device)]
        properties = mts.Labels.range("distance", 1).to(pos.device)
        names = ["first_atom", "second_atom", "cell_shift_a", "cell_shift_b", "cell_shift_c"]
        cell = torch.zeros(3, 3, dtype=pos.dtype, device=pos.device)
        pbc = torch.zeros(3, dtype=torch.bool, device=pos.device)
        systems = []
        for s, (p, t) in enumerate(zip(torch.split(flat_pos, counts.tolist()), torch.split(flat_z, counts.tolist()))):
            system = mta.System(types=t, positions=p, cell=cell, pbc=pbc)
            for options, samples, vectors in lists:
                block = mts.TensorBlock(values=vectors[s].reshape(-1, 3, 1),
                                        samples=mts.Labels(names, samples[s], assume_unique=True),
                                        components=components, properties=properties)
                system.add_neighbor_list(options, block)
            systems.append(system)
        return systems

    def _energy(self, pos: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, None]:
        mta = _packages()[1]
        systems = self._systems(pos, z, valid)
        outputs = {self.target: mta.ModelOutput(unit=self.unit, sample_kind="system")}
        energy = self._run(systems, outputs)[self.target].block().values
        return energy.reshape(valid.shape[0]), None

    def forward(self, pos: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        valid = _valid(mask, pos)
        unknown = set(torch.unique(z[valid]).tolist()) - self._atomic_types()
        if unknown:
            raise ValueError(f"this metatrain model was not trained on atomic numbers {sorted(unknown)}")
        out = _energy_and_forces(self, pos, lambda p: self._energy(p, z, valid))
        out["forces"] = _zero_padded(out["forces"], valid)
        return out


class AtomisticForceField(MetatrainForceField):
    """A metatomic ``AtomisticModel`` (``mtt export``'s ``model.pt`` loaded, or one built in
    Python) behind the padded signature: the same systems and neighbour lists, evaluated
    through the model's own ``forward(systems, ModelEvaluationOptions, check_consistency)``
    (unit conversions included). Its weights are its own: :meth:`read_checkpoint` gives
    equiaudit the archive's state, so nothing else is loaded into it."""

    def __init__(self, model: nn.Module, target: str | None = None, source: Path | None = None):
        capabilities = model.capabilities()
        # metatomic's standard energy outputs: "energy" and its variants "energy/<variant>".
        energies = [k for k in capabilities.outputs if k == "energy" or k.startswith("energy/")]
        if target is None:
            if not energies:
                raise ValueError(f"this model has no energy output among {sorted(capabilities.outputs)}")
            target = "energy" if "energy" in energies else energies[0]
        elif target not in capabilities.outputs:
            raise ValueError(f"output {target!r} is not one of this model's {sorted(capabilities.outputs)}")
        self._types = {int(t) for t in capabilities.atomic_types}
        super().__init__(model, target, capabilities.outputs[target].unit, capabilities.length_unit)
        self.source = source
        self._dtype = {"float32": torch.float32, "float64": torch.float64}.get(capabilities.dtype, torch.float32)

    @staticmethod
    def _requested_neighbor_lists(network: nn.Module) -> list:
        return list(network.requested_neighbor_lists())

    def _atomic_types(self) -> set[int]:
        return self._types

    def _run(self, systems: list, outputs: dict) -> dict:
        mta = _packages()[1]
        options = mta.ModelEvaluationOptions(length_unit=self.length_unit, outputs=outputs)
        return self.model(systems, options, False)

    def read_checkpoint(self, path: Path, map_location: Any = "cpu", weights: str = "auto"):
        """The archive's own weights (it is already loaded: the user allowed running it)."""
        from equiaudit.io.checkpoints import LoadedCheckpoint

        if self.source is None or Path(path).resolve() != Path(self.source).resolve():
            raise ValueError(f"{Path(path).name}: this audit runs the TorchScript archive {self.source}; "
                             "audit other archives one at a time")
        return LoadedCheckpoint(state_dict=dict(self.state_dict()), format="torchscript", step=None,
                                weights_source="the archive's own weights")


def is_atomistic_model(model: Any) -> bool:
    """Whether ``model`` is a metatomic ``AtomisticModel`` (checked without importing metatomic)."""
    import sys

    mta = sys.modules.get("metatomic.torch")
    return mta is not None and isinstance(model, getattr(mta, "AtomisticModel", ()))


def metatomic_force_field(model: nn.Module, target: str | None = None) -> AtomisticForceField:
    """The Python API's route for a metatomic ``AtomisticModel`` the user loaded
    (``metatomic.torch.load_atomistic_model(path)``, their own choice to run it):
    ``equiaudit.audit(metatomic_force_field(model), data, task="force_field", grad=True)``."""
    return AtomisticForceField(model, target)


def _sync_tensor_maps(module: MetatrainForceField, incompatible) -> None:
    """After new weights: the composition model's and the scaler's TensorMaps follow their
    buffers again (what metatrain's ``load_checkpoint`` does after ``load_state_dict``)."""
    for part in list(getattr(module.model, "additive_models", [])) + [getattr(module.model, "scaler", None)]:
        sync = getattr(part, "sync_tensor_maps", None)
        if callable(sync):
            sync()


def build(source: Path | None, target: str | None = None, checkpoint: str | None = None, *,
          allow_torchscript: bool = False) -> MetatrainForceField:
    """The model of ``source`` (or ``checkpoint``), a ``model_N.ckpt`` of a ``mtt train`` run.

    ``target``: which energy target to audit when the model has several (default: the one
    whose quantity is ``energy``). A TorchScript archive (``mtt export``'s ``model.pt``) is
    loaded only with ``allow_torchscript`` (the CLI's ``--allow-torchscript``): it is a program."""
    path = Path(checkpoint) if checkpoint is not None else source
    if path is None:
        raise ValueError("the metatrain family needs a checkpoint: a model_N.ckpt of a `mtt train` run")
    _packages()
    if Peek(path).is_torchscript():
        if not allow_torchscript:
            raise ValueError(f"{path.name} is a TorchScript archive (a program, exported by `mtt export`); it runs only "
                             "with --allow-torchscript. The model_N.ckpt checkpoints are audited without running anything")
        mta = _packages()[1]
        return AtomisticForceField(mta.load_atomistic_model(str(path)), target, source=path)
    contents = read_metatrain_checkpoint(path)
    if contents["architecture_name"] in SUPPORT_ARCHITECTURES:
        raise ValueError(f"{path.name}: {SUPPORT_ARCHITECTURES[contents['architecture_name']]}, not a model to audit")
    network = _build_network(contents)
    info = network.dataset_info
    energies = [name for name, t in info.targets.items() if t.quantity == "energy"]
    if target is None:
        if not energies:
            raise ValueError(f"{path.name}: no energy target among {sorted(info.targets)}; a force field needs one")
        target = "energy" if "energy" in energies else energies[0]
    elif target not in info.targets:
        raise ValueError(f"target {target!r} is not one of this model's {sorted(info.targets)}")
    return MetatrainForceField(network, target, info.targets[target].unit, info.length_unit)


def defaults(model: nn.Module) -> FamilyDefaults:
    """Energy and forces (autograd through ``pos``) in the dtype the network was trained in."""
    dtype = getattr(model, "_dtype", None) or next(model.parameters()).dtype
    names = {torch.float32: "float32", torch.float64: "float64"}
    return FamilyDefaults(task="force_field", heads=("energy", "forces"), group="so3", grad=True,
                          dtype=names.get(dtype, "float32"))

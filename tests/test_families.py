"""The model-family mechanism without any family's package: the registry, the opaque reader
(TorchScript objects / training-package classes as inert placeholders, anything else still
refused), lenient state dicts, the config's ``model.family`` and the CLI's no-config route."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from equiaudit.cli.auto_config import is_config_path, parse_sets
from equiaudit.cli.main import app
from equiaudit.errors import CheckpointError, ConfigError
from equiaudit.io.checkpoints import read_checkpoint
from equiaudit.io.config import parse_config
from equiaudit.io.safe_load import RefusedPickle, load_weights_only
from equiaudit.io.safe_opaque import read_opaque
from equiaudit.zoo.families import FAMILY_MODULES, Opaque, Peek, Recognition, family, family_names, recognise


@pytest.fixture
def fake_package(monkeypatch):
    """A class that pickles as ``metatrain.fake.Info`` (a name the opaque reader stands in for)."""
    module = types.ModuleType("metatrain.fake")

    class Info:
        def __init__(self, hypers):
            self.hypers = hypers

    Info.__module__, Info.__qualname__ = "metatrain.fake", "Info"
    module.Info = Info
    monkeypatch.setitem(sys.modules, "metatrain.fake", module)
    return Info


def test_registry_lists_one_module_per_family_and_imports_none_of_their_packages():
    assert family_names() == [m.rpartition(".")[2] for m in FAMILY_MODULES]
    assert {"sevennet", "metatrain"} <= set(family_names())
    for name in ("sevennet", "metatrain"):
        module = family(name)
        assert module.NAME == name and module.EXTRA and module.READS
        assert callable(module.recognise) and callable(module.build) and callable(module.defaults)
    with pytest.raises(KeyError, match="unknown model family 'nope'"):
        family("nope")
    with pytest.raises(ValueError, match="kind"):
        Recognition("x", "weights")


def test_opaque_reader_stands_in_for_training_classes_and_nothing_runs(tmp_path, fake_package):
    state = {"w": torch.arange(3.0), "finetune_config": {}}
    path = tmp_path / "ckpt.pt"
    torch.save({"architecture_name": "pet", "model_data": {"dataset_info": fake_package({"cutoff": 4.0})},
                "model_state_dict": state, "epoch": 7}, path)
    with pytest.raises(RefusedPickle, match="metatrain.fake.Info"):  # the plain weights-only read refuses it
        load_weights_only(path)
    contents = read_opaque(path)
    info = contents["model_data"]["dataset_info"]
    assert isinstance(info, Opaque) and info.global_name == "metatrain.fake.Info"
    assert not isinstance(info, fake_package) and info.state == {"hypers": {"cutoff": 4.0}}  # recorded, not built
    # equiaudit's checkpoint reader: the weights, the non-tensor entry dropped and named, the epoch.
    loaded = read_checkpoint(path)
    assert list(loaded.state_dict) == ["w"] and torch.equal(loaded.state_dict["w"], torch.arange(3.0))
    assert loaded.weights_source == "model_state_dict (dropped non-tensor ['finetune_config'])"
    assert loaded.epoch == 7 and loaded.step == 7 and loaded.step_source == "epoch"


def test_a_payload_beside_placeholders_is_still_refused_and_never_runs(tmp_path, fake_package):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.ckpt"
    torch.save({"architecture_name": "pet", "model_data": {"dataset_info": fake_package({})}, "x": Payload(),
                "model_state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(RefusedPickle, match="os.system"):
        read_opaque(path)
    with pytest.raises(CheckpointError, match="os.system") as caught:
        read_checkpoint(path)
    assert caught.value.status == "unsafe_pickle"
    peek = Peek(path)
    assert peek.contents() is None and "os.system" in peek.error and recognise(path) is None
    assert not marker.exists()


def test_a_whole_dict_of_non_tensors_is_still_no_weights(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"model_state_dict": {"a": "text", "b": {}}, "step": 3}, path)
    with pytest.raises(CheckpointError, match="no model weights found"):
        read_checkpoint(path)


def test_config_model_family(tmp_path):
    base = {"task": "force_field", "data": {"path": "x.xyz"}}
    config = parse_config({**base, "model": {"family": "orb", "name": "orb_v3_direct_20_omat", "kwargs": {"a": 1}}})
    assert config.model.family == "orb" and config.model.factory is None
    assert config.model.kwargs == {"name": "orb_v3_direct_20_omat", "a": 1}  # extra model: keys are the family's options
    with pytest.raises(ConfigError, match="not a known family"):
        parse_config({**base, "model": {"family": "nope"}})
    with pytest.raises(ConfigError, match="not both"):
        parse_config({**base, "model": {"family": "metatrain", "factory": "a.b:c"}})
    with pytest.raises(ConfigError, match="unknown key 'model.name'"):  # without a family, the schema is as before
        parse_config({**base, "model": {"factory": "a.b:c", "name": "x"}})


def test_set_values_and_config_paths():
    assert parse_sets(["group.rotations=8", "heads=[energy]", "name=run a", "local=true"]) == {
        "group.rotations": 8, "heads": ["energy"], "name": "run a", "local": True}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_sets(["rotations"])
    assert is_config_path("a.yaml") and is_config_path("A.YML") and not is_config_path("run/") and not is_config_path("m.ckpt")


def test_no_config_and_no_known_family_is_one_clear_error(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "model_1.pt")
    (tmp_path / "d.xyz").write_text("")
    result = CliRunner().invoke(app, ["audit", str(tmp_path), "--data", str(tmp_path / "d.xyz"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no known model family recognised its files (model_1.pt)" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_sevennet_checkpoints_recognised_from_contents(tmp_path):
    pytest.importorskip("sevenn._const")
    from equiaudit.zoo.families.sevennet import shipped_checkpoints

    shipped = shipped_checkpoints()
    if "7net-0" not in shipped:
        pytest.skip("7net-0 not shipped in this sevenn wheel")
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(Path(shipped["7net-0"]).read_bytes())
    found = recognise(renamed)
    assert found is not None and found.family == "sevennet" and found.kind == "checkpoint"
    # The old factory path is an alias of the family's function.
    from equiaudit.zoo import sevennet as alias
    from equiaudit.zoo.families import sevennet as moved

    assert alias.sevennet_force_field is moved.sevennet_force_field


def test_a_torchscript_archive_is_called_what_it_is(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="a TorchScript archive .* --allow-torchscript") as caught:
        read_checkpoint(path)
    assert caught.value.status == "torchscript"
    assert Peek(path).is_torchscript() and recognise(path) is None  # no family claims a plain archive

"""Checkpoint layouts from the field: which weights (raw / EMA), prefixes, steps, duplicates.

Every file is built here, with the key layout the projects' own sources write (cited per
test), so each case can fail on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.errors import CheckpointError
from equiaudit.io.checkpoints import (
    CheckpointRef,
    describe_checkpoint,
    discover_checkpoints,
    load_into_model,
    read_checkpoint,
)


def net(seed: int = 0) -> nn.Module:
    """A small network with parameters *and* buffers (BatchNorm), so parameter-order lists
    must leave the buffers to the named state_dict."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def sd(seed: int) -> dict[str, torch.Tensor]:
    model = net(seed)
    with torch.no_grad():  # distinct buffers too, so a wrong source shows
        model[1].running_mean.fill_(seed)
    return model.state_dict()


def params(seed: int) -> list[torch.Tensor]:
    """The parameters of ``sd(seed)`` in ``model.parameters()`` order (what torch_ema and optimizers hold)."""
    state = sd(seed)
    return [state[k].clone() for k, _ in net().named_parameters()]


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def loaded(ckpt, prefix=None) -> tuple[nn.Module, str | None]:
    model = net(99)
    return model, load_into_model(model, ckpt, prefix=prefix)


def assert_params(model: nn.Module, seed: int) -> None:
    for (key, value), expected in zip(model.named_parameters(), params(seed)):
        assert torch.equal(value, expected), key


def lightning(state: dict, step: int, **extra) -> dict:
    """A Lightning .ckpt as Trainer.save_checkpoint writes it (module attribute `model`)."""
    return {"epoch": 1, "global_step": step, "pytorch-lightning_version": "2.5.0",
            "state_dict": prefixed(state, "model."), "loops": {}, "callbacks": {},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1, 2, 3, 4, 5]}]}],
            "lr_schedulers": [], **extra}


# --------------------------------------------------------------------------- which weights


def test_timm_state_dict_ema_is_chosen_by_auto_and_said(tmp_path):
    # timm CheckpointSaver: {"epoch", "arch", "state_dict", "optimizer", "version", "metric", "state_dict_ema"}
    torch.save({"epoch": 7, "arch": "net", "state_dict": sd(1), "optimizer": {"state": {}, "param_groups": []},
                "version": 2, "metric": 0.5, "state_dict_ema": sd(2)}, tmp_path / "checkpoint-7.pth.tar")
    ckpt = read_checkpoint(tmp_path / "checkpoint-7.pth.tar")
    assert (ckpt.weights, ckpt.weights_source, ckpt.weight_sets) == ("ema", "state_dict_ema", ("raw", "ema"))
    assert (ckpt.step, ckpt.step_source, ckpt.epoch) == (7, "epoch", 7)
    model, _ = loaded(ckpt)
    assert_params(model, 2)

    raw = read_checkpoint(tmp_path / "checkpoint-7.pth.tar", weights="raw")
    assert (raw.weights, raw.weights_source) == ("raw", "state_dict")
    assert_params(loaded(raw)[0], 1)

    info = describe_checkpoint(tmp_path / "checkpoint-7.pth.tar")
    assert (info["weights"], info["weights_source"], info["weight_sets"]) == ("ema", "state_dict_ema", ["raw", "ema"])


class _Payload:
    """Unpickling this would call ``func(*args)`` (the classic code-carrying pickle)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def test_timm_training_args_namespace_is_data_and_code_inside_it_is_refused(tmp_path):
    # timm's train.py saves its argparse.Namespace as "args": an attribute bag, allowlisted.
    args = argparse.Namespace(model="net", lr=0.1, epochs=7, layers=[1, 2], amp=True, mean=(0.5, 0.5))
    torch.save({"epoch": 7, "arch": "net", "state_dict": sd(1), "state_dict_ema": sd(2), "args": args,
                "version": 2, "metric": 0.5}, tmp_path / "checkpoint-7.pth.tar")
    ckpt = read_checkpoint(tmp_path / "checkpoint-7.pth.tar")
    assert (ckpt.weights, ckpt.step, ckpt.step_source) == ("ema", 7, "epoch")
    assert_params(loaded(ckpt)[0], 2)
    # An attribute that carries code is still refused, naming what it wanted, and never runs.
    marker = tmp_path / "ran"
    args.hook = _Payload(os.system, f"touch {marker}")
    torch.save({"epoch": 8, "state_dict": sd(1), "args": args}, tmp_path / "checkpoint-8.pth.tar")
    with pytest.raises(CheckpointError, match=r"refused: the pickle needs `(posix|os|nt)\.system`"):
        read_checkpoint(tmp_path / "checkpoint-8.pth.tar")
    assert not marker.exists()


def test_ema_only_file_and_missing_ema_are_clear_errors(tmp_path):
    # VoxMol-style: only the EMA copy is saved ({"epoch", "config", "state_dict_ema", "optimizer"}).
    torch.save({"epoch": 3, "config": {"lr": 1e-3}, "state_dict_ema": sd(2), "optimizer": {}}, tmp_path / "e.pth.tar")
    assert read_checkpoint(tmp_path / "e.pth.tar").weights == "ema"
    with pytest.raises(CheckpointError, match=r"holds only EMA weights \(state_dict_ema\)") as err:
        read_checkpoint(tmp_path / "e.pth.tar", weights="raw")
    assert err.value.status == "no_raw"

    torch.save({"model_state_dict": sd(1), "step": 5}, tmp_path / "plain.pt")
    assert read_checkpoint(tmp_path / "plain.pt").weights == "raw"
    with pytest.raises(CheckpointError, match=r"^plain\.pt: no EMA weights found \(looked for state_dict_ema") as err:
        read_checkpoint(tmp_path / "plain.pt", weights="ema")
    assert err.value.status == "no_ema" and "\n" not in str(err.value)


def test_nemo_ema_sibling_is_one_checkpoint(tmp_path):
    # NeMo/Proteina: NeMoModelCheckpoint writes X.ckpt and X-EMA.ckpt (state_dict = EMA weights).
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    for step, raw_seed, ema_seed in ((100, 1, 2), (200, 3, 4)):
        torch.save(lightning(sd(raw_seed), step), run / f"epoch=0-step={step}.ckpt")
        torch.save(lightning(sd(ema_seed), step), run / f"epoch=0-step={step}-EMA.ckpt")
    torch.save(lightning(sd(3), 200), run / "last.ckpt")
    torch.save(lightning(sd(4), 200), run / "last-EMA.ckpt")

    refs = discover_checkpoints([tmp_path / "run"])
    assert [(r.name, r.step, r.ema_path.name if r.ema_path else None, r.aliases) for r in refs] == [
        ("epoch=0-step=100.ckpt", 100, "epoch=0-step=100-EMA.ckpt", ()),
        ("epoch=0-step=200.ckpt", 200, "epoch=0-step=200-EMA.ckpt", ("last.ckpt",)),
    ]
    assert {r.run for r in refs} == {"run"}

    ckpt = read_checkpoint(refs[0])
    assert (ckpt.weights, ckpt.weights_source, ckpt.step) == ("ema", "sibling epoch=0-step=100-EMA.ckpt", 100)
    assert_params(loaded(ckpt)[0], 2)
    assert_params(loaded(read_checkpoint(refs[0], weights="raw"))[0], 1)
    # A path (not a ref) finds the sibling on disk too: the runner may pass ref.path.
    assert read_checkpoint(run / "epoch=0-step=100.ckpt").weights_source == "sibling epoch=0-step=100-EMA.ckpt"
    assert describe_checkpoint(run / "epoch=0-step=100.ckpt")["ema_file"] == "epoch=0-step=100-EMA.ckpt"

    # The -EMA file on its own: EMA weights only; asking for raw names the partner.
    alone = discover_checkpoints([run / "epoch=0-step=100-EMA.ckpt"])
    assert [(r.name, r.ema_path) for r in alone] == [("epoch=0-step=100-EMA.ckpt", None)]
    assert read_checkpoint(alone[0]).weights == "ema"
    with pytest.raises(CheckpointError, match=r"raw weights are in epoch=0-step=100\.ckpt") as err:
        read_checkpoint(alone[0], weights="raw")
    assert err.value.status == "no_raw"


def test_nemo_ema_optimizer_state_in_parameter_order(tmp_path):
    # NeMo EMAOptimizer.state_dict(): {"opt", "ema" (tuple, optimizer param order), "current_step", "decay", ...}
    ema_state = {"opt": {"state": {}, "param_groups": []}, "ema": tuple(params(2)), "current_step": 50,
                 "decay": 0.999, "every_n_steps": 1}
    torch.save(lightning(sd(1), 50, optimizer_states=[ema_state]), tmp_path / "epoch=0-step=50.ckpt")
    ckpt = read_checkpoint(tmp_path / "epoch=0-step=50.ckpt")
    assert (ckpt.weights, ckpt.weights_source, len(ckpt.ordered_params)) == ("ema", "optimizer_states[0]['ema']", 6)
    model, done = loaded(ckpt)
    assert done == "stripped 'model.'; 6 parameters from optimizer_states[0]['ema']"
    assert_params(model, 2)
    assert torch.equal(model[1].running_mean, sd(1)["1.running_mean"])  # buffers from the named state_dict

    # A list that does not follow the model's parameters is refused, not loaded scrambled.
    ema_state["ema"] = tuple(reversed(params(2)))
    torch.save(lightning(sd(1), 50, optimizer_states=[ema_state]), tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"tensor 0 has shape \(2,\) but parameter '0.weight' has \(4, 3\)") as err:
        loaded(read_checkpoint(tmp_path / "bad.ckpt"))
    assert err.value.status == "key_mismatch"


def test_lightning_weight_averaging_is_said(tmp_path):
    # lightning/pytorch/callbacks/weight_averaging.py on_save_checkpoint: the average goes to
    # "state_dict", the raw weights to "current_model_state", n_averaged to "averaging_state".
    ckpt_dict = lightning(sd(2), 300, current_model_state=prefixed(sd(1), "model."),
                          averaging_state={"n_averaged": torch.tensor(300)},
                          callbacks={"EMAWeightAveraging": {"latest_update_step": 300}})
    torch.save(ckpt_dict, tmp_path / "epoch=0-step=300.ckpt")
    ckpt = read_checkpoint(tmp_path / "epoch=0-step=300.ckpt")
    assert ckpt.weights == "ema"
    assert ckpt.weights_source == "Lightning EMAWeightAveraging (averaged weights in state_dict)"
    assert_params(loaded(ckpt)[0], 2)
    raw = read_checkpoint(tmp_path / "epoch=0-step=300.ckpt", weights="raw")
    assert raw.weights_source == "current_model_state"
    assert_params(loaded(raw)[0], 1)


def test_ema_inside_lightning_callback_state(tmp_path):
    # A custom Lightning EMA callback returning {"state_dict_ema": ...} from on_save_checkpoint.
    torch.save(lightning(sd(1), 40, callbacks={"EMA{'decay': 0.99}": {"state_dict_ema": sd(2)}}), tmp_path / "a.ckpt")
    ckpt = read_checkpoint(tmp_path / "a.ckpt")
    assert (ckpt.weights, ckpt.weights_source) == ("ema", "callbacks[EMA{'decay': 0.99}]['state_dict_ema']")
    assert_params(loaded(ckpt)[0], 2)


def torch_ema_state(shadow: list, collected: list | None = None) -> dict:
    """torch_ema ExponentialMovingAverage.state_dict() (fadel/pytorch_ema, torch_ema/ema.py)."""
    return {"decay": 0.99, "num_updates": 10, "shadow_params": shadow, "collected_params": collected}


def test_torch_ema_shadow_params_inside_the_training_file(tmp_path):
    torch.save({"model": sd(1), "optimizer": {}, "ema": torch_ema_state(params(2)), "step": 10}, tmp_path / "s.pt")
    ckpt = read_checkpoint(tmp_path / "s.pt")
    assert (ckpt.weights, ckpt.weights_source) == ("ema", "'ema' torch_ema shadow_params")
    model, done = loaded(ckpt)
    assert done == "6 parameters from 'ema' torch_ema shadow_params"
    assert_params(model, 2)
    assert_params(loaded(read_checkpoint(tmp_path / "s.pt", weights="raw"))[0], 1)

    wrapped = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 4 parameters, not 6
    with pytest.raises(CheckpointError, match="holds 6 tensors but the model has 4 parameters"):
        load_into_model(wrapped, ckpt)


def test_torch_ema_in_a_separate_file_is_paired(tmp_path):
    for step in (10, 20):
        torch.save({"model_state_dict": sd(step), "step": step}, tmp_path / f"step_{step}.pt")
        torch.save(torch_ema_state(params(step + 1)), tmp_path / f"ema_step_{step}.pt")
    refs = discover_checkpoints([tmp_path])
    assert [(r.name, r.step, r.ema_path.name) for r in refs] == [
        ("step_10.pt", 10, "ema_step_10.pt"), ("step_20.pt", 20, "ema_step_20.pt")]
    ckpt = read_checkpoint(refs[1])
    assert (ckpt.weights, ckpt.weights_source) == ("ema", "sibling ema_step_20.pt torch_ema shadow_params")
    model, _ = loaded(ckpt)
    assert_params(model, 21)
    assert torch.equal(model[1].running_mean, sd(20)["1.running_mean"])

    # Alone, the shadow params lack the buffers: a clear error, not a half-loaded model.
    (tmp_path / "step_10.pt").unlink()
    alone = [r for r in discover_checkpoints([tmp_path]) if r.name == "ema_step_10.pt"]
    assert alone and alone[0].step == 10
    with pytest.raises(CheckpointError, match=r"missing \['1.running_mean'.*holds no buffers") as err:
        loaded(read_checkpoint(alone[0]))
    assert err.value.status == "key_mismatch"


def test_guided_diffusion_ema_file_pairs_by_step(tmp_path):
    # openai/guided-diffusion: model010000.pt, ema_0.9999_010000.pt (a full state_dict), opt010000.pt.
    torch.save(sd(1), tmp_path / "model010000.pt")
    torch.save(sd(2), tmp_path / "ema_0.9999_010000.pt")
    torch.save({"state": {}, "param_groups": []}, tmp_path / "opt010000.pt")
    refs = discover_checkpoints([tmp_path])
    assert [(r.name, r.step, r.ema_path.name) for r in refs] == [("model010000.pt", 10000, "ema_0.9999_010000.pt")]
    assert_params(loaded(read_checkpoint(refs[0]))[0], 2)


def test_mattersim_epochs_ema_and_duplicates(tmp_path):
    # mattersim/forcefield/potential.py: save() under `with self.ema.average_parameters()`,
    # so "model" holds the averaged weights and ema.collected_params the raw ones; files
    # ckpt_{epoch}.pth every ckpt_interval epochs, best_model.pth, last_model.pth.
    def mattersim(epoch: int, raw_seed: int, ema_seed: int) -> dict:
        return {"model_name": "m3gnet", "model": sd(ema_seed), "model_args": {"cutoff": 5.0},
                "optimizer": {"state": {}, "param_groups": []},
                "ema": torch_ema_state(params(ema_seed), params(raw_seed)),
                "scheduler": {"step_size": 10, "gamma": 0.95, "last_epoch": epoch * 37}, "last_epoch": epoch,
                "validation_metrics": {"loss": 0.1}, "description": ""}

    run = tmp_path / "results"
    run.mkdir()
    for epoch in (0, 10, 20):
        torch.save(mattersim(epoch, epoch + 1, epoch + 2), run / f"ckpt_{epoch}.pth")
    shutil.copyfile(run / "ckpt_10.pth", run / "best_model.pth")
    torch.save(mattersim(20, 21, 22), run / "last_model.pth")  # re-saved, same tensors as ckpt_20

    refs = discover_checkpoints([run])
    assert [(r.name, r.step, r.step_source, r.epoch, r.aliases) for r in refs] == [
        ("ckpt_0.pth", 0, "epoch", 0, ()),
        ("ckpt_10.pth", 10, "epoch", 10, ("best_model.pth",)),
        ("ckpt_20.pth", 20, "epoch", 20, ("last_model.pth",)),
    ]
    ckpt = read_checkpoint(refs[1])
    assert ckpt.weights == "ema"
    assert ckpt.weights_source.startswith("model (= torch_ema shadow_params in 'ema'")
    assert_params(loaded(ckpt)[0], 12)
    raw = read_checkpoint(refs[1], weights="raw")
    assert raw.weights_source == "'ema' collected_params (torch_ema's copy of the raw weights)"
    assert_params(loaded(raw)[0], 11)


def test_copies_of_stepped_checkpoints_are_listed_once(tmp_path):
    # MatterSim/MACE-style best_model.pth and last_model.pth beside stepped files; a genuinely
    # different best model stays listed.
    for step in (100, 200):
        torch.save({"model_state_dict": sd(step), "step": step}, tmp_path / f"step_{step}.pt")
    torch.save({"model_state_dict": sd(100), "step": 100, "best_metric": 0.1}, tmp_path / "best_model.pth")
    torch.save(sd(200), tmp_path / "last_model.pth")  # no step inside: matched by tensors
    torch.save({"model_state_dict": sd(7), "step": 150}, tmp_path / "model_best.pth.tar")
    refs = discover_checkpoints([tmp_path])
    assert [(r.name, r.step, r.aliases) for r in refs] == [
        ("step_100.pt", 100, ("best_model.pth",)), ("model_best.pth.tar", 150, ()),
        ("step_200.pt", 200, ("last_model.pth",)),
    ]


def test_lightning_version_folder_descends_into_checkpoints(tmp_path):
    version = tmp_path / "lightning_logs" / "version_3"
    (version / "checkpoints").mkdir(parents=True)
    (version / "hparams.yaml").write_text("lr: 0.001\n")
    torch.save(lightning(sd(1), 10), version / "checkpoints" / "epoch=0-step=10.ckpt")
    torch.save(lightning(sd(2), 20), version / "checkpoints" / "epoch=1-step=20.ckpt")
    refs = discover_checkpoints([version])
    assert [(r.name, r.run, r.step) for r in refs] == [
        ("epoch=0-step=10.ckpt", "version_3", 10), ("epoch=1-step=20.ckpt", "version_3", 20)]


# --------------------------------------------------------------------------- prefixes and modes


class Wrapper(nn.Module):
    """A factory that wraps the network: model keys are `model.*`."""

    def __init__(self):
        super().__init__()
        self.model = net(5)


def test_published_weights_lacking_the_wrapper_prefix(tmp_path):
    torch.save(sd(1), tmp_path / "published.pt")
    ckpt = read_checkpoint(tmp_path / "published.pt")
    wrapper = Wrapper()
    assert load_into_model(wrapper, ckpt) == "added 'model.'"
    assert_params(wrapper.model, 1)
    assert load_into_model(Wrapper(), ckpt, prefix="model.") == "added 'model.'"  # forced: added
    torch.save(prefixed(sd(1), "model."), tmp_path / "lit.pt")
    assert load_into_model(net(), read_checkpoint(tmp_path / "lit.pt"), prefix="model.") == "stripped 'model.'"
    assert load_into_model(Wrapper(), read_checkpoint(tmp_path / "lit.pt"), prefix="") is None

    with pytest.raises(CheckpointError, match=r"after adding 'net\.'") as err:
        load_into_model(Wrapper(), ckpt, prefix="net.")
    assert err.value.status == "key_mismatch"


class Renaming(nn.Module):
    """A model whose project renamed its layers: old files say ``layer0``/``layer3`` where the
    network now says ``0``/``3``; ``upgrade_state_dict`` maps them (as SevenNet's patches do)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.net = net(99)
        self.fail = fail

    def upgrade_state_dict(self, state):
        if self.fail:
            raise KeyError("no rule for 'layer9'")
        return {k.replace("net.layer", "net."): v for k, v in state.items()}


def test_a_models_upgrade_state_dict_maps_its_old_layout(tmp_path):
    old = {("net.layer" + k[4:] if k[4] in "03" else k): v for k, v in prefixed(sd(1), "net.").items()}
    assert "net.layer0.weight" in old and "net.1.running_mean" in old
    torch.save(old, tmp_path / "old.pt")
    ckpt = read_checkpoint(tmp_path / "old.pt")
    model = Renaming()
    assert load_into_model(model, ckpt) is None
    assert_params(model.net, 1)
    assert torch.equal(model.net[1].running_mean, sd(1)["1.running_mean"])
    with pytest.raises(CheckpointError, match=r"upgrade_state_dict failed: KeyError: .*layer9") as err:
        load_into_model(Renaming(fail=True), ckpt)
    assert err.value.status == "key_mismatch"
    with pytest.raises(CheckpointError, match="keys do not match"):  # without the hook: a mismatch
        load_into_model(Wrapper(), ckpt, prefix="")


def test_ambiguous_prefix_asks_for_one(tmp_path):
    torch.save({**prefixed(sd(1), "a."), **prefixed(sd(2), "b.")}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"ambiguous key prefix: stripping 'b\.' or stripping 'a\.'") as err:
        load_into_model(net(), read_checkpoint(tmp_path / "two.pt"))
    assert err.value.status == "key_mismatch"
    model = net()
    assert load_into_model(model, read_checkpoint(tmp_path / "two.pt"), prefix="b.") == "stripped 'b.'"
    assert_params(model, 2)


class FakeR3Conv(nn.Module):
    """escnn's R3Conv in miniature: ``train(False)`` caches the expanded ``filter`` and
    ``expanded_bias`` as buffers, ``train(True)`` deletes them (escnn/nn/modules/conv/rd_convolution.py)."""

    def __init__(self):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(6))
        self.bias = nn.Parameter(torch.randn(2))

    def train(self, mode: bool = True):
        if not mode:
            self.register_buffer("filter", self.weights.detach().reshape(2, 3) * 2)
            self.register_buffer("expanded_bias", self.bias.detach().repeat(3))
        else:
            for name in ("filter", "expanded_bias"):
                if name in self._buffers:
                    delattr(self, name)
        return super().train(mode)


def test_escnn_style_train_mode_save_loads_before_eval(tmp_path):
    torch.manual_seed(0)
    trained = nn.Sequential(FakeR3Conv()).train()
    torch.save({"state_dict": trained.state_dict(), "step": 9}, tmp_path / "train_mode.pt")
    trained.eval()
    torch.save({"state_dict": trained.state_dict(), "step": 9}, tmp_path / "eval_mode.pt")
    assert "0.filter" in trained.state_dict()

    for name, mode in (("train_mode.pt", "train"), ("eval_mode.pt", "eval")):
        torch.manual_seed(1)
        model = nn.Sequential(FakeR3Conv()).eval()  # the runner builds models in eval mode
        assert load_into_model(model, read_checkpoint(tmp_path / name)) == f"matched the model's {mode}-mode keys"
        assert not model.training
        assert torch.equal(model[0].weights, trained[0].weights)
        assert torch.equal(model[0].filter, trained[0].filter)  # rebuilt from the loaded weights


# --------------------------------------------------------------------------- inspect


def test_inspect_names_the_weights_and_the_step(tmp_path):
    torch.save({"epoch": 7, "state_dict": sd(1), "state_dict_ema": sd(2)}, tmp_path / "t.pth.tar")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "t.pth.tar")])
    assert result.exit_code == 0, result.output
    assert "ema (state_dict_ema); raw weights also present" in result.output
    assert "7 (the epoch: no step stored)" in result.output

    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "t.pth.tar"), "--weights", "raw", "--format", "json"])
    info = json.loads(result.output)
    assert (info["weights"], info["weights_source"], info["step_source"]) == ("raw", "state_dict", "epoch")

    torch.save({"model_state_dict": sd(1), "step": 3}, tmp_path / "p.pt")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "p.pt"), "--weights", "ema"])
    assert result.exit_code == 1 and "no EMA weights found" in result.output


def test_refs_built_by_hand_still_work(tmp_path):
    # Callers construct CheckpointRef(path, name, run, step) positionally.
    torch.save(sd(1), tmp_path / "m.pt")
    ref = CheckpointRef(tmp_path / "m.pt", "m.pt", "run", 0)
    assert (ref.ema_path, ref.aliases, ref.epoch) == (None, (), None)
    assert read_checkpoint(ref).weights == "raw"

"""Checkpoint discovery, safe reading and loading (equiaudit.io.checkpoints)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from equiaudit.errors import CheckpointError
from equiaudit.io.checkpoints import (
    discover_checkpoints,
    describe_checkpoint,
    load_into_model,
    read_checkpoint,
)


# --------------------------------------------------------------------------- fixtures


def tiny_model(seed: int = 0, hidden: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny_model(seed).state_dict()


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def lightning_dict(state: dict, step: int, epoch: int = 1, **extra) -> dict:
    return {
        "state_dict": prefixed(state, "model."),
        "global_step": step,
        "epoch": epoch,
        "pytorch-lightning_version": "2.4.0",
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
        **extra,
    }


def hf_folder(root: Path, step: int, *, bin_weights: bool = False, seed: int = 0) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    state = weights(seed)
    if bin_weights:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 2.0}))
    (folder / "config.json").write_text("{}")
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    return folder


def _write_marker(path: str) -> None:
    Path(path).write_text("pwned")


class _Evil:
    """Unpickling this calls ``func(*args)``: the classic arbitrary-code pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def assert_same_weights(model: nn.Module, state: dict) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# --------------------------------------------------------------------------- reading every format


FORMATS = {
    # name: (writer(path, state) -> path to read, format, step, prefix)
    "raw.pt": (lambda p, s: torch.save(s, p), "state_dict", None, None),
    "train.pt": (lambda p, s: torch.save({"model_state_dict": s, "step": 700, "optimizer": {}}, p),
                 "training_dict", 700, None),
    "ddp.pth": (lambda p, s: torch.save({"state_dict": prefixed(s, "module."), "epoch": 3}, p),
                "training_dict", 3, "module."),
    "compiled.pt": (lambda p, s: torch.save(prefixed(s, "_orig_mod."), p), "state_dict", None, "_orig_mod."),
    "ddp_compiled.pt": (lambda p, s: torch.save(prefixed(s, "module._orig_mod."), p),
                        "state_dict", None, "module._orig_mod."),
    "ema.pt": (lambda p, s: torch.save({"ema": s, "iteration": 9}, p), "training_dict", 9, None),
    "lit.ckpt": (lambda p, s: torch.save(lightning_dict(s, step=1200), p), "lightning", 1200, "model."),
    "w.safetensors": (lambda p, s: save_file(s, p, metadata={"global_step": "300"}), "safetensors", 300, None),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_read_and_load_every_file_format(tmp_path, name):
    writer, fmt, step, prefix = FORMATS[name]
    state = weights(seed=1)
    writer(tmp_path / name, state)

    ckpt = read_checkpoint(tmp_path / name)
    assert ckpt.format == fmt
    assert ckpt.step == step
    model = tiny_model(seed=2)
    assert load_into_model(model, ckpt) == (f"stripped '{prefix}'" if prefix else None)
    assert_same_weights(model, state)


@pytest.mark.parametrize("bin_weights", [False, True])
def test_hf_checkpoint_folder(tmp_path, bin_weights):
    folder = hf_folder(tmp_path, 500, bin_weights=bin_weights, seed=3)
    ckpt = read_checkpoint(folder)
    assert (ckpt.format, ckpt.step, ckpt.metadata["epoch"]) == ("hf_folder", 500, 2)
    model = tiny_model(seed=4)
    assert load_into_model(model, ckpt) is None
    assert_same_weights(model, weights(3))


def test_hf_folder_step_falls_back_to_folder_name(tmp_path):
    folder = hf_folder(tmp_path, 40)
    (folder / "trainer_state.json").unlink()
    assert read_checkpoint(folder).step == 40


def test_hf_sharded_folder(tmp_path):
    folder = tmp_path / "checkpoint-8"
    folder.mkdir()
    state = weights(5)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, folder / file)
    index = {"weight_map": {k: f for f, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model = tiny_model(seed=0)
    load_into_model(model, read_checkpoint(folder))
    assert_same_weights(model, state)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "..", 7])
def test_hf_index_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    # The index is untrusted: a weight_map entry that leaves the folder (even to a valid file) is refused.
    folder = tmp_path / "checkpoint-8"
    folder.mkdir()
    save_file(weights(5), tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in weights(5)}}))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(folder)
    assert err.value.status == "corrupt" and "not a file of this folder: refused" in str(err.value)


def test_lightning_module_with_extra_attributes_picks_the_network(tmp_path):
    # A LightningModule holding `model`, an `ema` copy and a loss with a buffer.
    state, ema = weights(1), weights(2)
    sd = {**prefixed(state, "model."), **prefixed(ema, "ema."), "loss_fn.pos_weight": torch.ones(2)}
    torch.save({"state_dict": sd, "global_step": 10, "pytorch-lightning_version": "2.4.0"}, tmp_path / "a.ckpt")
    model = tiny_model(seed=0)
    assert load_into_model(model, read_checkpoint(tmp_path / "a.ckpt")) == "stripped 'model.'"
    assert_same_weights(model, state)


def test_legacy_non_zip_torch_save(tmp_path):
    torch.save({"model": weights(1), "step": 5}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert read_checkpoint(tmp_path / "old.pt").step == 5
    assert discover_checkpoints([tmp_path / "old.pt"])[0].step == 5  # no mmap for legacy files


# --------------------------------------------------------------------------- discovery and ordering


def test_steps_from_names_and_ordering(tmp_path):
    run = tmp_path / "run_a"
    run.mkdir()
    names = ["step_000100.pt", "ckpt_1000.pt", "epoch=3-step=1200.ckpt", "model-epoch10.pt",
             "val_loss=0.12-step=50.ckpt", "final.pt"]
    for name in names:
        # raw state_dicts: the step can only come from the name (final.pt differs, or it would
        # be listed as a copy of the last stepped checkpoint)
        torch.save(weights(5 if name == "final.pt" else 0), run / name)
    for junk in ["metrics.csv", "config.json", "train.log", "training_args.bin"]:
        (run / junk).write_text("x")
    hf_folder(run, 500)

    refs = discover_checkpoints([run])
    got = [(r.name, r.step, r.step_source) for r in refs]
    assert got == [
        ("model-epoch10.pt", 10, "epoch"),
        ("val_loss=0.12-step=50.ckpt", 50, "name"),
        ("step_000100.pt", 100, "name"),
        ("checkpoint-500", 500, "file"),
        ("ckpt_1000.pt", 1000, "name"),
        ("epoch=3-step=1200.ckpt", 1200, "name"),
        ("final.pt", None, None),
    ]
    assert {r.run for r in refs} == {"run_a"}
    assert refs[3].path == run / "checkpoint-500"


def test_step_inside_file_beats_name_and_integer_sort(tmp_path):
    torch.save({"state_dict": weights(), "step": 20}, tmp_path / "ckpt_999.pt")
    torch.save({"state_dict": weights(), "global_step": 3}, tmp_path / "ckpt_5.pt")
    save_file(weights(), tmp_path / "b.safetensors", metadata={"step": "100"})
    torch.save({"state_dict": weights(), "epoch": 1}, tmp_path / "step_7.pt")  # a named step beats an epoch
    refs = discover_checkpoints([tmp_path])
    assert [(r.name, r.step, r.step_source) for r in refs] == [
        ("ckpt_5.pt", 3, "file"), ("step_7.pt", 7, "name"), ("ckpt_999.pt", 20, "file"), ("b.safetensors", 100, "file"),
    ]


def test_equal_steps_fall_back_to_modification_time(tmp_path):
    for i, name in enumerate(["b.pt", "a.pt"]):
        torch.save(weights(), tmp_path / name)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert [r.name for r in discover_checkpoints([tmp_path])] == ["b.pt", "a.pt"]


def test_corrupt_files_are_listed_and_fail_at_load(tmp_path):
    torch.save(weights(), tmp_path / "step_000100.pt")
    good = (tmp_path / "step_000100.pt").read_bytes()
    (tmp_path / "step_000300.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "step_000200.pt").write_bytes(os.urandom(300))
    (tmp_path / "step_000400.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")

    refs = discover_checkpoints([tmp_path])
    assert [(r.name, r.step) for r in refs] == [
        ("step_000100.pt", 100), ("step_000200.pt", 200), ("step_000300.pt", 300), ("step_000400.safetensors", 400),
    ]
    for ref in refs[1:]:
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(ref.path)
        assert err.value.status == "corrupt"
        message = str(err.value)
        assert message.startswith(f"{ref.name}: not a readable checkpoint (truncated or corrupt: ")
        assert "\n" not in message and len(message) < 200


def test_truncated_message_is_short_and_specific(tmp_path):
    torch.save(weights(), tmp_path / "step_000300.pt")
    data = (tmp_path / "step_000300.pt").read_bytes()
    (tmp_path / "step_000300.pt").write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt: truncated zip archive") as err:
        read_checkpoint(tmp_path / "step_000300.pt")
    assert "internal miniz" not in str(err.value)  # torch's advice paragraphs are dropped


def test_last_ckpt_duplicates_are_listed_once(tmp_path):
    state = weights()
    torch.save(lightning_dict(state, step=1200), tmp_path / "epoch=3-step=1200.ckpt")
    shutil.copyfile(tmp_path / "epoch=3-step=1200.ckpt", tmp_path / "last.ckpt")
    assert [r.name for r in discover_checkpoints([tmp_path])] == ["epoch=3-step=1200.ckpt"]

    # Lightning re-saves last.ckpt with other callback state: same step and tensors, other bytes.
    torch.save(lightning_dict(state, step=1200, callbacks={"best": "x"}), tmp_path / "last.ckpt")
    assert [r.name for r in discover_checkpoints([tmp_path])] == ["epoch=3-step=1200.ckpt"]

    # A symlinked last.ckpt (save_last="link") must not displace its target either.
    (tmp_path / "last.ckpt").unlink()
    (tmp_path / "last.ckpt").symlink_to(tmp_path / "epoch=3-step=1200.ckpt")
    assert [r.name for r in discover_checkpoints([tmp_path])] == ["epoch=3-step=1200.ckpt"]

    # A last.ckpt that is genuinely newer stays.
    (tmp_path / "last.ckpt").unlink()
    torch.save(lightning_dict(weights(9), step=1500), tmp_path / "last.pt")
    assert [(r.name, r.step) for r in discover_checkpoints([tmp_path])] == [
        ("epoch=3-step=1200.ckpt", 1200), ("last.pt", 1500),
    ]


def test_files_folders_globs_and_multiple_runs(tmp_path):
    for run in ["run_b", "run_a"]:
        (tmp_path / run).mkdir()
        for step in (20, 10):
            torch.save(weights(), tmp_path / run / f"step_{step}.pt")
    hf = hf_folder(tmp_path / "hf_run", 500)

    one = discover_checkpoints([tmp_path / "run_a" / "step_10.pt"])
    assert [(r.name, r.run, r.step) for r in one] == [("step_10.pt", "run_a", 10)]
    assert [(r.name, r.run) for r in discover_checkpoints([hf])] == [("checkpoint-500", "hf_run")]

    # Runs keep argument order; within a run, step order; a file reached twice is listed once.
    refs = discover_checkpoints([tmp_path / "run_b", tmp_path / "run_a", tmp_path / "run_b" / "step_10.pt"])
    assert [(r.run, r.step) for r in refs] == [("run_b", 10), ("run_b", 20), ("run_a", 10), ("run_a", 20)]

    refs = discover_checkpoints([str(tmp_path / "run_*" / "step_*.pt")])
    assert [(r.run, r.step) for r in refs] == [("run_a", 10), ("run_a", 20), ("run_b", 10), ("run_b", 20)]


def test_hf_output_dir_is_a_run(tmp_path):
    out = tmp_path / "out"
    hf_folder(out, 1000, seed=1)
    hf_folder(out, 500, seed=2)
    save_file(weights(3), out / "model.safetensors")  # a final model unlike any checkpoint
    torch.save({}, out / "training_args.bin")
    refs = discover_checkpoints([out])
    assert [(r.name, r.step) for r in refs] == [("checkpoint-500", 500), ("checkpoint-1000", 1000),
                                                 ("model.safetensors", None)]
    # save_model() after the last step writes the same weights: listed once, as that step.
    save_file(weights(1), out / "model.safetensors")
    refs = discover_checkpoints([out])
    assert [(r.name, r.step, r.aliases) for r in refs] == [
        ("checkpoint-500", 500, ()), ("checkpoint-1000", 1000, ("model.safetensors",))]


@pytest.mark.parametrize("arg, match", [
    ("missing.pt", "no such file or directory"),
    ("empty_run", "no checkpoints found"),
    ("run_*/nothing_*.pt", "no checkpoints found"),
    ("nested", r"subfolders are not searched: pass .*nested[/\\]seed_0"),
])
def test_not_found(tmp_path, arg, match):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "notes.txt").write_text("x")
    (tmp_path / "nested" / "seed_0").mkdir(parents=True)  # (a `checkpoints/` subfolder is searched)
    torch.save(weights(), tmp_path / "nested" / "seed_0" / "a.ckpt")
    with pytest.raises(CheckpointError, match=match) as err:
        discover_checkpoints([str(tmp_path / arg)])
    assert err.value.status == "not_found"


# --------------------------------------------------------------------------- safety


def _pickle_calls(path: Path) -> set[str]:
    """Globals a torch.save file's pickle imports and calls (GLOBAL/STACK_GLOBAL then REDUCE)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    calls, strings, last_global = set(), [], None
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            last_global = arg.replace(" ", ".")
        elif op.name == "STACK_GLOBAL":
            last_global = ".".join(strings[-2:])
        elif op.name == "REDUCE" and last_global is not None:
            calls.add(last_global)
    return calls


def _malicious(path: Path, marker: Path, func=_write_marker) -> None:
    arg = f"touch {marker}" if func is os.system else str(marker)
    torch.save({"model": weights(), "payload": _Evil(func, arg)}, path)


@pytest.mark.parametrize("func, shown", [(os.system, "os.system"), (_write_marker, "_write_marker")])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, func, shown):
    if func is os.system and os.name != "posix":
        pytest.skip("needs a shell with `touch`")
    # The fixture really is malicious: its pickle calls the function on load (read from the
    # opcodes, without unpickling anything).
    _malicious(tmp_path / "proof.pt", tmp_path / "proof", func)
    assert any(name.endswith(func.__name__) for name in _pickle_calls(tmp_path / "proof.pt"))

    marker = tmp_path / "marker"
    _malicious(tmp_path / "step_100.pt", marker, func)
    refs = discover_checkpoints([tmp_path / "step_100.pt"])  # discovery peeks inside too
    assert refs[0].step == 100
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "step_100.pt")
    with pytest.raises(CheckpointError):
        describe_checkpoint(tmp_path / "step_100.pt")
    assert not marker.exists()
    assert err.value.status == "unsafe_pickle"
    message = str(err.value)
    assert f"the pickle needs `{shown}" in message.replace("test_checkpoints.", "")
    assert "never executes pickled code" in message and "\n" not in message


def test_whole_pickled_model_is_refused_with_its_class(tmp_path):
    torch.save(tiny_model(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"needs `torch\.nn\.modules\.container\.Sequential`") as err:
        read_checkpoint(tmp_path / "model.pt")
    assert err.value.status == "unsafe_pickle"


def test_plain_pickle_file_is_not_loaded(tmp_path):
    with open(tmp_path / "w.pt", "wb") as f:
        pickle.dump(dict(weights()), f, protocol=4)
    with pytest.raises(CheckpointError, match="unsupported pickle opcode") as err:
        read_checkpoint(tmp_path / "w.pt")
    assert err.value.status == "corrupt"


@pytest.mark.parametrize("obj, match", [
    ({"optimizer": {"state": {}}, "step": 3}, r"no model weights found \(top-level keys: \['optimizer', 'step'\]\)"),
    ({}, "contains no tensors"),
    (torch.ones(3), "holds a Tensor, not a dict"),
])
def test_no_weights(tmp_path, obj, match):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint(tmp_path / "x.pt")
    assert err.value.status == "no_weights"


def test_empty_hf_folder_has_no_weights(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    assert discover_checkpoints([tmp_path])[0].step == 3
    with pytest.raises(CheckpointError, match="checkpoint-3: no model weights inside") as err:
        read_checkpoint(tmp_path / "checkpoint-3")
    assert err.value.status == "no_weights"


def test_corrupt_file_in_hf_folder_names_the_folder(tmp_path):
    folder = hf_folder(tmp_path, 7)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"^checkpoint-7/model\.safetensors: not a readable") as err:
        read_checkpoint(folder)
    assert err.value.status == "corrupt"


# --------------------------------------------------------------------------- key matching


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = {k: v for k, v in weights().items() if k != "2.bias"}
    state["foo.bar"] = torch.zeros(1)
    torch.save({"model": prefixed(state, "module.")}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError) as err:
        load_into_model(tiny_model(), read_checkpoint(tmp_path / "x.pt"))
    assert err.value.status == "key_mismatch"
    assert str(err.value) == (
        "keys do not match the model: missing ['2.bias']; unexpected ['foo.bar'] (after stripping 'module.')"
    )


def test_long_key_lists_are_truncated(tmp_path):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    torch.save({f"other.{i}": torch.zeros(1) for i in range(5)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError) as err:
        load_into_model(model, read_checkpoint(tmp_path / "x.pt"))
    assert "missing ['0.weight', '0.bias', '1.weight', ... +5 more]" in str(err.value)
    assert "unexpected ['other.0', 'other.1', 'other.2', ... +2 more]" in str(err.value)


def test_shape_mismatch_is_named(tmp_path):
    torch.save(weights(), tmp_path / "x.pt")
    model = tiny_model(hidden=8)
    with pytest.raises(CheckpointError) as err:
        load_into_model(model, read_checkpoint(tmp_path / "x.pt"))
    assert err.value.status == "key_mismatch"
    assert str(err.value) == "shape mismatch for '0.weight': checkpoint (4, 3) vs model (8, 3) (+2 more)"


# --------------------------------------------------------------------------- inspect


def test_describe_checkpoint(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    torch.save({"state_dict": prefixed(model.state_dict(), "module."), "step": 12}, tmp_path / "x.pt")
    info = describe_checkpoint(tmp_path / "x.pt")
    assert info == {
        "path": str(tmp_path / "x.pt"),
        "format": "training_dict",
        "step": 12,
        "step_source": "file",
        "epoch": None,
        "weights": "raw",
        "weights_source": "state_dict",
        "weight_sets": ["raw"],
        "ema_file": None,
        "n_tensors": 7,
        "n_parameters": 3 * 4 + 4 + 4 * 4,  # linear + BN weight/bias/mean/var; num_batches_tracked is int
        "prefix": "module.",
        "dtypes": {"float32": 6, "int64": 1},
    }
    torch.save(lightning_dict(weights(), step=1), tmp_path / "l.ckpt")
    assert describe_checkpoint(tmp_path / "l.ckpt")["prefix"] == "model."
    torch.save(weights(), tmp_path / "raw.pt")
    assert describe_checkpoint(tmp_path / "raw.pt")["prefix"] is None

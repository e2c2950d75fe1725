"""The Hugging Face callback: a tiny real ``transformers.Trainer`` run, checked against ``equiaudit audit``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.errors import ConfigError
from equiaudit.hf import EquivarianceTrainerCallback
from train_helpers import build_mlp, summary_by_step, training_data, write_mlp_config

EVERY, STEPS, AUDITED = 10, 30, [10, 20, 30]


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.pos, self.target = training_data()

    def __len__(self):
        return len(self.pos)

    def __getitem__(self, i):
        return {"pos": self.pos[i], "target": self.target[i]}


def train(root, callback, *, attach: bool = True, report_to=("tensorboard",), **extra) -> Trainer:
    args = TrainingArguments(output_dir=str(root / "hf_run"), max_steps=STEPS, save_steps=EVERY, save_strategy="steps",
                             logging_steps=7, learning_rate=0.05, per_device_train_batch_size=8, use_cpu=True,
                             report_to=list(report_to), disable_tqdm=True,
                             label_names=["target"], seed=0, **extra)
    trainer = Trainer(model=build_mlp(root), args=args, train_dataset=Pairs(), eval_dataset=Pairs(),
                      callbacks=None if attach else [callback])
    if attach:
        callback.attach(trainer)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    config = write_mlp_config(root)
    callback = EquivarianceTrainerCallback(None, every_n_steps=EVERY, config=config, out=root / "cb_out")
    trainer = train(root, callback)
    result = CliRunner().invoke(app, ["audit", str(config), str(root / "hf_run"), "--out", str(root / "cli_out"), "--no-plot"])
    assert result.exit_code == 0, result.output
    return {"root": root, "trainer": trainer, "callback": callback, "cli": summary_by_step(root / "cli_out" / "summary.csv")}


def test_log_history_at_the_steps_equals_the_cli_of_each_checkpoint(hf_run):
    history = [e for e in hf_run["trainer"].state.log_history if "equiaudit/rel_equiv_error" in e]
    assert [e["step"] for e in history] == AUDITED
    cli = hf_run["cli"]
    assert sorted(cli) == AUDITED  # checkpoint-10/20/30, steps from trainer_state.json
    for entry in history:
        for name in ("rel_equiv_error", "loss_aug", "loss_sym"):
            assert entry[f"equiaudit/{name}"] == pytest.approx(float(cli[entry["step"]][name]), rel=1e-9, abs=0)
    values = [e["equiaudit/rel_equiv_error"] for e in history]
    assert max(values) - min(values) > 1e-3 * max(values)
    # the checkpoint's own trainer_state.json carries it too
    state = json.loads((hf_run["root"] / "hf_run" / "checkpoint-30" / "trainer_state.json").read_text())
    assert any("equiaudit/out/rel_equiv_error" in e and e["step"] == 30 for e in state["log_history"])


def test_report_to_tensorboard_gets_the_figures_at_the_steps(hf_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # TensorBoardCallback writes into OUTPUT_DIR/runs/<date_host>/
    (event_file,) = (hf_run["root"] / "hf_run" / "runs").glob("*/events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"scalars": 0})
    events.Reload()
    # the integration files everything Trainer.log gets during training under train/ (rewrite_logs)
    points = {e.step: e.value for e in events.Scalars("train/equiaudit/rel_equiv_error")}
    assert sorted(points) == AUDITED
    for step in AUDITED:
        assert points[step] == pytest.approx(float(hf_run["cli"][step]["rel_equiv_error"]), rel=1e-6)


def test_out_rows_and_model_left_training(hf_run):
    rows = summary_by_step(hf_run["root"] / "cb_out" / "summary.csv")
    assert sorted(rows) == AUDITED and {rows[s]["weights"] for s in AUDITED} == {"raw"}
    assert rows[30]["config_hash"] == hf_run["cli"][30]["config_hash"]
    model = hf_run["trainer"].model
    assert model.training and all(p.grad is None for p in model.parameters())


def test_without_attach_the_figures_still_reach_log_history(tmp_path):
    config = write_mlp_config(tmp_path)
    callback = EquivarianceTrainerCallback(None, every_n_steps=15, config=config)
    trainer = train(tmp_path, callback, attach=False, report_to=())
    assert [e["step"] for e in trainer.state.log_history if "equiaudit/rel_equiv_error" in e] == [15, 30]


def test_bad_settings(tmp_path):
    config = write_mlp_config(tmp_path)
    with pytest.raises(ConfigError, match="nothing would be audited"):
        EquivarianceTrainerCallback(None, config=config)
    with pytest.raises(ConfigError, match="model.inputs names 'coords'"):
        train(tmp_path, EquivarianceTrainerCallback(None, EVERY, config=config, inputs=["coords"]), report_to=())

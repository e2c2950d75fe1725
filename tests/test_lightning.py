"""The Lightning callback: a real ``lightning.Trainer`` run, checked against ``equiaudit audit`` of its checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from typer.testing import CliRunner

import equiaudit
from equiaudit.cli.main import app
from equiaudit.errors import ConfigError
from equiaudit.lightning import EquivarianceCallback
from train_helpers import (
    build_mlp, metric_by_step, random_rotations, read_csv_rows, summary_by_step, training_data, write_mlp_config,
)

EVERY = 10
STEPS = 30
AUDITED = [10, 20, 30]


class Module(pl.LightningModule):
    """Trains ``self.net`` (the factory's VectorMLP) with random-rotation augmentation."""

    def __init__(self, net: torch.nn.Module, lr: float = 0.05):
        super().__init__()
        self.net = net
        self.lr = lr
        self.generator = torch.Generator().manual_seed(0)

    def training_step(self, batch, batch_idx):
        pos, target = batch
        rot = random_rotations(len(pos), self.generator)
        pos, target = pos @ rot.transpose(1, 2), target @ rot.transpose(1, 2)
        loss = (self.net(pos) - target).square().mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def fit(root: Path, callbacks: list, *, steps: int = STEPS, name: str = "run") -> tuple[Module, Path, Path]:
    """Train for ``steps`` steps with a CSVLogger and a checkpoint every EVERY steps; returns
    (module, metrics.csv, checkpoint dir)."""
    config = root / "cfg.yaml"
    pos, target = training_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pos, target), batch_size=8, shuffle=False)
    module = Module(build_mlp(root))
    logger = CSVLogger(root / "logs", name=name, version=0)
    ckpt_dir = root / "ckpt" / name
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=EVERY, save_top_k=-1)
    trainer = pl.Trainer(max_steps=steps, logger=logger, callbacks=[*callbacks, checkpoints], enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, log_every_n_steps=7,
                         num_sanity_val_steps=0, limit_val_batches=0)
    assert config.is_file()
    trainer.fit(module, loader)
    return module, Path(logger.log_dir) / "metrics.csv", ckpt_dir


def cli_audit(config: Path, checkpoints: Path, out: Path, *extra: str) -> dict[int, dict]:
    result = CliRunner().invoke(app, ["audit", str(config), str(checkpoints), "--out", str(out), "--no-plot", *extra])
    assert result.exit_code == 0, result.output
    return summary_by_step(out / "summary.csv")


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    """One training run with the callback (raw weights), its checkpoints and the CLI's audit of them."""
    root = tmp_path_factory.mktemp("lightning")
    config = write_mlp_config(root)
    callback = EquivarianceCallback(None, every_n_train_steps=EVERY, config=config, model="net", out=root / "cb_out",
                                    run="cb")
    # a checkpoint callback that keeps the most equivariant step, by the audit's figure
    best = ModelCheckpoint(dirpath=root / "best", monitor="equiaudit/rel_equiv_error", mode="min",
                           every_n_train_steps=EVERY, save_top_k=1, filename="{step}")
    module, metrics, ckpt_dir = fit(root, [callback, best])
    cli = cli_audit(config, ckpt_dir, root / "cli_out")
    return {"root": root, "config": config, "callback": callback, "module": module, "metrics": metrics, "cli": cli,
            "ckpt_dir": ckpt_dir, "best": best}


def test_logged_at_exactly_the_chosen_steps_and_equal_to_the_cli(raw_run):
    logged = metric_by_step(raw_run["metrics"], "equiaudit/rel_equiv_error")
    assert sorted(logged) == AUDITED
    cli = raw_run["cli"]
    assert sorted(cli) == AUDITED  # ModelCheckpoint's files, named and stamped with the same global_step
    for step in AUDITED:
        assert logged[step] == pytest.approx(float(cli[step]["rel_equiv_error"]), rel=1e-9, abs=0)
    # the trajectory moves: a test that compared constants would not notice a wrong step
    values = [logged[s] for s in AUDITED]
    assert max(values) - min(values) > 1e-3 * max(values)


def test_every_head_figure_is_logged_and_equals_the_cli(raw_run):
    rows = read_csv_rows(raw_run["metrics"])
    cli_heads = summary_by_step(raw_run["root"] / "cli_out" / "summary.csv", head="out")
    for step in AUDITED:
        row = next(r for r in rows if int(r["step"]) == step and r.get("equiaudit/out/rel_equiv_error"))
        for column in ("rel_equiv_error", "loss_aug", "loss_sym"):
            assert float(row[f"equiaudit/out/{column}"]) == pytest.approx(float(cli_heads[step][column]), rel=1e-9, abs=0)
            assert float(row[f"equiaudit/{column}"]) == pytest.approx(float(raw_run["cli"][step][column]), rel=1e-9, abs=0)


def test_out_folder_rows_are_the_summary_rows_and_say_raw(raw_run):
    rows = summary_by_step(raw_run["root"] / "cb_out" / "summary.csv")
    assert sorted(rows) == AUDITED
    cli = raw_run["cli"]
    for step in AUDITED:
        assert rows[step]["checkpoint"] == f"step={step}" and rows[step]["run"] == "cb"
        assert rows[step]["weights"] == "raw"
        assert rows[step]["config_hash"] == cli[step]["config_hash"]  # same settings as the CLI's
        assert float(rows[step]["rel_equiv_error"]) == pytest.approx(float(cli[step]["rel_equiv_error"]), rel=1e-9, abs=0)
    assert raw_run["callback"].weights_used == "raw"
    # compare reads the callback's folder like any audit output
    result = CliRunner().invoke(app, ["compare", str(raw_run["root"] / "cb_out"), "--out", str(raw_run["root"] / "cmp"),
                                      "--no-plot", "--format", "json"])
    assert result.exit_code == 0, result.output


def test_callback_metrics_and_hparams(raw_run):
    step, last = raw_run["callback"].results[-1]
    assert step == STEPS
    metrics = raw_run["module"].trainer.callback_metrics  # what ModelCheckpoint(monitor=...) reads
    assert float(metrics["equiaudit/rel_equiv_error"]) == last.total.rel_equiv_error
    assert float(metrics["equiaudit/out/loss_sym"]) == last.heads["out"].loss_sym
    logged = metric_by_step(raw_run["metrics"], "equiaudit/rel_equiv_error")
    best_step = min(logged, key=logged.get)
    assert float(raw_run["best"].best_model_score) == pytest.approx(logged[best_step], rel=1e-12)
    assert Path(raw_run["best"].best_model_path).name == f"step={best_step}.ckpt"
    hparams = (raw_run["metrics"].parent / "hparams.yaml").read_text()
    assert "equiaudit/weights: raw" in hparams


class Snapshot(Callback):
    """Records the module's state before (``after=None``) or checks it after the audit's callback."""

    def __init__(self, before: Snapshot | None = None):
        self.before = before
        self.state = None
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % EVERY:
            return
        state = {
            "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "grads": {k: None if p.grad is None else p.grad.clone() for k, p in pl_module.named_parameters()},
            "modes": [m.training for m in pl_module.modules()],
            "rng": torch.get_rng_state(),
        }
        if self.before is None:
            self.state = state
            return
        old = self.before.state
        assert state["modes"] == old["modes"] and all(state["modes"])
        for k in old["params"]:
            assert torch.equal(state["params"][k], old["params"][k])
        for k in old["grads"]:
            assert (state["grads"][k] is None) == (old["grads"][k] is None)
            if old["grads"][k] is not None:
                assert torch.equal(state["grads"][k], old["grads"][k])
        assert torch.equal(state["rng"], old["rng"])
        self.checked += 1


def test_module_back_in_train_mode_unchanged_without_grads(tmp_path):
    config = write_mlp_config(tmp_path)
    callback = EquivarianceCallback(None, every_n_train_steps=EVERY, config=config, model="net")
    before = Snapshot()
    after = Snapshot(before)
    fit(tmp_path, [before, callback, after], steps=20)
    assert after.checked == 2 and len(callback.results) == 2


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    root = tmp_path_factory.mktemp("lightning_ema")
    config = write_mlp_config(root)
    ema = EMAWeightAveraging(decay=0.8)
    callback = EquivarianceCallback(None, every_n_train_steps=EVERY, config=config, model="net", out=root / "cb_out")
    module, metrics, ckpt_dir = fit(root, [ema, callback], name="ema")
    return {"root": root, "config": config, "callback": callback, "module": module, "metrics": metrics,
            "ckpt_dir": ckpt_dir}


def test_ema_run_audits_the_averaged_weights(ema_run):
    root, callback = ema_run["root"], ema_run["callback"]
    logged = metric_by_step(ema_run["metrics"], "equiaudit/rel_equiv_error")
    assert sorted(logged) == AUDITED and callback.weights_used == "ema"
    # Lightning's checkpoint holds the average as state_dict (what the CLI reads) and the raw
    # weights as current_model_state: the logged value is the CLI's audit of the average.
    cli = cli_audit(ema_run["config"], ema_run["ckpt_dir"], root / "cli_out")
    auditor = equiaudit.Auditor(config=ema_run["config"])
    for step in AUDITED:
        assert logged[step] == pytest.approx(float(cli[step]["rel_equiv_error"]), rel=1e-9, abs=0)
        checkpoint = torch.load(next(ema_run["ckpt_dir"].glob(f"*step={step}.ckpt")), weights_only=True)
        raw_model = build_mlp(root)
        raw_model.load_state_dict({k.removeprefix("net."): v for k, v in checkpoint["current_model_state"].items()})
        raw = auditor(raw_model).total.rel_equiv_error
        assert not math.isclose(raw, logged[step], rel_tol=1e-6)  # the raw weights read differently
    # after fit, Lightning copies the average into the module: auditing it directly agrees
    final = auditor(ema_run["module"].net).total.rel_equiv_error
    assert logged[STEPS] == pytest.approx(final, rel=1e-9, abs=0)
    rows = summary_by_step(root / "cb_out" / "summary.csv")
    assert {rows[s]["weights"] for s in AUDITED} == {"ema"}
    assert "equiaudit/weights: ema" in (ema_run["metrics"].parent / "hparams.yaml").read_text()


def test_weights_raw_ignores_the_average_and_ema_needs_one(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    config = write_mlp_config(tmp_path)
    callback = EquivarianceCallback(None, every_n_train_steps=EVERY, config=config, model="net", weights="raw")
    fit(tmp_path, [EMAWeightAveraging(decay=0.8), callback], steps=EVERY, name="raw")
    step, result = callback.results[-1]
    checkpoint = torch.load(next((tmp_path / "ckpt" / "raw").glob(f"*step={step}.ckpt")), weights_only=True)
    raw_model = build_mlp(tmp_path)
    raw_model.load_state_dict({k.removeprefix("net."): v for k, v in checkpoint["current_model_state"].items()})
    assert result.weights == "raw"
    assert result.total.rel_equiv_error == pytest.approx(equiaudit.audit(raw_model, config=config).total.rel_equiv_error,
                                                         rel=1e-9, abs=0)
    with pytest.raises(ConfigError, match="no WeightAveraging callback"):
        fit(tmp_path / "x", [EquivarianceCallback(None, EVERY, config=write_mlp_config(tmp_path / "x"), model="net",
                                                  weights="ema")], steps=1)


def test_averaging_after_the_callback_is_refused(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    config = write_mlp_config(tmp_path)
    callback = EquivarianceCallback(None, every_n_train_steps=EVERY, config=config, model="net")
    with pytest.raises(ConfigError, match="before EquivarianceCallback"):
        fit(tmp_path, [callback, EMAWeightAveraging()], steps=1)


def test_bad_settings_fail_when_made_or_at_setup(tmp_path):
    config = write_mlp_config(tmp_path)
    with pytest.raises(ConfigError, match="every_n_train_steps"):
        EquivarianceCallback(None, 0, config=config)
    with pytest.raises(ConfigError, match="nothing would be audited"):
        EquivarianceCallback(None, config=config)
    with pytest.raises(ConfigError, match="unknown keyword"):
        EquivarianceCallback(None, EVERY, config=config, rotation=8)
    with pytest.raises(ConfigError, match="has no attribute 'nett'"):
        fit(tmp_path, [EquivarianceCallback(None, EVERY, config=config, model="nett")], steps=1)
    with pytest.raises(ConfigError, match="model.inputs names 'coords'"):
        fit(tmp_path, [EquivarianceCallback(None, EVERY, config=config, model="net", inputs=["coords"])], steps=1)


def test_in_memory_data_and_validation_hook(tmp_path):
    """Data as a mapping with keyword settings, audits after validation only; equals equiaudit.audit()."""
    import numpy as np

    write_mlp_config(tmp_path)  # models.py and data.npz
    data = dict(np.load(tmp_path / "data.npz"))
    settings = dict(task="custom", fields={"pos": "vector"}, heads={"out": {"rep": "vector", "target": "target"}},
                    inputs=["pos"], outputs=["out"], rotations=8, bootstrap=50, seed=5)
    callback = EquivarianceCallback(data, on_validation_end=True, model=lambda m: m.net, **settings)

    class WithValidation(Module):
        def validation_step(self, batch, batch_idx):
            pos, target = batch
            self.log("val_loss", (self.net(pos) - target).square().mean())

    pos, target = training_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pos, target), batch_size=8)
    module = WithValidation(build_mlp(tmp_path))
    logger = CSVLogger(tmp_path / "logs", name="val", version=0)
    trainer = pl.Trainer(max_steps=16, logger=logger, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                         val_check_interval=8, limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(module, loader, loader)
    assert [s for s, _ in callback.results] == [8, 16]  # not the sanity check at step 0
    logged = metric_by_step(Path(logger.log_dir) / "metrics.csv", "equiaudit/rel_equiv_error")
    assert sorted(logged) == [8, 16]
    expected = equiaudit.audit(module.net, data, **settings).total.rel_equiv_error
    assert logged[16] == pytest.approx(expected, rel=1e-9, abs=0)

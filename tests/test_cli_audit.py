"""End to end: `equiaudit audit` on a run directory holding checkpoints in several formats."""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.report.summary import SUMMARY_COLUMNS

MODELS = textwrap.dedent(
    '''
    import torch

    class DirectForceField(torch.nn.Module):
        """Non-equivariant: reads raw coordinates. `scale` shrinks the symmetry-breaking part."""

        def __init__(self, hidden=8):
            super().__init__()
            self.embed = torch.nn.Embedding(10, hidden)
            self.coords = torch.nn.Linear(3, hidden)
            self.energy = torch.nn.Linear(hidden, 1)
            self.forces = torch.nn.Linear(hidden, 3)

        def forward(self, pos, z, mask):
            h = torch.tanh(self.coords(pos) + self.embed(z))
            energy = (self.energy(h).squeeze(-1) * mask).sum(1)
            return {"energy": energy, "forces": self.forces(h) * mask[..., None]}

    class GradForceField(torch.nn.Module):
        """Forces = -dE/dpos. With `invariant`, E depends on distances only (exactly equivariant)."""

        def __init__(self, invariant=True):
            super().__init__()
            self.invariant = invariant
            self.weight = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5]))

        def forward(self, pos, z, mask):
            if not pos.requires_grad:
                pos.requires_grad_(True)
            if self.invariant:
                d = torch.cdist(pos, pos)
                energy = (torch.exp(-d) * mask[:, None] * mask[:, :, None]).sum((1, 2)) * self.weight.sum()
            else:
                energy = ((pos @ self.weight).sin() * mask).sum(1)
            forces = -torch.autograd.grad(energy.sum(), pos, create_graph=self.training)[0]
            return energy, forces

    class NaNModel(DirectForceField):
        def forward(self, pos, z, mask):
            out = super().forward(pos, z, mask)
            out["forces"] = out["forces"] * float("nan")
            return out

    def direct(hidden=8):
        torch.manual_seed(0)
        return DirectForceField(hidden)

    def grad(invariant=True):
        return GradForceField(invariant)

    def nan_model(hidden=8):
        return NaNModel(hidden)
    '''
)


class Evil:
    """Unpickling this would create a marker file; equiaudit must refuse it unexecuted."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_data(path: Path, n=24, atoms=6, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        nuclear_charges=np.array([6, 6, 8, 1, 1, 1]),
        coords=rng.normal(size=(n, atoms, 3)),
        energies=rng.normal(size=n),
        forces=rng.normal(size=(n, atoms, 3)),
    )


def _weights(scale: float) -> dict[str, torch.Tensor]:
    return {k: v * scale for k, v in _MODULE.direct().state_dict().items()}


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    global _MODULE
    (tmp_path / "models.py").write_text(MODELS)
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_models_for_cli", tmp_path / "models.py")
    _MODULE = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_MODULE)
    _write_data(tmp_path / "data.npz")
    (tmp_path / "config.yaml").write_text(
        textwrap.dedent(
            """
            task: force_field
            model: {factory: models.py:direct, kwargs: {hidden: 8}}
            checkpoints: {path: run}
            data: {path: data.npz, samples: 16}
            group: {name: so3, rotations: 8}
            bootstrap: 200
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _make_run(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    torch.save(_weights(1.0), run / "step_000000.pt")  # raw state_dict, step from name
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in _weights(0.5).items()}, "step": 10}, run / "ckpt_a.pt")
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in _weights(0.2).items()}, "global_step": 100, "epoch": 1,
         "pytorch-lightning_version": "2.4.0"},
        run / "epoch=1-step=100.ckpt",
    )
    save_file(_weights(0.05), run / "weights.safetensors", metadata={"step": "1000"})
    hf = run / "checkpoint-3000"
    hf.mkdir()
    save_file(_weights(0.01), hf / "model.safetensors")
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 3000}))
    return run


def _rows(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_audit_run_in_five_formats_orders_by_step(workspace):
    _make_run(workspace)
    result = CliRunner().invoke(app, ["audit", "config.yaml", "--out", "out"])
    assert result.exit_code == 0, result.output
    rows = _rows(workspace / "out")
    assert list(rows[0])[: len(SUMMARY_COLUMNS)] == list(SUMMARY_COLUMNS)
    totals = [r for r in rows if r["head"] == "total"]
    assert [r["step"] for r in totals] == ["0", "10", "100", "1000", "3000"]
    assert [r["checkpoint"] for r in totals] == ["step_000000.pt", "ckpt_a.pt", "epoch=1-step=100.ckpt",
                                                 "weights.safetensors", "checkpoint-3000"]
    assert {r["head"] for r in rows} == {"total", "energy", "forces"}
    assert all(r["status"] == "ok" and r["n_rotations"] == "8" and r["group"] == "so3" for r in rows)
    for r in rows:  # the contract's identity, row by row
        assert float(r["loss_aug"]) == pytest.approx(float(r["loss_sym"]) + float(r["equiv_error"]), rel=1e-9)
        assert float(r["rel_equiv_error_ci_low"]) <= float(r["rel_equiv_error"]) <= float(r["rel_equiv_error_ci_high"])
    forces = [float(r["rel_equiv_error"]) for r in rows if r["head"] == "forces"]
    assert forces[0] > forces[-1]  # the symmetry-breaking weights shrink over steps
    meta = json.loads((workspace / "out" / "run.json").read_text())
    assert meta["n_rotations"] == 8 and meta["torch_version"] == torch.__version__
    assert len(meta["checkpoints"]) == 5 and meta["config_hash"] == rows[0]["config_hash"]
    assert "step_000000.pt" in result.output


def test_same_numbers_on_rerun_and_for_every_checkpoint(workspace):
    _make_run(workspace)
    CliRunner().invoke(app, ["audit", "config.yaml", "--out", "a"])
    CliRunner().invoke(app, ["audit", "config.yaml", "--out", "b"])
    assert (workspace / "a" / "summary.csv").read_text().split("seconds")[0] == (workspace / "b" / "summary.csv").read_text().split("seconds")[0]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(_rows(workspace / "a")) == strip(_rows(workspace / "b"))


def test_bad_checkpoints_are_reported_and_the_rest_audited(workspace):
    run = _make_run(workspace)
    (run / "step_000500.pt").write_bytes(b"not a checkpoint")
    good = (run / "step_000000.pt").read_bytes()
    (run / "step_000600.pt").write_bytes(good[: len(good) // 2])  # truncated
    marker = workspace / "pwned"
    torch.save({"weights": Evil(marker)}, run / "step_000700.pt")
    torch.save({"0.weight": torch.zeros(2, 2)}, run / "step_000800.pt")  # keys do not match the model
    result = CliRunner().invoke(app, ["audit", "config.yaml", "--out", "out"])
    assert result.exit_code == 1
    assert not marker.exists()
    status = {r["checkpoint"]: r["status"] for r in _rows(workspace / "out") if r["head"] == "total"}
    assert status["step_000500.pt"] == "corrupt"
    assert status["step_000600.pt"] == "corrupt"
    assert status["step_000700.pt"] == "unsafe_pickle"
    assert status["step_000800.pt"] == "key_mismatch"
    assert sum(s == "ok" for s in status.values()) == 5
    failed = [r for r in _rows(workspace / "out") if r["status"] != "ok"]
    assert all(r["head"] == "total" and r["loss_aug"] == "" for r in failed)
    assert "os.system" in result.output and "missing" in result.output
    assert "Traceback" not in result.output


def test_nan_model_fails_its_checkpoint(workspace):
    _make_run(workspace)
    config = (workspace / "config.yaml").read_text().replace("models.py:direct", "models.py:nan_model")
    (workspace / "nan.yaml").write_text(config)
    result = CliRunner().invoke(app, ["audit", "nan.yaml", "run/step_000000.pt", "--out", "out"])
    assert result.exit_code == 1
    assert _rows(workspace / "out")[0]["status"] == "nan_output"
    assert "NaN" in result.output


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda c: c + "colour: blue\n", "unknown key 'colour'"),
        (lambda c: c.replace("rotations: 8", "rotations: 8, sampling_typo: 1"), "group.sampling_typo"),
        (lambda c: c.replace("name: so3", "name: so4"), "group.name='so4'"),
        (lambda c: c + "heads: {forces: {loss: hinge}}\n", "heads.forces.loss='hinge'"),
        (lambda c: c.replace("data.npz", "data.npz, keys: {pos: coordinates}"), "no key 'coordinates'"),
        (lambda c: c.replace("data.npz", "missing.npz"), "not found"),
        (lambda c: c.replace("models.py:direct", "models.py:nope"), "no callable 'nope'"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(workspace, edit, needle):
    _make_run(workspace)
    (workspace / "bad.yaml").write_text(edit((workspace / "config.yaml").read_text()))
    result = CliRunner().invoke(app, ["audit", "bad.yaml", "--out", "out"])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_bad_command_line_exit_2(workspace):
    result = CliRunner().invoke(app, ["audit", "config.yaml", "--rotations", "1", "--out", "out"])
    assert result.exit_code == 2 and "group.rotations=1" in result.output
    result = CliRunner().invoke(app, ["audit", "config.yaml", "nowhere/*.pt", "--out", "out"])
    assert result.exit_code == 2


@pytest.mark.parametrize("invariant,floor", [(True, True), (False, False)])
def test_autograd_forces(workspace, invariant, floor):
    run = workspace / "grad_run"
    run.mkdir()
    torch.save(_MODULE.grad(invariant).state_dict(), run / "step_1.pt")
    (workspace / "grad.yaml").write_text(
        textwrap.dedent(
            f"""
            task: force_field
            model: {{factory: models.py:grad, kwargs: {{invariant: {str(invariant).lower()}}}, grad: true, dtype: float64}}
            data: {{path: data.npz, samples: 8}}
            group: {{rotations: 4}}
            """
        )
    )
    result = CliRunner().invoke(app, ["audit", "grad.yaml", str(run), "--out", "out", "--format", "json"])
    assert result.exit_code == 0, result.output
    forces = next(r for r in _rows(workspace / "out") if r["head"] == "forces")
    if floor:
        assert abs(float(forces["rel_equiv_error"])) < 1e-10
    else:
        assert float(forces["rel_equiv_error"]) > 1e-3


def test_inspect(workspace):
    run = _make_run(workspace)
    result = CliRunner().invoke(app, ["inspect", str(run / "epoch=1-step=100.ckpt"), "--format", "json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "lightning" and info["step"] == 100 and info["prefix"] == "model."
    assert info["n_parameters"] == sum(v.numel() for v in _weights(1.0).values())

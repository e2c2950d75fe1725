"""`equiaudit init`: a starter config from what is found, which audits without edits."""

from __future__ import annotations

import csv

import yaml
from typer.testing import CliRunner

from equiaudit.cli.main import app
from run_helpers import make_run

runner = CliRunner()


def test_init_on_a_trained_demo_run_audits_without_edits(tmp_path):
    """A short `equiaudit train force_field` run: init recognises the zoo model from the
    checkpoint's layout, the heads and weights of its training loss, the data's fields;
    the config it writes is audited as written."""
    result = runner.invoke(app, ["train", "force_field", "--steps", "10", "-o", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    run_dir, data = tmp_path / "demo" / "force_field" / "run", tmp_path / "demo" / "data" / "lj13_test.npz"
    config = tmp_path / "audit.yaml"
    result = runner.invoke(app, ["init", str(run_dir), str(data), "-o", str(config)])
    assert result.exit_code == 0, result.output
    text = config.read_text()
    parsed = yaml.safe_load(text)
    assert parsed["model"]["factory"] == "equiaudit.zoo:transformer_force_field"
    assert parsed["task"] == "force_field" and parsed["heads"]["energy"]["weight"] == 0.1  # as the recipe trains
    assert "format training_dict, step 10" in text and "forces: (13, 3)" in text  # layout and fields, as comments
    assert "TODO" not in text
    # Audited as written (fewer samples and rotations from the command line, for time).
    result = runner.invoke(app, ["audit", str(config), "-o", str(tmp_path / "out"), "-n", "8", "-k", "12", "--no-plot"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "summary.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["head"] == "total"]
    assert [int(r["step"]) for r in rows] == [0, 10] and all(r["status"] == "ok" for r in rows)
    assert all(0 < float(r["rel_equiv_error"]) < 1 for r in rows)  # a transformer is not equivariant
    # A second init to the same file is refused unless --force.
    result = runner.invoke(app, ["init", str(run_dir), str(data), "-o", str(config)])
    assert result.exit_code == 2 and "--force" in result.output


def test_init_on_an_unknown_model_marks_the_factory_todo(tmp_path):
    """A network init cannot recognise: its layout is described and the factory left TODO;
    data fields decide the task and heads; the audit then names the placeholder."""
    run_dir = make_run(tmp_path, "aug", {0: 0.5, 10: 0.2})
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mol.npz", R=rng.normal(size=(4, 5, 3)), z=np.ones((4, 5), int), E=rng.normal(size=4),
             F=rng.normal(size=(4, 5, 3)))
    result = runner.invoke(app, ["init", str(run_dir), str(tmp_path / "mol.npz")])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "top-level modules: matrix" in text and "TODO" in text and "factory: path/to/models.py:build" in text
    assert "step 10" in text and "2 found" in text
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 2 and "CHECKPOINT" in result.output

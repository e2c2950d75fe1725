"""The first five minutes of a new user (issue 24): -h, switches, completion, --threads,
plain progress in a pipe, arguments in the wrong place, factory files beside each other,
`equiaudit.audit_checkpoints`, the head weights in the repr, `--wandb`."""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.errors import ConfigError
from run_helpers import TRAJECTORIES, make_run, write_config

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_short_help_and_switches_without_a_type():
    for command in (["-h"], ["audit", "-h"], ["init", "-h"], ["compare", "-h"]):
        result = runner.invoke(app, command, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output
    text = runner.invoke(app, ["audit", "-h"], env={"COLUMNS": "200"}).output
    force_line = next(line for line in text.splitlines() if "--force" in line)
    assert "<bool>" not in force_line and "Recompute" in force_line
    assert "<int>" in next(line for line in text.splitlines() if "--rotations" in line)  # valued options keep their type
    assert "sample_configs/" in text and "model.factory" in text and "equiaudit init" in text  # examples and keys
    assert "--threads" in text and "--wandb" in text


def test_shell_completion_is_offered():
    # In a process of its own: click's completion state is per process, and other tests' invocations
    # in this one changed what --show-completion parsed (seen once in the full suite).
    import os
    import subprocess
    import sys

    env = {**os.environ, "SHELL": "/bin/bash"}
    result = subprocess.run([sys.executable, "-m", "equiaudit", "--show-completion", "bash"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "_equiaudit_completion" in result.stdout.replace("-", "_").lower() or "complete" in result.stdout
    assert "--install-completion" in runner.invoke(app, ["-h"], env={"COLUMNS": "200"}).output


def test_a_directory_or_checkpoint_as_config_says_what_it_is(tmp_path):
    run_dir = make_run(tmp_path, "aug", {0: 0.5})
    result = runner.invoke(app, ["audit", str(run_dir)])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "is a directory" in line and "YAML audit config" in line and "equiaudit init" in line
    checkpoint = run_dir / "step_000000.pt"
    result = runner.invoke(app, ["audit", str(checkpoint)])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "is a checkpoint" in line and "not a YAML config" in line and "UnicodeDecodeError" not in line
    result = runner.invoke(app, ["audit", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output


def test_factory_file_imports_its_neighbour_and_says_what_was_searched(tmp_path, monkeypatch):
    from equiaudit.io.models import build_model

    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "mymodels_r24.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    (folder / "mymodels2_r24.py").write_text(
        "from mymodels_r24 import Net\n\ndef build(n=3):\n    return Net(n, n)\n")
    model = build_model(f"{folder / 'mymodels2_r24.py'}:build", {"n": 4})
    assert isinstance(model, torch.nn.Linear) and model.in_features == 4
    assert str(folder) not in sys.path  # the folder was on the path only while importing
    # A dotted module beside the config (not on sys.path, not the working directory):
    monkeypatch.chdir(tmp_path)
    model = build_model("mymodels2_r24:build", {}, base=folder)
    assert model.in_features == 3
    with pytest.raises(ConfigError) as err:
        build_model("no_such_module_r24:build", {}, base=folder)
    assert "searched" in str(err.value) and str(folder) in str(err.value) and str(tmp_path) in str(err.value)
    (folder / "broken_r24.py").write_text("import missing_neighbour_r24\ndef build():\n    pass\n")
    with pytest.raises(ConfigError) as err:
        build_model(f"{folder / 'broken_r24.py'}:build", {})
    assert "missing_neighbour_r24" in str(err.value) and "searched" in str(err.value)


def test_threads_named_in_the_banner_and_set(tmp_path):
    config = write_config(tmp_path, samples=8, rotations=4)
    run_dir = make_run(tmp_path, "aug", {0: 0.3})
    previous = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["audit", str(config), str(run_dir), "-o", str(tmp_path / "o"), "--threads", "1",
                                     "--no-plot", "--device", "cpu"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "1 CPU thread (--threads)" in " ".join(result.output.split())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    result = runner.invoke(app, ["audit", str(config), str(run_dir), "-o", str(tmp_path / "o2"), "--no-plot",
                                 "--device", "cpu"], env={"COLUMNS": "200"})
    assert f"{torch.get_num_threads()} CPU thread" in result.output and "torch's default" in " ".join(result.output.split())


def test_progress_is_plain_lines_when_piped(tmp_path, monkeypatch):
    """stdout/stderr not a terminal: progress as periodic plain lines (every update with
    EQUIAUDIT_PROGRESS_EVERY=0), never rich's cursor codes."""
    config = write_config(tmp_path, samples=16, rotations=4)
    run_dir = make_run(tmp_path, "aug", {0: 0.3, 10: 0.1})
    monkeypatch.setenv("EQUIAUDIT_PROGRESS_EVERY", "0")
    result = CliRunner().invoke(app, ["audit", str(config), str(run_dir), "-o", str(tmp_path / "o"),
                                                      "--no-plot", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[0m")]
    assert any("step_000010.pt" in line and "samples:" in line for line in lines), result.stderr
    assert "\x1b[" not in result.stderr  # no cursor movement or colour codes in a pipe
    monkeypatch.setenv("EQUIAUDIT_PROGRESS_EVERY", "3600")  # the default's kind: nothing within the first interval
    result = CliRunner().invoke(app, ["audit", str(config), str(run_dir), "-o", str(tmp_path / "o2"),
                                                      "--no-plot", "--device", "cpu"])
    assert result.exit_code == 0 and not [line for line in result.stderr.splitlines() if line.startswith("[0m")]


def test_audit_checkpoints_returns_the_cli_rows_and_the_known_answer(tmp_path):
    import equiaudit

    config = write_config(tmp_path, samples=16, rotations=8)
    steps = {0: 0.6, 100: 0.035}
    run_dir = make_run(tmp_path, "aug", steps)
    result = runner.invoke(app, ["audit", str(config), str(run_dir), "-o", str(tmp_path / "cli"), "--no-plot",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "cli" / "summary.csv") as handle:
        cli_rows = list(csv.DictReader(handle))
    results = equiaudit.audit_checkpoints(run_dir, config=config, device="cpu")
    assert [r.step for r in results] == sorted(steps)
    numeric = ("loss_aug", "loss_sym", "equiv_error", "rel_equiv_error", "rel_equiv_error_ci_low", "rel_equiv_error_ci_high")
    api_rows = results.rows()
    assert len(api_rows) == len(cli_rows)
    for api, cli in zip(api_rows, cli_rows):
        assert (api["step"], api["head"], api["checkpoint"]) == (int(cli["step"]), cli["head"], cli["checkpoint"])
        for column in numeric:
            assert float(api[column]) == float(cli[column]), column
    for r in results:  # the known answer of the linear map, within its interval's reach
        assert abs(r.total.rel_equiv_error - steps[r.step]) < 0.5 * steps[r.step]
    # model= given as a module: the weights are loaded into it, no torch.load by the user
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        models = importlib.import_module("models")
        again = equiaudit.audit_checkpoints([run_dir / "step_000100.pt"], tmp_path / "data.npz", model=models.build(),
                                            task="custom", fields={"pos": "vector"}, inputs=["pos"], outputs=["out"],
                                            heads={"out": {"rep": "vector", "target": "target"}}, rotations=8,
                                            bootstrap=50, device="cpu")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("models", None)
    assert len(again) == 1 and again[0].total.rel_equiv_error == results[1].total.rel_equiv_error


def test_repr_names_the_head_weights():
    import equiaudit
    from equiaudit.lj import LJ13, sample_clusters
    from equiaudit.zoo import transformer_force_field

    data = sample_clusters(8, LJ13, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = transformer_force_field(hidden=8, layers=1)
    text = repr(equiaudit.audit(model, data, task="force_field", rotations=12, seed=0, bootstrap=20))
    assert "total = 1·energy + 1·forces" in text
    heads = {"energy": {"rep": "scalar", "target": "energy", "weight": 0.1}, "forces": {"rep": "vector", "target": "forces"}}
    text = repr(equiaudit.audit(model, data, task="force_field", heads=heads, rotations=12, seed=0, bootstrap=20))
    assert "total = 0.1·energy + 1·forces" in text


def _wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """The history records of a W&B transaction log (``run-*.wandb``): LevelDB-log framing
    (32 KiB blocks, 7-byte headers: CRC, length, type) of ``wandb_internal_pb2.Record``s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    history: dict[int, dict[str, float]] = {}
    for raw in records:
        record = pb.Record.FromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
        history.setdefault(int(items.get("_step", record.history.step.num)), {}).update(items)
    return history


def test_wandb_offline_run_holds_ree_per_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    config = write_config(tmp_path, samples=16, rotations=8)
    steps = {0: 0.6, 10: 0.3, 100: 0.035}
    run_dir = make_run(tmp_path, "aug", steps)
    out = tmp_path / "out"
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["audit", str(config), str(run_dir), "-o", str(out), "--no-plot",
                                                      "--device", "cpu", "--wandb", "equiaudit-test"])
    assert result.exit_code == 0, result.output + result.stderr
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, result.stderr  # one W&B run per audit
    history = _wandb_history(run_files[0])
    with open(out / "summary.csv") as handle:
        totals = {int(r["step"]): float(r["rel_equiv_error"]) for r in csv.DictReader(handle) if r["head"] == "total"}
    logged = {step: values["equiaudit/rel_equiv_error"] for step, values in history.items()
              if "equiaudit/rel_equiv_error" in values}
    assert sorted(logged) == sorted(steps)
    for step, value in logged.items():
        assert math.isclose(value, totals[step], rel_tol=1e-12)
        assert abs(value - steps[step]) < 0.5 * steps[step]  # the known answer, as audited
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/equiaudit/summary_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert "rel_equiv_error" in table["columns"] and len(table["data"]) == 2 * len(steps)  # total and the head


def test_wandb_missing_is_one_line(tmp_path, monkeypatch):
    import builtins

    from equiaudit.report import wandb as wb

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"pip install 'equiaudit\[wandb\]'"):
        wb.require_wandb()


def test_cli_reference_is_generated_from_every_command():
    from equiaudit.cli.reference import cli_reference
    from typer.main import get_command

    text = cli_reference()
    group = get_command(app)
    for name, command in group.commands.items():
        assert f"## equiaudit {name}" in text
        for param in command.params:
            if param.name != "help" and param.param_type_name == "option":
                assert f"`{param.opts[0]}" in text
    assert "| `--force` | switch |" in text and "| `--threads` | int range |" in text

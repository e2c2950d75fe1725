"""Hostile files, second round (issue 20): merge and its manifests, config bounds, spreadsheet formulas.

Each test builds the hostile input itself and checks the issue's "correct" column: one line,
exit 2 (or the run goes on), nothing executed, nothing hung, good checkpoints still written.
The data readers' cases (HDF5, extxyz, PyG) are in test_data_faults_round2.py.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.errors import ConfigError
from equiaudit.io.config import MAX_BOOTSTRAP, MAX_ROTATION_ROWS, MAX_ROTATIONS, parse_config
from equiaudit.io.layout import csv_cell, csv_text, read_csv
from equiaudit.report.summary import write_rows
from run_helpers import make_run, save_checkpoint, write_config

FORMULA = ("=", "+", "-", "@", "\t", "\r")


def invoke(*args) -> object:
    return CliRunner().invoke(app, [*map(str, args)])


def one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def flat(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


# ------------------------------------------------------------------ 1-2. merge trusts nothing in OUT


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Two finished shards of a 2-checkpoint run (samples 4, rotations 2), split by samples."""
    root = tmp_path_factory.mktemp("r2shards")
    config = write_config(root, samples=4, rotations=2)
    config.write_text(config.read_text() + "batch_size: 2\n")
    run = make_run(root, "aug", {10: 0.3, 100: 0.05})
    out = root / "out"
    for part in ("1/2", "2/2"):
        result = invoke("audit", config, run, "--out", out, "--no-plot", "--device", "cpu", "--shard", part,
                        "--distribute", "samples")
        assert result.exit_code == 0, result.output
    return root, config, run, out


def _copy(out: Path, tmp_path: Path) -> Path:
    fresh = tmp_path / "out"
    shutil.copytree(out / "shards", fresh / "shards")
    return fresh


def _rewrite_settings(out: Path, edit) -> None:
    """What an attacker with write access to OUT does: edit every manifest's config, recompute
    the settings hash with equiaudit's own parser, and write it into the manifests and the parts."""
    manifests = sorted((out / "shards").glob("shard-*.json"))
    for path in manifests:
        data = json.loads(path.read_text())
        edit(data["config"])
        data["config_hash"] = parse_config(data["config"]).settings_hash()
        path.write_text(json.dumps(data))
    for part in (out / "shards").glob("*.pt"):
        state = torch.load(part, weights_only=True)
        meta = json.loads(state["meta"])
        meta["config_hash"] = data["config_hash"]
        state["meta"] = json.dumps(meta)
        torch.save(state, part)


def test_merge_never_runs_a_factory_written_into_a_manifest(sharded, tmp_path):
    root, config, run, out = sharded
    pwned = tmp_path / "PWNED"
    imported = tmp_path / "IMPORTED"
    fresh = _copy(out, tmp_path)
    # A factory file inside OUT whose import would run code, and os:system with kwargs.
    (fresh / "evil.py").write_text(f"open({str(imported)!r}, 'w').close()\ndef build():\n    return None\n")
    attacks = {
        "os": {"factory": "os:system", "kwargs": {"command": f"touch {pwned}"}},
        "file": {"factory": f"{fresh / 'evil.py'}:build", "inputs": ["pos"], "outputs": ["out"]},
    }
    for name, model in attacks.items():
        _rewrite_settings(fresh, lambda raw: raw.update(model=model))
        # Without the user's config: no model is built (the statistics are in the parts): written, nothing ran.
        (fresh / "summary.csv").unlink(missing_ok=True)
        merged = invoke("merge", fresh, "--no-plot")
        assert merged.exit_code == 0, merged.output
        assert len([r for r in read_csv(fresh / "summary.csv") if r["head"] == "total"]) == 2
        # With it: the manifest's model section differs from the user's: refused, naming manifest and field.
        refused = invoke("merge", fresh, "--no-plot", "--config", config)
        assert refused.exit_code == 2, refused.output
        line = flat(one_error_line(refused.output))
        assert "shard-1-of-2.json" in line and "field 'config.model'" in line, (name, line)
        # --dynamics needs the model: without the user's config merge refuses instead of building the manifest's.
        _rewrite_settings(fresh, lambda raw: raw.update(model=model, dynamics=True))
        needs = invoke("merge", fresh, "--no-plot")
        assert needs.exit_code == 2 and "--config CFG" in flat(needs.output), needs.output
        _rewrite_settings(fresh, lambda raw: raw.pop("dynamics"))
    assert not pwned.exists() and not imported.exists()


def _edited_manifest(out: Path, tmp_path: Path, edit) -> Path:
    fresh = _copy(out, tmp_path)
    path = fresh / "shards" / "shard-2-of-2.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return fresh


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(checkpoints=[{}, *d["checkpoints"][1:]]), "checkpoints[0].key"),
    (lambda d: d.update(n_batches="many"), "n_batches"),
    (lambda d: d.pop("config"), "config"),
    (lambda d: d.update(files=[7]), "files[0]"),
    (lambda d: d["checkpoints"][1].update(size="big"), "checkpoints[1].size"),
    (lambda d: d["checkpoints"][0].update(key="../../etc"), "checkpoints[0].key"),
    (lambda d: d.update(mode="both"), "mode"),
    (lambda d: d.update(shard=True), "shard"),
])
def test_a_malformed_manifest_is_one_line_naming_it_and_the_field(sharded, tmp_path, edit, field):
    _, _, _, out = sharded
    fresh = _edited_manifest(out, tmp_path, edit)
    result = invoke("merge", fresh, "--no-plot")
    assert result.exit_code == 2, result.output
    line = flat(one_error_line(result.output))
    assert "shard-2-of-2.json" in line and f"field '{field}'" in line, line
    assert not (fresh / "summary.csv").exists()


def test_a_malformed_part_file_is_named_with_its_field(sharded, tmp_path):
    _, _, _, out = sharded
    fresh = _copy(out, tmp_path)
    part = sorted((fresh / "shards").glob("*.pt"))[0]
    state = torch.load(part, weights_only=True)
    meta = json.loads(state["meta"])
    meta["batches"] = "all of them"
    state["meta"] = json.dumps(meta)
    torch.save(state, part)
    result = invoke("merge", fresh, "--no-plot")
    assert result.exit_code == 2, result.output
    line = flat(one_error_line(result.output))
    assert part.name in line and "field 'batches'" in line, line


# ------------------------------------------------------------------ 10-11. sizes refused up front


@pytest.mark.parametrize("extra, key, bound", [
    (("--rotations", "1000000000"), "group.rotations", MAX_ROTATIONS),
    ((), "bootstrap", MAX_BOOTSTRAP),
])
def test_huge_rotations_and_bootstrap_are_refused_with_their_bound(tmp_path, extra, key, bound):
    config = write_config(tmp_path, samples=4, rotations=2, bootstrap=1_000_000_000 if key == "bootstrap" else 50)
    run = make_run(tmp_path, "aug", {10: 0.3, 100: 0.05})
    start = time.perf_counter()
    result = invoke("audit", config, run, "--out", tmp_path / "out", "--no-plot", *extra)
    assert result.exit_code == 2, result.output
    assert time.perf_counter() - start < 30
    line = flat(one_error_line(result.output))
    assert key in line and f"{bound:,}" in line, line
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_every_size_bound_holds_at_its_value_and_refuses_one_more():
    base = {"model": {"factory": "m.py:build"}, "data": {"path": "d.npz"}}
    cases = {"group.rotations": MAX_ROTATIONS, "bootstrap": MAX_BOOTSTRAP, "dynamics.grid": 1_000,
             "dynamics.hessian": 1_000, "dynamics.max_iter": 10_000, "breakdown.bins": 10_000}
    for dotted, bound in cases.items():
        section, _, leaf = dotted.rpartition(".")
        for value, ok in ((bound, True), (bound + 1, False)):
            raw = json.loads(json.dumps(base))
            (raw.setdefault(section, {}) if section else raw)[leaf] = value
            if ok:
                parse_config(raw)
            else:
                with pytest.raises(ConfigError, match=f"{dotted}={value:,} is over its bound of {bound:,}"):
                    parse_config(raw)


def test_rotations_times_samples_is_refused_before_the_rotations_are_drawn(tmp_path):
    # 1001 samples × 100,000 rotations = 100.1 M (sample, rotation) pairs, 7.2 GB of rotations: over the bound.
    samples = MAX_ROTATION_ROWS // MAX_ROTATIONS + 1
    config = write_config(tmp_path, samples=samples, rotations=MAX_ROTATIONS)
    run = make_run(tmp_path, "aug", {10: 0.3})
    start = time.perf_counter()
    result = invoke("audit", config, run, "--out", tmp_path / "out", "--no-plot")
    assert result.exit_code == 2, result.output
    assert time.perf_counter() - start < 30
    line = flat(one_error_line(result.output))
    assert f"{samples:,} samples × {MAX_ROTATIONS:,} rotations" in line and f"{MAX_ROTATION_ROWS:,}" in line, line


# ------------------------------------------------------------------ 9. spreadsheet formulas in CSVs


def test_csv_cell_neutralises_text_a_spreadsheet_would_evaluate_and_no_number():
    for text in ("=HYPERLINK(\"http://x\")", "+cmd", "-cmd|' /C calc'!A0", "@SUM(1+1)", "\tx", "\rx", "-", "=", "'quoted", "''"):
        cell = csv_cell(text)
        assert cell.startswith("'") and csv_text(cell) == text
    for text in ("-0.5", "-1e-05", "-inf", "+3", "0.25", "step_000010.pt", "", "aug", "1,2"):
        assert csv_cell(text) == text and csv_text(text) == text


def test_written_rows_read_back_as_written(tmp_path):
    rows = [{"run": "=cmd|' -C calc'!A0", "checkpoint": "@SUM(1+1)_step_000100.pt", "value": -0.5, "=col": "-x"}]
    write_rows(tmp_path / "x.csv", rows, columns=("run", "checkpoint", "value"))
    with (tmp_path / "x.csv").open(newline="") as handle:
        cells = [cell for line in csv.reader(handle) for cell in line]
    assert not [c for c in cells if c.startswith(FORMULA) and c != "-0.5"], cells
    assert "-0.5" in cells
    assert read_csv(tmp_path / "x.csv") == [{"run": rows[0]["run"], "checkpoint": rows[0]["checkpoint"], "value": "-0.5",
                                             "=col": "-x"}]


def test_formula_names_are_neutralised_in_every_csv_and_kept_in_json_and_html(tmp_path):
    config = write_config(tmp_path, samples=4, rotations=2, bootstrap=20)
    run = tmp_path / "runs" / "=cmd|' -C calc'!A0"
    names = {10: "=HYPERLINK(\"evil\")_step_000010.pt", 100: "@SUM(1+1)_step_000100.pt", 1000: "+cmd_step_001000.pt"}
    for step, name in names.items():
        save_checkpoint(run, step, {10: 0.3, 100: 0.05, 1000: 0.01}[step]).rename(run / name)
    out = tmp_path / "out"
    result = invoke("audit", config, run, "--out", out, "--no-plot")
    assert result.exit_code == 0, result.output
    compared = invoke("compare", out, "--out", tmp_path / "cmp", "--no-plot")
    assert compared.exit_code == 0, compared.output
    csvs = [out / "summary.csv", out / "breakdown.csv", tmp_path / "cmp" / "compare.csv"]
    seen = 0
    for path in csvs:
        if not path.exists():
            continue
        seen += 1
        text = path.read_text()
        for row in csv.reader(io.StringIO(text)):
            for cell in row:
                if cell.startswith(FORMULA):
                    float(cell)  # only numbers (e.g. -0.5) may start so
    assert seen >= 2
    # Read back (the cache's rerun, compare): the real names, one row per checkpoint, nothing doubled.
    again = invoke("audit", config, run, "--out", out, "--no-plot")
    assert again.exit_code == 0, again.output
    totals = [r for r in read_csv(out / "summary.csv") if r["head"] == "total"]
    assert sorted(r["checkpoint"] for r in totals) == sorted(names.values())
    assert {r["run"] for r in totals} == {run.name}
    with (out / "summary.csv").open(newline="") as handle:
        assert {r["run"] for r in csv.DictReader(handle)} == {"'" + run.name}  # what a spreadsheet opens
    meta = json.loads((out / "run.json").read_text())
    assert names[100] in json.dumps(meta, ensure_ascii=False)
    html = (out / "report.html").read_text()
    assert "@SUM(1+1)_step_000100.pt" in html and "'@SUM" not in html

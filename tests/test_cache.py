"""Incremental auditing: the result cache, a growing run, --force, and an audit killed half-way."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from equiaudit import runner as runner_module
from equiaudit.cli.main import app
from equiaudit.io.cache import CachedResult, ResultCache, settings_identity, stamp
from equiaudit.io.checkpoints import CheckpointRef, discover_checkpoints
from equiaudit.io.config import load_config
from equiaudit.io.layout import OutputFolder
from equiaudit.runner import Runner, open_audit
from run_helpers import T0, checkpoint_bytes, make_run, save_checkpoint, write_config

STEPS = {10: 0.3, 100: 0.05, 1000: 0.01}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("cache"))


CACHE_FILE = OutputFolder.CACHE


@pytest.fixture(scope="module")
def plan(config_path):
    return open_audit(load_config(config_path), device="cpu")


def audit(plan, run_dir: Path, out: Path, **kwargs):
    with Runner(plan, out, **kwargs) as runner:
        return runner.run(discover_checkpoints([run_dir]))


def lines_by_checkpoint(summary: Path) -> dict[str, list[str]]:
    header, *lines = summary.read_text().splitlines()
    found: dict[str, list[str]] = {}
    for line in lines:
        found.setdefault(line.split(",")[1], []).append(line)
    return found


# ------------------------------------------------------------------ the store

def test_cache_round_trip_and_key(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", 5, 0.1)
    ref = CheckpointRef(ckpt, ckpt.name, "run", 5)
    rows = [{"run": "run", "checkpoint": ckpt.name, "step": 5, "rel_equiv_error": 0.1 + 1e-17, "message": None}]
    with ResultCache(tmp_path / CACHE_FILE, {"config_hash": "abc"}) as cache:
        key = cache.key(ref, stamp(ckpt))
        assert cache.get(key) is None
        breakdown = [{"run": "run", "checkpoint": ckpt.name, "by": "angle", "bin": "[0, 30)", "rel_equiv_error": 0.2}]
        cache.put(key, ref, rows, breakdown, '{"by": []}')
        assert cache.get(key) == CachedResult(rows, breakdown, '{"by": []}') and len(cache) == 1
    with ResultCache(tmp_path / CACHE_FILE, {"config_hash": "abc"}) as cache:  # persisted
        assert cache.get(key).rows == rows
        os.utime(ckpt, (T0, T0 + 1))  # touched: a different checkpoint identity
        assert cache.key(ref, stamp(ckpt)) != key
    with ResultCache(tmp_path / CACHE_FILE, {"config_hash": "other"}) as cache:  # other settings
        assert cache.key(ref, stamp(ckpt)) != key


def test_unreadable_cache_file_starts_afresh(tmp_path):
    (tmp_path / CACHE_FILE).write_text("not a database")
    with ResultCache(tmp_path / CACHE_FILE, {"config_hash": "abc"}) as cache:
        assert len(cache) == 0


def test_settings_change_the_key(config_path, tmp_path):
    """K, samples and seed overrides all land in the config hash, hence in the key."""
    ckpt = save_checkpoint(tmp_path / "run", 5, 0.1)
    ref = CheckpointRef(ckpt, ckpt.name, "run", 5)
    keys = set()
    for overrides in ({}, {"group.rotations": 4}, {"data.samples": 8}, {"seed": 1}):
        with ResultCache(tmp_path / CACHE_FILE, settings_identity(load_config(config_path, overrides))) as cache:
            keys.add(cache.key(ref, stamp(ckpt)))
    assert len(keys) == 4


# ------------------------------------------------------------------ growing and resumed runs

def test_growing_run_audits_only_new_checkpoints(plan, tmp_path):
    run_dir = make_run(tmp_path, "grow", STEPS)
    out = tmp_path / "out"
    results, _ = audit(plan, run_dir, out)
    assert len(results) == 3
    before = lines_by_checkpoint(out / "summary.csv")

    save_checkpoint(run_dir, 5000, 0.005)
    results, rows = audit(plan, run_dir, out)
    assert [r.checkpoint for r in results] == ["step_005000.pt"]  # only the new one evaluated
    assert {row["checkpoint"] for row in rows} == {f"step_{s:06d}.pt" for s in (*STEPS, 5000)}
    after = lines_by_checkpoint(out / "summary.csv")
    assert set(after) - set(before) == {"step_005000.pt"}
    assert {k: after[k] for k in before} == before  # earlier rows byte-identical

    results, _ = audit(plan, run_dir, out)
    assert results == []
    results, _ = audit(plan, run_dir, out, force=True)
    assert len(results) == 4


def test_failures_are_not_cached(plan, tmp_path):
    run_dir = make_run(tmp_path, "bad", {10: 0.3})
    (run_dir / "step_000020.pt").write_bytes(b"garbage")
    out = tmp_path / "out"
    results, _ = audit(plan, run_dir, out)
    assert [r.status for r in results] == ["ok", "corrupt"]
    save_checkpoint(run_dir, 20, 0.1)  # repaired
    results, _ = audit(plan, run_dir, out)
    assert [(r.checkpoint, r.status) for r in results] == [("step_000020.pt", "ok")]


def test_interrupted_audit_resumes(plan, tmp_path, monkeypatch):
    run_dir = make_run(tmp_path, "ctrlc", {**STEPS, 5000: 0.005})
    out = tmp_path / "out"
    real, calls = runner_module.audit_checkpoint, []

    def interrupted_at_third(plan, ref, **kwargs):
        calls.append(ref.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(plan, ref, **kwargs)

    monkeypatch.setattr(runner_module, "audit_checkpoint", interrupted_at_third)
    with pytest.raises(KeyboardInterrupt):
        audit(plan, run_dir, out)
    monkeypatch.setattr(runner_module, "audit_checkpoint", real)
    assert set(lines_by_checkpoint(out / "summary.csv")) == {"step_000010.pt", "step_000100.pt"}
    results, _ = audit(plan, run_dir, out)
    assert [r.checkpoint for r in results] == ["step_001000.pt", "step_005000.pt"]


def test_sigkilled_audit_resumes(config_path, plan, tmp_path):
    """A real SIGKILL in the middle of a checkpoint: the cache stays sound and the rest resumes."""
    run_dir = make_run(tmp_path, "killed", STEPS)
    save_checkpoint(run_dir, 5000, 0.005, kill=True)  # its forward pass kills the process
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "equiaudit.cli.main", "audit", str(config_path), str(run_dir), "--out", str(out), "--no-plot"]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    db = sqlite3.connect(out / CACHE_FILE)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT COUNT(*) FROM results").fetchone() == (3,)
    db.close()
    assert set(lines_by_checkpoint(out / "summary.csv")) == {f"step_{s:06d}.pt" for s in STEPS}

    save_checkpoint(run_dir, 5000, 0.005)  # training re-saved it
    results, _ = audit(plan, run_dir, out)
    assert [(r.checkpoint, r.status) for r in results] == [("step_005000.pt", "ok")]


def test_cli_reports_reuse_in_run_json(config_path, tmp_path):
    run_dir = make_run(tmp_path, "cli", STEPS)
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["audit", str(config_path), str(run_dir), "--out", str(out), "--no-plot"]
    assert runner.invoke(app, args).exit_code == 0
    save_checkpoint(run_dir, 5000, 0.005)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "3 checkpoint(s) already audited" in second.output
    meta = json.loads((out / "run.json").read_text())
    assert [c["name"] for c in meta["checkpoints"]] == ["step_005000.pt"]
    assert len(meta["cached_checkpoints"]) == 3


def test_a_run_whose_names_are_not_utf8_is_audited_cached_and_written(config_path, tmp_path):
    # Names with bytes that are not UTF-8 (0xff) reach the cache, summary.csv, run.json and the terminal.
    run_dir = tmp_path / os.fsdecode(b"run_\xff")
    try:
        run_dir.mkdir()
        (run_dir / os.fsdecode(b"step_000010_\xff.pt")).write_bytes(checkpoint_bytes(0.3))
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses names that are not UTF-8")
    save_checkpoint(run_dir, 100, 0.05)
    out = tmp_path / "out"
    args = ["audit", str(config_path), os.fsdecode(run_dir), "--out", str(out), "--no-plot"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = [r for r in lines_by_checkpoint(out / "summary.csv")]
    assert set(rows) == {"step_000010_\\xff.pt", "step_000100.pt"}
    meta = json.loads((out / "run.json").read_text())
    assert {c["name"] for c in meta["checkpoints"]} == set(rows)
    second = CliRunner().invoke(app, args)  # the cache holds both, keyed by the file's real path
    assert second.exit_code == 0 and "2 checkpoint(s) already audited" in second.output, second.output

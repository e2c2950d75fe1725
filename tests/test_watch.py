"""`audit --watch`: checkpoints written while the audit runs are picked up, half-written ones retried."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from equiaudit import runner as runner_module
from equiaudit.io.cache import SettleTracker, Stamp
from equiaudit.io.config import load_config
from equiaudit.runner import Runner, RunEvents, open_audit
from run_helpers import checkpoint_bytes, make_run, write_config

INTERVAL = 0.2


def statuses(summary: Path) -> dict[str, str]:
    if not summary.is_file():
        return {}
    with summary.open(newline="") as handle:
        return {row["checkpoint"]: row["status"] for row in csv.DictReader(handle) if row["head"] == "total"}


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_settle_tracker():
    tracker = SettleTracker(settle_s=10)
    path, now = Path("c.pt"), 1000.0
    fresh = Stamp(size=10, mtime_ns=int(now * 1e9))
    assert not tracker.ready(path, fresh, now)  # just written, first sight
    assert tracker.ready(path, fresh, now + 1)  # unchanged since the last poll
    grown = Stamp(size=20, mtime_ns=int((now + 1) * 1e9))
    assert not tracker.ready(path, grown, now + 2)  # still being written
    old = Stamp(size=5, mtime_ns=0)
    assert tracker.ready(Path("old.pt"), old, now)  # untouched for longer than settle_s
    assert not tracker.confirm_failure(path, grown)  # first failure: maybe half-written
    assert tracker.confirm_failure(path, grown)  # the same file failed again: report it
    assert not tracker.confirm_failure(path, fresh)


def test_watch_picks_up_a_checkpoint_written_in_chunks(tmp_path, monkeypatch):
    config = write_config(tmp_path)
    run_dir = make_run(tmp_path, "live", {10: 0.3})
    out = tmp_path / "out"
    plan = open_audit(load_config(config), device="cpu")
    stop, polled, attempts = threading.Event(), [], []
    real = runner_module.audit_checkpoint

    def recorded(*args, **kwargs):
        attempts.append(real(*args, **kwargs))
        return attempts[-1]

    monkeypatch.setattr(runner_module, "audit_checkpoint", recorded)

    def watch() -> None:
        events = RunEvents(on_result=polled.append)
        with Runner(plan, out, events=events) as runner:
            runner.watch([str(run_dir)], interval=INTERVAL, stop=stop)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        wait_for(lambda: statuses(out / "summary.csv") == {"step_000010.pt": "ok"})
        # Training writes the next checkpoint slowly: each pause is longer than a poll, so the
        # watcher sees (and fails to load) a truncated file several times before it is complete.
        data = checkpoint_bytes(0.01)
        with open(run_dir / "step_000100.pt", "wb") as handle:
            for i in range(4):
                handle.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
                handle.flush()
                time.sleep(2.5 * INTERVAL)
        wait_for(lambda: "step_000100.pt" in statuses(out / "summary.csv"))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert statuses(out / "summary.csv") == {"step_000010.pt": "ok", "step_000100.pt": "ok"}  # never "corrupt"
    assert [r.checkpoint for r in polled if r.ok] == ["step_000010.pt", "step_000100.pt"]
    assert any(r.status == "corrupt" for r in attempts)  # it did see the half-written file, and retried


def test_watch_reports_a_corrupt_checkpoint_once_it_is_stable(tmp_path):
    config = write_config(tmp_path)
    run_dir = make_run(tmp_path, "broken", {10: 0.3})
    (run_dir / "step_000020.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    plan = open_audit(load_config(config), device="cpu")
    stop, results = threading.Event(), []
    with Runner(plan, out, events=RunEvents(on_result=results.append)) as runner:
        timer = threading.Timer(8 * INTERVAL, stop.set)
        timer.start()
        runner.watch([str(run_dir)], interval=INTERVAL, stop=stop)
    assert statuses(out / "summary.csv") == {"step_000010.pt": "ok", "step_000020.pt": "corrupt"}
    assert [r.status for r in results].count("corrupt") == 1  # reported once, not every poll


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_cli_watch_picks_up_new_checkpoint_and_stops_on_ctrl_c(tmp_path):
    config = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "cli"
    run_dir.mkdir(parents=True)  # empty: training has not saved anything yet
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "equiaudit.cli.main", "audit", str(config), str(run_dir), "--out", str(out),
           "--watch", "--interval", str(INTERVAL)]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "cache.sqlite").exists() or proc.poll() is not None)  # watching
        (run_dir / "step_000100.pt").write_bytes(checkpoint_bytes(0.01))
        wait_for(lambda: statuses(out / "summary.csv").get("step_000100.pt") == "ok" or proc.poll() is not None)
        wait_for(lambda: (out / "trajectory.png").exists() or proc.poll() is not None)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopped watching: 1 checkpoint(s) audited" in stderr
    assert "step_000100.pt" in stdout
    assert statuses(out / "summary.csv") == {"step_000100.pt": "ok"}
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())  # no half-written files left

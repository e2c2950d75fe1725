"""Beyond one process: torchrun ranks, array-job shards and merge, --target-ci, the GPU path's CPU fallbacks.

Every multi-process test compares against the one-process audit of the same config: the
same seed must give the same numbers (to 1e-9 relative; in practice bit for bit), in
summary.csv and breakdown.csv alike.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.distributed import World, choose_mode
from equiaudit.errors import ConfigError
from equiaudit.shards import parse_shard
from equiaudit.stats import SampleStats
from run_helpers import make_run, save_checkpoint, write_config

STEPS = {10: 0.3, 100: 0.05, 1000: 0.01, 10000: 0.003}
TIMING = {"seconds"}  # wall time: the one column allowed to differ
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A linear-map run of 4 checkpoints; 40 samples in 5 batches of 8, with a breakdown."""
    root = tmp_path_factory.mktemp("dist")
    config = write_config(root, samples=40, rotations=8)
    config.write_text(config.read_text() + "batch_size: 8\nbreakdown: {by: [angle, n_atoms]}\n")
    run = make_run(root, "aug", STEPS)
    one = root / "one"
    result = CliRunner().invoke(app, ["audit", str(config), str(run), "--out", str(one), "--no-plot", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root, config, run, one


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_csv(ours: Path, theirs: Path, rel: float = 1e-9) -> None:
    a, b = rows(ours), rows(theirs)
    assert len(a) == len(b) and a, (ours, len(a), len(b))
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in set(x) - TIMING:
            if x[key] == y[key]:
                continue
            try:
                u, v = float(x[key]), float(y[key])
            except ValueError:
                raise AssertionError(f"{theirs}: {key} {x[key]!r} != {y[key]!r}") from None
            assert math.isclose(u, v, rel_tol=rel, abs_tol=0.0), (key, u, v)


def assert_same_outputs(one: Path, other: Path) -> None:
    for name in ("summary.csv", "breakdown.csv"):
        assert_same_csv(one / name, other / name)


def torchrun(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "equiaudit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})


def audit_args(config: Path, run: Path, out: Path, *extra: str) -> list[str]:
    return ["audit", str(config), str(run), "--out", str(out), "--no-plot", "--device", "cpu", *extra]


# ------------------------------------------------------------------ torchrun


# One torchrun start costs ~10 s here (three processes importing torch on 2 cores): samples in the
# default suite; checkpoints there too, through the killed-rank test's rerun; both here with -m slow.
@pytest.mark.parametrize("mode", ["samples", pytest.param("checkpoints", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_equal_one_process(project, mode, tmp_path):
    root, config, run, one = project
    out = tmp_path / mode
    proc = torchrun(*audit_args(config, run, out, "--distribute", mode))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"splitting by {mode}" in proc.stderr
    assert_same_outputs(one, out)
    meta = json.loads((out / "run.json").read_text())
    assert meta["distributed"]["world_size"] == 2 and meta["distributed"]["mode"] == mode
    assert meta["distributed"]["backend"] == "gloo" and meta["distributed"]["reason"]
    assert len(meta["checkpoints"]) == len(STEPS)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["breakdown.csv", "cache.sqlite", "report.html", "run.json", "summary.csv"]


@pytest.mark.slow
def test_torchrun_target_ci_sharing_samples_equals_one_process(project, tmp_path):
    """--target-ci decided on rank 0 after each round stops at the batch one process stops at."""
    root, _, run, _ = project
    # Batches of 4: 10 batches, rounds (0, 1) … (8, 9). A width that some checkpoint first reaches
    # at 36 samples (batch 8) makes rank 0 cut inside a round, dropping rank 1's batch 9.
    config = root / "cfg4.yaml"
    config.write_text((root / "cfg.yaml").read_text().replace("batch_size: 8", "batch_size: 4"))
    half = {}
    for n in (32, 36):
        out = tmp_path / f"n{n}"
        assert CliRunner().invoke(app, audit_args(config, run, out, "--samples", str(n))).exit_code == 0
        half[n] = [(float(r["rel_equiv_error_ci_high"]) - float(r["rel_equiv_error_ci_low"])) / 2
                   for r in rows(out / "summary.csv") if r["head"] == "total"]
    narrower = [(a + b) / 2 for a, b in zip(half[32], half[36]) if a > b]
    assert narrower, half
    width = narrower[0]
    single = tmp_path / "single"
    result = CliRunner().invoke(app, audit_args(config, run, single, "--target-ci", str(width)))
    assert result.exit_code == 0, result.output
    assert 36 in {int(r["n_samples"]) for r in rows(single / "summary.csv")}
    out = tmp_path / "two"
    proc = torchrun(*audit_args(config, run, out, "--target-ci", str(width), "--distribute", "samples"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_outputs(single, out)


def test_a_rank_killed_mid_audit_fails_clearly_and_a_rerun_resumes(project, tmp_path):
    root, config, _, _ = project
    run = make_run(tmp_path, "killed", {10: 0.3, 100: 0.05})
    save_checkpoint(run, 1000, 0.01, kill=True)  # rank 1 SIGKILLs itself in its forward pass
    save_checkpoint(run, 10000, 0.003)
    out = tmp_path / "out"
    start = time.monotonic()
    proc = torchrun(*audit_args(config, run, out, "--distribute", "samples"), env={"KILL_RANK": "1"}, timeout=120)
    assert time.monotonic() - start < 90
    assert proc.returncode != 0
    # Rank 0's one line: stopped by torchrun's SIGTERM, or its gather found the peer gone.
    assert "error: rank 0:" in proc.stderr and "rerun the same command to resume" in proc.stderr, proc.stderr[-3000:]
    # The checkpoint rank 0 names is the one it was at: step_001000.pt, where rank 1 died, unless
    # rank 0 was still finishing the one before (the ranks meet at gathers, not between checkpoints:
    # under load rank 1 runs ahead). Whatever it names is not written; all before it are.
    named = re.search(r"during the audit of (step_\d+\.pt)", proc.stderr)
    assert named and named[1] in ("step_000100.pt", "step_001000.pt"), proc.stderr[-3000:]
    before = rows(out / "summary.csv")
    written = {r["checkpoint"] for r in before}
    assert written == {"step_000010.pt", "step_000100.pt"} - {named[1]}
    save_checkpoint(run, 1000, 0.01)  # training re-saved it
    # The rerun splits the two checkpoints left whole (the other mode): rank 0's cache lookup is broadcast.
    again = torchrun(*audit_args(config, run, out, "--distribute", "checkpoints"), env={"KILL_RANK": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(written)} checkpoint(s) already audited" in again.stderr  # nothing redone
    after = rows(out / "summary.csv")
    names = [r["checkpoint"] for r in after if r["head"] == "total"]
    assert sorted(names) == [f"step_{s:06d}.pt" for s in (10, 100, 1000, 10000)]  # nothing lost, nothing doubled
    assert [r for r in after if r["checkpoint"] in written] == before
    meta = json.loads((out / "run.json").read_text())
    assert len(meta["cached_checkpoints"]) == len(written) and len(meta["checkpoints"]) == 4 - len(written)
    # What the two modes wrote is what one process writes.
    single = tmp_path / "single"
    assert CliRunner().invoke(app, audit_args(config, run, single)).exit_code == 0
    assert_same_outputs(single, out)


def test_a_checkpoint_failing_on_one_rank_fails_for_all_with_its_message(project, tmp_path):
    root, config, _, _ = project
    run = make_run(tmp_path, "partial", {10: 0.3, 1000: 0.01})
    save_checkpoint(run, 100, 0.05, fail=True)  # raises in rank 1's forward passes only
    out = tmp_path / "out"
    proc = torchrun(*audit_args(config, run, out, "--distribute", "samples"), env={"KILL_RANK": "1"})
    assert proc.returncode != 0  # exit 1 from rank 0: a checkpoint failed
    assert "1 checkpoint(s) failed; the others were audited and written" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("injected failure on rank 1") == 1  # one message, from rank 0
    totals = {r["checkpoint"]: r for r in rows(out / "summary.csv") if r["head"] == "total"}
    assert totals["step_000100.pt"]["status"] == "model_error" and totals["step_000100.pt"]["rel_equiv_error"] == ""
    assert "RuntimeError: injected failure on rank 1" in totals["step_000100.pt"]["message"]
    assert totals["step_000010.pt"]["status"] == totals["step_001000.pt"]["status"] == "ok"


@pytest.mark.slow
def test_a_hung_rank_times_out_on_the_collective(project, tmp_path):
    root, config, _, _ = project
    run = make_run(tmp_path, "hung", {10: 0.3})
    save_checkpoint(run, 100, 0.05, hang=True)  # rank 1 sleeps in its forward pass
    out = tmp_path / "out"
    start = time.monotonic()
    proc = torchrun(*audit_args(config, run, out, "--distribute", "samples", "--dist-timeout", "5"),
                    env={"KILL_RANK": "1"}, timeout=120)
    assert time.monotonic() - start < 90
    assert proc.returncode != 0
    assert "did not answer within 5 s during the audit of step_000100.pt" in proc.stderr, proc.stderr[-3000:]
    assert [r["checkpoint"] for r in rows(out / "summary.csv") if r["head"] == "total"] == ["step_000010.pt"]


def test_a_bad_config_fails_every_rank_with_one_message(project, tmp_path):
    root, config, run, _ = project
    proc = torchrun(*audit_args(config, run, tmp_path / "out", "--rotations", "1"))
    assert proc.returncode != 0
    assert proc.stderr.count("error: config: group.rotations=1 must be an integer ≥ 2") == 1, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ shards


def _shard(config: Path, run: Path, out: Path, part: str, *extra: str):
    return CliRunner().invoke(app, audit_args(config, run, out, "--shard", part, *extra))


@pytest.mark.parametrize("mode", ["samples", "checkpoints"])
def test_shards_then_merge_equal_one_process(project, mode, tmp_path):
    root, config, run, one = project
    out = tmp_path / "out"
    for part in ("1/2", "2/2"):
        result = _shard(config, run, out, part, "--distribute", mode)
        assert result.exit_code == 0, result.output
        assert f"splitting by {mode}" in result.output
    assert not (out / "summary.csv").exists() and not (out / "cache.sqlite").exists()  # shards write only OUT/shards
    for path in (out / "shards").glob("*.pt"):  # plain tensors and text: loadable without pickled code
        state = torch.load(path, weights_only=True)
        assert SampleStats.from_state(state["stats"]).n_samples > 0
    merged = CliRunner().invoke(app, ["merge", str(out)])
    assert merged.exit_code == 0, merged.output
    assert_same_outputs(one, out)
    assert (out / "trajectory.png").stat().st_size > 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["shards"]["count"] == 2 and meta["shards"]["mode"] == mode
    assert len(meta["checkpoints"]) == len(STEPS)
    # The cache was filled by the merge: a plain audit of the same run evaluates nothing.
    again = CliRunner().invoke(app, audit_args(config, run, out))
    assert again.exit_code == 0 and f"{len(STEPS)} checkpoint(s) already audited" in again.output


def test_dynamics_through_shards_are_computed_at_merge_and_said(project, tmp_path):
    # The shards carry statistics only; merge loads each checkpoint's weights for the gradient
    # split (and says so): dynamics.csv equals one process's. A checkpoint rewritten after the
    # shards ran is not loaded: a warning, no dynamics row for it, its REE rows stand.
    root, config, run, _ = project
    one = tmp_path / "one"
    assert CliRunner().invoke(app, audit_args(config, run, one, "--dynamics")).exit_code == 0
    out = tmp_path / "out"
    for part in ("1/2", "2/2"):
        assert _shard(config, run, out, part, "--dynamics", "--distribute", "samples").exit_code == 0
    # merge builds the model only from the user's own config (never from a manifest in OUT).
    refused = CliRunner().invoke(app, ["merge", str(out)])
    assert refused.exit_code == 2 and "--config CFG" in refused.output, refused.output
    merged = CliRunner().invoke(app, ["merge", str(out), "--config", str(config)])
    assert merged.exit_code == 0, merged.output
    assert "merge loads each of the 4 checkpoint(s)" in " ".join(merged.output.split())
    assert_same_outputs(one, out)
    assert_same_csv(one / "dynamics.csv", out / "dynamics.csv", rel=1e-9)
    assert_same_csv(one / "twirl.csv", out / "twirl.csv", rel=1e-9)
    fresh = tmp_path / "fresh"  # the same shards merged into a new OUT after a checkpoint changed
    shutil.copytree(out / "shards", fresh / "shards")
    changed = sorted(run.glob("*.pt"))[-1]
    mtime = changed.stat().st_mtime_ns
    try:
        os.utime(changed, ns=(mtime, mtime + 10**9))
        again = CliRunner().invoke(app, ["merge", str(fresh), "--config", str(config)])
    finally:
        os.utime(changed, ns=(mtime, mtime))  # the module's run is shared by other tests
    assert again.exit_code == 0, again.output
    assert f"--dynamics skipped for {run.name}/{changed.name}: cannot load" in " ".join(again.output.split())
    assert {r["checkpoint"] for r in rows(fresh / "dynamics.csv")} == {p.name for p in run.glob("*.pt")} - {changed.name}
    assert_same_outputs(one, fresh)


def test_shards_running_at_the_same_time_into_one_out(project, tmp_path):
    root, config, run, one = project
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "equiaudit", *audit_args(config, run, out, "--distribute", "samples")]
    procs = [subprocess.Popen([*cmd, "--shard", part], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for part in ("1/2", "2/2")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    merged = CliRunner().invoke(app, ["merge", str(out), "--no-plot"])
    assert merged.exit_code == 0, merged.output
    assert_same_outputs(one, out)


def test_missing_duplicated_and_mismatched_shards_are_named(project, tmp_path):
    root, config, run, _ = project
    out = tmp_path / "out"
    merge = lambda: CliRunner().invoke(app, ["merge", str(out), "--no-plot"])  # noqa: E731

    result = merge()
    assert result.exit_code == 2 and "no finished shards" in result.output
    assert _shard(config, run, out, "1/3", "--distribute", "samples").exit_code == 0
    result = merge()
    assert result.exit_code == 2
    assert "missing shard(s) 2/3, 3/3" in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line
    assert _shard(config, run, out, "2/3", "--distribute", "samples").exit_code == 0
    assert _shard(config, run, out, "1/2", "--distribute", "samples").exit_code == 0  # a stale other split
    result = merge()
    assert result.exit_code == 2 and "duplicated shards" in result.output and "1/2, 1/3, 2/3" in result.output

    other = tmp_path / "other"
    assert _shard(config, run, other, "1/2", "--distribute", "samples").exit_code == 0
    assert _shard(config, run, other, "2/2", "--distribute", "samples", "--rotations", "4").exit_code == 0
    result = CliRunner().invoke(app, ["merge", str(other)])
    assert result.exit_code == 2 and "shards made with different settings" in result.output
    assert "1/2 (settings" in result.output and "2/2 (settings" in result.output

    # Other breakdown options change the statistics, not the settings hash: still refused.
    fourth = tmp_path / "fourth"
    worst = tmp_path / "worst.yaml"
    worst.write_text(config.read_text().replace("breakdown: {by: [angle, n_atoms]}", "breakdown: {by: [angle, n_atoms], worst: 2}"))
    assert _shard(config, run, fourth, "1/2", "--distribute", "samples").exit_code == 0
    assert _shard(worst, run, fourth, "2/2", "--distribute", "samples").exit_code == 0
    result = CliRunner().invoke(app, ["merge", str(fourth)])
    assert result.exit_code == 2 and "shards made with different settings" in result.output

    # Both halves of one split, then a part file copied under the other shard's name: doubled batches.
    third = tmp_path / "third"
    for part in ("1/2", "2/2"):
        assert _shard(config, run, third, part, "--distribute", "checkpoints").exit_code == 0
    manifest = json.loads((third / "shards" / "shard-2-of-2.json").read_text())
    first = json.loads((third / "shards" / "shard-1-of-2.json").read_text())
    stolen = first["files"][0]
    copy = stolen.replace(".1-of-2.", ".2-of-2.")
    (third / "shards" / copy).write_bytes((third / "shards" / stolen).read_bytes())
    manifest["files"].append(copy)
    (third / "shards" / "shard-2-of-2.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["merge", str(third)])
    assert result.exit_code == 2 and "duplicated shards: batch 0 of step_000010.pt is in shards 1/2, 2/2" in result.output


def test_a_shard_resumes_and_a_corrupt_part_is_named(project, tmp_path):
    root, config, run, one = project
    out = tmp_path / "out"
    assert _shard(config, run, out, "1/2", "--distribute", "samples").exit_code == 0
    written = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.pt")}
    again = _shard(config, run, out, "1/2", "--distribute", "samples")
    assert again.exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.pt")} == written  # nothing evaluated again
    assert _shard(config, run, out, "2/2", "--distribute", "samples").exit_code == 0
    part = sorted((out / "shards").glob("*.2-of-2.pt"))[0]
    part.write_bytes(b"not a shard")
    result = CliRunner().invoke(app, ["merge", str(out)])
    assert result.exit_code == 2 and f"{part}: not a readable shard file" in result.output


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/2"], "--shard='3/2' must be I/N with 1 ≤ I ≤ N"),
    (["--shard", "1/2", "--watch"], "--watch runs in one process"),
    (["--shard", "1/2", "--target-ci", "0.01"], "--target-ci does not combine with --shard"),
    (["--target-ci", "2"], "target_ci=2.0 must be a half-width"),
])
def test_bad_options_exit_2_with_one_line(project, args, message, tmp_path):
    root, config, run, _ = project
    result = CliRunner().invoke(app, audit_args(config, run, tmp_path / "out", *args))
    assert result.exit_code == 2, result.output
    assert message in result.output


# ------------------------------------------------------------------ --target-ci


def _width_between(one: Path) -> float:
    """A half-width the 40-sample audit reaches but 16 samples do not (1.4 × its own)."""
    total = [r for r in rows(one / "summary.csv") if r["head"] == "total"][-1]
    return 1.4 * (float(total["rel_equiv_error_ci_high"]) - float(total["rel_equiv_error_ci_low"])) / 2


def test_target_ci_stops_at_the_first_batch_that_reaches_the_width(project, tmp_path):
    root, config, run, one = project
    width = _width_between(one)
    out = tmp_path / "target"
    result = CliRunner().invoke(app, audit_args(config, run, out, "--target-ci", str(width)))
    assert result.exit_code == 0, result.output
    assert "--target-ci" in result.output and "used" in result.output
    last = [r for r in rows(out / "summary.csv") if r["head"] == "total"][-1]
    n = int(last["n_samples"])
    assert 32 <= n < 40 and n % 8 == 0  # whole batches, at least TARGET_MIN_SAMPLES
    half = (float(last["rel_equiv_error_ci_high"]) - float(last["rel_equiv_error_ci_low"])) / 2
    assert half <= width
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["target_ci"] == width and meta["checkpoints"][-1]["n_samples"] == n
    # The same numbers as an audit of exactly those n samples (same samples, same rotations) ...
    fixed = tmp_path / "fixed"
    assert CliRunner().invoke(app, audit_args(config, run, fixed, "--samples", str(n))).exit_code == 0
    same = [r for r in rows(fixed / "summary.csv") if r["head"] == "total"][-1]
    for key in ("rel_equiv_error", "rel_equiv_error_ci_low", "rel_equiv_error_ci_high", "loss_aug", "float_floor"):
        assert float(same[key]) == float(last[key]), key
    # ... and one batch fewer is not narrow enough (it stopped at the first batch that was).
    if n - 8 >= 32:
        fewer = tmp_path / "fewer"
        assert CliRunner().invoke(app, audit_args(config, run, fewer, "--samples", str(n - 8))).exit_code == 0
        r = [r for r in rows(fewer / "summary.csv") if r["head"] == "total"][-1]
        assert (float(r["rel_equiv_error_ci_high"]) - float(r["rel_equiv_error_ci_low"])) / 2 > width


def test_target_ci_that_is_never_reached_uses_every_sample(project, tmp_path):
    root, config, run, one = project
    out = tmp_path / "target"
    result = CliRunner().invoke(app, audit_args(config, run, out, "--target-ci", "1e-9"))
    assert result.exit_code == 0, result.output
    assert "not reached: the data ran out" in result.output
    assert {r["n_samples"] for r in rows(out / "summary.csv")} == {"40"}
    assert [r["rel_equiv_error"] for r in rows(out / "summary.csv")] == [r["rel_equiv_error"] for r in rows(one / "summary.csv")]


# ------------------------------------------------------------------ units


def test_choose_mode_rule():
    assert choose_mode("auto", 1, 10, 2)[0] == "samples"  # one large checkpoint: share its samples
    assert choose_mode("auto", 8, 1, 2)[0] == "checkpoints"  # many small ones: whole
    assert choose_mode("auto", 8, 10, 2)[0] == "checkpoints"  # a tie: whole checkpoints
    assert choose_mode("auto", 3, 4, 2)[0] == "samples"  # 2 rounds × 4 > 3 × 2
    assert choose_mode("samples", 8, 1, 2)[0] == "samples"
    with pytest.raises(ConfigError, match="--distribute='bogus' is not allowed"):
        choose_mode("bogus", 1, 1, 2)


def test_world_from_env_and_shard_parsing():
    assert World.from_env({}) == World(0, 1, 0)
    assert World.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(ConfigError, match="RANK=4 is not in"):
        World.from_env({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(ConfigError, match="must be integers"):
        World.from_env({"WORLD_SIZE": "two"})
    assert (parse_shard("2/8").index, parse_shard(" 2 / 8 ").count) == (2, 8)
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_sample_stats_state_round_trip_through_weights_only(tmp_path):
    stats = SampleStats(["out"], piece=3)
    ids = torch.arange(5)
    stats.tables["samples"].add(id=ids, origin=stats.origins(5), **{"loss_aug/out": torch.rand(5, dtype=torch.float64),
                                                                    "loss_rot/out": torch.rand(5, 4, dtype=torch.float64)})
    stats.tables["samples"].add(id=ids + 5, origin=stats.origins(5), **{"loss_aug/out": torch.rand(5, dtype=torch.float64),
                                                                        "loss_rot/out": torch.rand(5, 4, dtype=torch.float64)})
    torch.save(stats.to_state(), tmp_path / "s.pt")
    back = SampleStats.from_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.heads == ["out"] and back.piece == 3 and back.n_samples == 10
    for name, value in stats.tables["samples"].columns().items():
        assert torch.equal(back.tables["samples"].column(name), value)
    assert back.origins(1).item() == (3 << 40) + 10  # fresh rows continue the piece's origins
    with pytest.raises(ValueError, match="not a SampleStats state"):
        SampleStats.from_state({"heads": "x", "piece": 0, "rows": 0, "tables": {}})


def test_python_dash_m_equiaudit_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "equiaudit", "--version"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0 and "equiaudit" in proc.stdout


def test_another_ranks_error_keeps_its_type_and_status():
    from equiaudit.distributed import DistributedError, _named_by_rank
    from equiaudit.errors import CheckpointError

    named = _named_by_rank(CheckpointError("step_9.pt: truncated", status="corrupt"), 1)
    assert type(named) is CheckpointError and named.status == "corrupt" and str(named) == "rank 1: step_9.pt: truncated"
    other = _named_by_rank(KeyError("x"), 2)
    assert type(other) is DistributedError and str(other) == "rank 2: KeyError: 'x'"


def test_a_shard_rerun_after_the_data_changed_audits_again(tmp_path):
    # The part files are keyed like the cache (data and factory files, EMA sibling): new data
    # must not resume parts computed on the old.
    config = write_config(tmp_path / "p", samples=16, rotations=4)
    run = make_run(tmp_path / "p", "aug", {10: 0.3})
    out = tmp_path / "out"
    assert _shard(config, run, out, "1/1").exit_code == 0
    before = {p.name for p in (out / "shards").glob("*.pt")}
    data = tmp_path / "p" / "data.npz"
    arrays = dict(np.load(data))
    np.savez(data, pos=arrays["pos"] * 2, target=arrays["target"] * 2)
    os.utime(data, ns=(data.stat().st_mtime_ns + 10**9,) * 2)
    assert _shard(config, run, out, "1/1").exit_code == 0
    after = {p.name for p in (out / "shards").glob("*.pt")}
    assert len(before) == 1 and len(after) == 2 and before < after  # a new part, under a new key

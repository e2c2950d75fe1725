"""Breakdowns: the splits, their weights reproducing the totals, and breakdown.csv / --by / --local."""

from __future__ import annotations

import csv
import json
import textwrap
from collections import defaultdict

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equiaudit.breakdown import BreakdownOptions, field_bins
from equiaudit.engine import HeadSpec, OrbitSpec
from equiaudit.errors import ConfigError
from equiaudit.io.config import parse_config
from equiaudit.report.breakdown import BREAKDOWN_COLUMNS
from equiaudit.report.summary import merge_rows
from equiaudit.rotations import so3_generators
from helpers import LinearMap, audit_config, run_audit, vector_dataset


class ForceField(torch.nn.Module):
    """Non-equivariant: reads raw coordinates (as a transformer trained without symmetry would)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 8)
        self.coords = torch.nn.Linear(3, 8)
        self.energy = torch.nn.Linear(8, 1)
        self.forces = torch.nn.Linear(8, 3)

    def forward(self, pos, z, mask):
        h = torch.tanh(self.coords(pos) + self.embed(z))
        return {"energy": (self.energy(h).squeeze(-1) * mask).sum(1), "forces": self.forces(h) * mask[..., None]}


def _molecules(path, n=20, atoms=6, padded=False, seed=0):
    rng = np.random.default_rng(seed)
    z = np.broadcast_to(np.array([6, 6, 8, 1, 1, 1])[:atoms], (n, atoms)).copy()
    pos = rng.normal(size=(n, atoms, 3))
    arrays = {"energy": rng.normal(size=n), "forces": rng.normal(size=(n, atoms, 3)), "t": rng.uniform(size=n)}
    if padded:
        sizes = rng.integers(2, atoms + 1, size=n)
        mask = np.arange(atoms)[None] < sizes[:, None]
        pos, z, arrays["forces"] = pos * mask[..., None], z * mask, arrays["forces"] * mask[..., None]
        arrays["mask"] = mask
    np.savez(path, pos=pos, z=z, **arrays)
    return path


def _audit(tmp_path, *, padded=False, loss="mse", breakdown=None, local=False, data=None):
    config = parse_config({
        "task": "force_field",
        "model": {"factory": f"{__file__}:ForceField", "dtype": "float64"},
        "data": {"path": str(_molecules(tmp_path / "data.npz", padded=padded)), **(data or {})},
        "heads": {"energy": {"rep": "scalar", "loss": loss}, "forces": {"rep": "vector", "loss": loss, "weight": 2.0}},
        "group": {"name": "so3", "rotations": 6},
        "bootstrap": 20,
        "local": local,
        **({"breakdown": breakdown} if breakdown else {}),
    })
    audit, result = audit_config(config, tmp_path, name="ff.pt")
    assert result.ok, result.message
    return audit, result


def _splits(rows):
    grouped = defaultdict(list)
    for row in rows:
        grouped[(row["head"], row["by"])].append(row)
    return grouped


@pytest.mark.parametrize("padded, loss", [(False, "mse"), (True, "mse"), (True, "l1")])
def test_force_field_splits_reproduce_the_totals(tmp_path, padded, loss):
    audit, result = _audit(tmp_path, padded=padded, loss=loss)
    dataset = audit.prepared.data
    grouped = _splits(result.breakdown)
    assert {by for _, by in grouped} == {"element", "n_atoms", "angle", "t", "sample"}
    assert ("energy", "element") not in grouped  # per-molecule head: no per-atom split
    # Element bins are exactly the atomic numbers present (padding's 0 is not an element).
    z = dataset["z"][dataset["mask"]]
    assert [int(r["bin"]) for r in grouped[("forces", "element")]] == sorted(set(z.tolist()))
    for (head, by), rows in grouped.items():
        if by == "sample":
            continue
        summary = result[head]
        assert sum(r["weight"] for r in rows) == pytest.approx(1.0, rel=1e-12)
        assert sum(r["weight"] * r["equiv_error"] for r in rows) == pytest.approx(summary.equiv_error, rel=1e-9)
        assert sum(r["weight"] * r["loss_aug"] for r in rows) == pytest.approx(summary.loss_aug, rel=1e-9)
        assert sum(r["share"] for r in rows) == pytest.approx(1.0, rel=1e-9)
        for r in rows:
            assert r["loss_aug"] == pytest.approx(r["loss_sym"] + r["equiv_error"])
        if not padded:  # equal unit weights: the count-weighted mean is the total
            n = sum(r["n"] for r in rows)
            assert sum(r["n"] * r["equiv_error"] for r in rows) / n == pytest.approx(summary.equiv_error, rel=1e-9)
    counts = dataset["mask"].sum(1)
    assert sorted(int(r["bin"]) for r in grouped[("total", "n_atoms")]) == sorted(set(counts.tolist()))
    assert sum(r["n"] for r in grouped[("total", "angle")]) == len(audit.prepared) * 6


def test_sample_split_lists_the_worst_samples_with_their_index_in_the_file(tmp_path):
    audit, result = _audit(tmp_path, breakdown={"worst": 3}, data={"samples": 12, "subset_seed": 3})
    stats = audit.plan.evaluate(audit.model, audit.prepared).finalized()
    per_sample = stats.tables["samples"].column("equiv_error/forces")
    worst = [r for r in result.breakdown if r["by"] == "sample" and r["head"] == "forces"]
    in_file = audit.prepared.index[per_sample.argsort(descending=True)[:3]]
    assert [int(r["bin"]) for r in worst] == in_file.tolist()
    file_pos = torch.from_numpy(np.load(tmp_path / "data.npz")["pos"])
    assert torch.equal(file_pos[in_file], audit.prepared.data["pos"][per_sample.argsort(descending=True)[:3]])
    assert [r["equiv_error"] for r in worst] == pytest.approx(per_sample.sort(descending=True).values[:3].tolist())
    assert all(r["n"] == 1 for r in worst)


def test_loss_grows_with_angle_for_a_model_fitted_in_one_frame():
    """f(x) = A x fits y = A x in the data's frame: the loss is 0 at the identity and grows with the angle.

    A = 0.8 I + W with W antisymmetric: averaged over axes, ‖(RᵀWR − W) x‖² ∝ 1 − (1 + 2 cos θ)/3,
    increasing in θ (a symmetric traceless part would peak near 120° instead).
    """
    matrix = 0.8 * torch.eye(3, dtype=torch.float64) + torch.einsum("j,jab->ab", torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), so3_generators())
    data = vector_dataset(400, 4)
    data["target"] = data["pos"] @ matrix.T
    spec = OrbitSpec(fields={"pos": "vector"}, heads=(HeadSpec("out", "vector", "target"),), inputs=["pos"], outputs=["out"], mask=None)
    summary = run_audit(LinearMap(matrix).double(), data, spec, k=8, sampling="haar", breakdown=BreakdownOptions())
    rows = [r for r in summary.breakdown if r["by"] == "angle" and r["head"] == "out"]
    assert [r["bin"] for r in rows][-1] == "[150, 180]"
    losses = [r["loss_aug"] for r in rows]
    assert losses == sorted(losses) and losses[-1] > 5 * losses[0]
    assert sum(r["weight"] * r["equiv_error"] for r in rows) == pytest.approx(summary["out"].equiv_error, rel=1e-9)


def test_channel_split_finds_the_broken_channel():
    """Channel 0 passes through (exact under cube rotations); channel 1 goes through a random conv."""

    class HalfBroken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv3d(1, 1, 3, padding=1).double()

        def forward(self, grid):
            return torch.cat([grid[:, :1], self.conv(grid[:, 1:])], 1)

    grid = torch.randn(6, 2, 6, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = {"grid": grid, "clean": grid * 0.5}
    spec = OrbitSpec(fields={"grid": "voxel"}, heads=(HeadSpec("denoised", "voxel", "clean"),), inputs=["grid"], outputs=["denoised"], mask=None)
    summary = run_audit(HalfBroken(), data, spec, group="octahedral", breakdown=BreakdownOptions())
    rows = [r for r in summary.breakdown if r["by"] == "channel"]
    assert [r["bin"] for r in rows] == ["0", "1"] and [r["n"] for r in rows] == [6, 6]
    assert rows[0]["equiv_error"] < 1e-25 and rows[1]["share"] == pytest.approx(1.0)
    assert sum(r["weight"] * r["equiv_error"] for r in rows) == pytest.approx(summary["denoised"].equiv_error, rel=1e-9)


def test_field_bins():
    t = torch.tensor([0.05, 0.15, 0.5, 0.99, 1.0], dtype=torch.float64)
    ids, names = field_bins(t, 5)
    assert ids.tolist() == [0, 0, 2, 4, 4] and names[0] == "[0, 0.2)" and names[4] == "[0.8, 1]"
    ids, names = field_bins(torch.arange(10, dtype=torch.float64) * 3 - 5, 2)  # outside [0, 1]: quantiles
    assert ids.tolist() == [0] * 5 + [1] * 5 and names == {0: "[-5, 8.5)", 1: "[8.5, 22]"}
    ids, names = field_bins(torch.tensor([3, 1, 3, 2]), 5)  # few integers: one bin each
    assert ids.tolist() == [3, 1, 3, 2] and names == {1: "1", 2: "2", 3: "3"}


def test_by_names_a_per_sample_field_or_fails_clearly(tmp_path):
    _, result = _audit(tmp_path, breakdown={"by": ["energy"], "bins": 2})
    assert [r["bin"] for r in result.breakdown if r["by"] == "energy" and r["head"] == "total"] == \
        [r["bin"] for r in result.breakdown if r["by"] == "energy" and r["head"] == "forces"]
    assert len({r["bin"] for r in result.breakdown if r["by"] == "energy"}) == 2
    with pytest.raises(ConfigError, match="breakdown by 'forces'"):
        _audit(tmp_path, breakdown={"by": ["forces"]})


def test_merge_replaces_a_checkpoint_and_keeps_the_others():
    old = [{"run": "r", "checkpoint": "a", "step": "1", "config_hash": "h", "by": "angle", "head": "total"},
           {"run": "r", "checkpoint": "b", "step": "2", "config_hash": "h", "by": "angle", "head": "total"}]
    new = [{"run": "r", "checkpoint": "a", "step": 1, "config_hash": "h", "by": "element", "head": "forces"}]
    merged = merge_rows(old, new, total_first=False)
    assert [(r["checkpoint"], r["by"]) for r in merged] == [("a", "element"), ("b", "angle")]


def _cli_project(tmp_path, monkeypatch):
    """A data file, a one-checkpoint run and config.yaml in ``tmp_path`` (the working directory); returns the CLI app."""
    _molecules(tmp_path / "data.npz")
    (tmp_path / "run").mkdir()
    torch.save(ForceField().state_dict(), tmp_path / "run" / "step_100.pt")
    (tmp_path / "config.yaml").write_text(textwrap.dedent(f"""
        task: force_field
        model: {{factory: "{__file__}:ForceField"}}
        checkpoints: {{path: run}}
        data: {{path: data.npz}}
        group: {{name: so3, rotations: 4}}
        bootstrap: 20
        """))
    monkeypatch.chdir(tmp_path)
    from equiaudit.cli.main import app

    return app


def test_cli_writes_breakdown_csv_shows_by_tables_and_local_columns(tmp_path, monkeypatch):
    app = _cli_project(tmp_path, monkeypatch)

    result = CliRunner().invoke(app, ["audit", "config.yaml", "--out", "out", "--local", "--by", "element,angle", "--no-plot"])
    assert result.exit_code == 0, result.output
    assert "breakdown by element" in result.output and "breakdown by angle" in result.output
    with open(tmp_path / "out" / "breakdown.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0])[: len(BREAKDOWN_COLUMNS)] == BREAKDOWN_COLUMNS
    assert {r["by"] for r in rows} == {"element", "n_atoms", "angle", "t", "sample"}
    assert {r["step"] for r in rows} == {"100"}
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert all(float(r["local_equiv_error"]) > 0 and r["float_floor"] for r in summary)


def test_cached_audits_keep_their_breakdown(tmp_path, monkeypatch):
    """breakdown.csv is rebuilt from the cache like summary.csv; a split the cached rows lack
    (a per-sample field) re-audits the checkpoint instead of silently showing nothing."""
    app = _cli_project(tmp_path, monkeypatch)

    audit = ["audit", "config.yaml", "--out", "out", "--no-plot"]
    breakdown_csv, run_json = tmp_path / "out" / "breakdown.csv", tmp_path / "out" / "run.json"
    assert CliRunner().invoke(app, audit).exit_code == 0
    first = breakdown_csv.read_text()
    assert ",element," in first and not json.loads(run_json.read_text())["cached_checkpoints"]

    breakdown_csv.unlink()
    again = CliRunner().invoke(app, [*audit, "--by", "element"])
    assert again.exit_code == 0 and "breakdown by element" in again.output
    assert json.loads(run_json.read_text())["cached_checkpoints"]  # reused, not re-audited
    assert breakdown_csv.read_text() == first

    by_energy = CliRunner().invoke(app, [*audit, "--by", "energy"])
    assert by_energy.exit_code == 0 and "breakdown by energy" in by_energy.output
    assert not json.loads(run_json.read_text())["cached_checkpoints"]  # the cached rows had no energy split
    with open(breakdown_csv, newline="") as handle:
        assert "energy" in {r["by"] for r in csv.DictReader(handle)}

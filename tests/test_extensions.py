"""A new representation and a new task with its own per-sample variable are one file each
(``tests/toy_extensions.py``): the engine, the float floor, the translation group, the
breakdown, the trajectory plot and ``report.html`` pick them up from their declarations."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from equiaudit import representations, tasks
from equiaudit.io.checkpoints import CheckpointRef
from equiaudit.io.config import parse_config
from equiaudit.report.plot import trajectory_figure
from equiaudit.report.products import write_products
from equiaudit.runner import Runner, audit_checkpoint, open_audit
from equiaudit.tasks import base as task_base


@pytest.fixture(scope="module")
def toy():
    """Register the toy extensions for this module only (the registries are shared)."""
    import toy_extensions

    representations.register_representation(toy_extensions.SITE)
    tasks.register_task(toy_extensions.TOY_RELAX)
    yield toy_extensions
    representations.REPRESENTATIONS.pop("site")
    task_base.TASKS.pop("toy_relax")


def _config(tmp_path, group: str = "so3"):
    rng = np.random.default_rng(0)
    data = tmp_path / "clouds.npz"
    np.savez(data, pos=rng.normal(size=(24, 5, 3)) + 3.0, z=np.ones((24, 5), dtype=np.int64))
    return parse_config({
        "task": "toy_relax",
        "model": {"factory": "toy_extensions:ToyRelax", "dtype": "float64"},
        "data": {"path": str(data)},
        "group": {"name": group, "rotations": 8},
        "bootstrap": 20,
        "breakdown": {"bins": 3},
    })


def _audit(tmp_path, offset, group="so3", step=0):
    audit = open_audit(_config(tmp_path, group), device="cpu")
    path = tmp_path / f"step_{step}.pt"
    torch.save({"offset": torch.tensor(offset, dtype=torch.float64)}, path)
    return audit, audit_checkpoint(audit, CheckpointRef(path, path.name, "toy", step))


def test_a_registered_position_like_representation_is_read_by_its_flags(toy, tmp_path):
    # Inputs arrive centred (``centred``), so a zero offset is exactly rotation-equivariant:
    # float64 rounding only; a constant offset is caught.
    _, exact = _audit(tmp_path, [0.0, 0.0, 0.0])
    _, offset = _audit(tmp_path, [0.3, 0.0, 0.0])
    assert exact.ok and offset.ok
    assert exact.heads["relaxed"].rel_equiv_error < 1e-20
    assert offset.heads["relaxed"].rel_equiv_error > 1e-3
    # ``translates``: under a shift s the model's output, moved back, is off by −tau/2·s, so
    # EE is nonzero; a representation the translation group did not move would read EE = 0.
    _, shifted = _audit(tmp_path, [0.0, 0.0, 0.0], group="translation")
    assert shifted.ok and shifted.heads["relaxed"].equiv_error > 1e-3 * shifted.heads["relaxed"].loss_aug


def test_a_task_variable_reaches_the_breakdown_the_plot_and_the_report(toy, tmp_path):
    assert "tau" in tasks.sample_variables()
    audit = open_audit(_config(tmp_path), device="cpu")
    refs = []
    for step, offset in ((0, 0.3), (100, 0.03)):
        path = tmp_path / "run" / f"step_{step}.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save({"offset": torch.tensor([offset, 0.0, 0.0], dtype=torch.float64)}, path)
        refs.append(CheckpointRef(path, path.name, "toy", step))
    out = tmp_path / "out"
    with Runner(audit, out, use_cache=False) as runner:
        runner.run(refs)
    with open(out / "breakdown.csv", newline="") as handle:
        tau_rows = [r for r in csv.DictReader(handle) if r["by"] == "tau"]
    # 3 bins of tau per checkpoint (bins: 3), for the head and the total.
    assert len({r["bin"] for r in tau_rows}) == 3
    assert {r["step"] for r in tau_rows} == {"0", "100"}
    fig = trajectory_figure([], per_t=tau_rows, head="relaxed")
    assert len(fig.axes) == 3  # the per-variable panel
    labels = [line.get_label() for line in fig.axes[2].get_lines()]
    assert sum(label.startswith("tau = ") for label in labels) == 3
    write_products(out)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="per-tau"' in page and "REE per toy time τ" in page
    assert "One line per fixed toy time τ of the relaxation (breakdown by tau)" in page

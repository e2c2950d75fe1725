"""``equiaudit.Auditor``: settings and data prepared once, the same numbers as ``equiaudit.audit``;
the optional integrations fail to import with a one-line install hint."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import equiaudit
from equiaudit.errors import ConfigError
from helpers import LinearMap, linear_map_ree, random_matrix, vector_dataset

SETTINGS = dict(task="custom", fields={"pos": "vector"}, heads={"out": {"rep": "vector", "target": "target"}},
                inputs=["pos"], outputs=["out"], rotations=24, bootstrap=0, seed=4)


def same_rows(a: list[dict], b: list[dict]) -> bool:
    """Equal rows, wall time aside; NaN (no interval with bootstrap=0) equals NaN."""
    def clean(rows):
        return [{k: "nan" if isinstance(v, float) and v != v else v for k, v in r.items() if k != "seconds"} for r in rows]
    return clean(a) == clean(b)


def test_auditor_equals_audit_and_prepares_once():
    data = vector_dataset(32, 5)
    auditor = equiaudit.Auditor(data, **SETTINGS)
    prepared = auditor.prepared()
    for seed in (1, 2):
        model = LinearMap(random_matrix(seed))
        mine, reference = auditor(model), equiaudit.audit(model, data, **SETTINGS)
        assert same_rows(mine.rows(), reference.rows())
        assert mine.total.rel_equiv_error == pytest.approx(linear_map_ree(random_matrix(seed)), rel=0.15)
    assert auditor.prepared() is prepared  # the same samples and rotations for every call
    assert len(auditor.prepared().elements) == 32


def test_auditor_checks_settings_when_made():
    with pytest.raises(ConfigError, match="unknown keyword"):
        equiaudit.Auditor(vector_dataset(4, 2), rotation=3)
    auditor = equiaudit.Auditor(vector_dataset(4, 2), **SETTINGS)
    with pytest.raises(ConfigError, match="must be a torch.nn.Module"):
        auditor(lambda pos: pos)


def test_auditor_restores_training_mode():
    model = LinearMap(random_matrix(1))
    model.train()
    equiaudit.Auditor(vector_dataset(8, 3), **SETTINGS)(model)
    assert model.training and model.matrix.grad is None


@pytest.mark.parametrize("module, extra, blocked", [
    ("equiaudit.lightning", "lightning", ("lightning", "lightning.pytorch")),
    ("equiaudit.hf", "hf", ("transformers",)),
])
def test_missing_extra_is_a_one_line_import_error(monkeypatch, module, extra, blocked):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'equiaudit\[{extra}\]'") as info:
        importlib.import_module(module)
    assert "\n" not in str(info.value)


def test_scalars_names_total_and_heads():
    result = equiaudit.Auditor(vector_dataset(8, 3), **SETTINGS)(LinearMap(random_matrix(1)))
    scalars = result.scalars()
    assert set(scalars) == {f"equiaudit/{n}" for n in ("rel_equiv_error", "loss_aug", "loss_sym", "skill")} | \
        {f"equiaudit/out/{n}" for n in ("rel_equiv_error", "loss_aug", "loss_sym", "skill")}
    assert scalars["equiaudit/out/loss_sym"] == result.heads["out"].loss_sym
    assert scalars["equiaudit/rel_equiv_error"] == result.total.rel_equiv_error
    assert set(result.scalars("ea")) == {name.replace("equiaudit/", "ea/") for name in scalars}
    assert torch.isfinite(torch.tensor(list(scalars.values()))).all()

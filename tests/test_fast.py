"""The GPU fast path's pieces where there is no GPU: they switch off, or give the same numbers.

``tests/test_gpu.py`` runs the CUDA side (side-stream staging, pinned copies, compile on
CUDA); here: the staging logic with the orbit inputs built one batch ahead (no streams on
the CPU) gives bit-identical statistics, pinning is a no-op on the CPU, and ``--compile``
(``torch.compile`` of a tiny model's forward, CPU inductor) gives the plain model's numbers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from equiaudit.fast import compile_model, pinned, staged_batches
from equiaudit.groups import make_group
from equiaudit.plan import AuditPlan, evaluation_mode
from equiaudit.stats import SampleStats
from helpers import LinearMap, random_matrix, vector_dataset, vector_spec


def _plan(**options) -> AuditPlan:
    return AuditPlan(dataclasses.replace(vector_spec(), group=make_group("so3", 8)), batch_size=8, bootstrap=50, **options)


def _columns(stats: SampleStats) -> dict[str, torch.Tensor]:
    out = {}
    for name, table in stats.finalized().tables.items():
        out.update({f"{name}:{k}": v for k, v in table.columns().items() if k != "origin"})
    return out


def test_orbit_inputs_built_ahead_give_identical_statistics():
    plan = _plan(float_floor=True)
    prepared = plan.prepare(vector_dataset(36, 5))
    model = LinearMap(random_matrix()).double()
    plain = plan.evaluate(model, prepared, batches=lambda i: i != 2)
    ahead = SampleStats(plan.heads)
    seen = []
    with evaluation_mode(model):
        for number, batch, ids, elements, index, rotated, chosen in staged_batches(plan, model, prepared, lambda i: i != 2,
                                                                                    prebuild=True):
            seen.append((number, chosen, rotated is not None))
            if chosen:
                plan.evaluate_batch(model, batch, ids, elements, stats=ahead, index=index, rotated=rotated)
    assert seen == [(0, True, True), (1, True, True), (2, False, False), (3, True, True), (4, True, True)]
    a, b = _columns(plain), _columns(ahead)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pinning_and_staging_switch_off_on_the_cpu():
    plan = _plan()
    prepared = plan.prepare(vector_dataset(10, 3))
    assert pinned(prepared, "cpu") is prepared
    staged = list(staged_batches(plan, LinearMap(random_matrix()).double(), prepared))
    assert [s[5] for s in staged] == [None, None]  # nothing built ahead: the plan builds as always


def test_compiled_model_gives_the_plain_numbers():
    plan = _plan()
    prepared = plan.prepare(vector_dataset(24, 4))
    plain = plan.audit(LinearMap(random_matrix()).double(), prepared)
    compiled = compile_model(LinearMap(random_matrix()).double())
    result = plan.audit(compiled, prepared)
    assert result.total.rel_equiv_error == pytest.approx(plain.total.rel_equiv_error, rel=1e-12)
    assert set(compiled.state_dict()) == {"matrix"}  # checkpoints still load: no _orig_mod. prefix

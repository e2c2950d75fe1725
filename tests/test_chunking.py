"""``chunk_size: auto`` (equiaudit.chunking): the search, its memory budget, out-of-memory
halving, and numbers that do not depend on the chunk size."""

from __future__ import annotations

import json
import math

import pytest
import torch

import equiaudit
from equiaudit.chunking import AutoChunks, ChunkSearch, FixedChunks, is_out_of_memory, run_in_chunks
from equiaudit.errors import ConfigError
from equiaudit.zoo import transformer_force_field
from helpers import LinearMap, linear_map_ree, molecule_clouds, random_matrix

CPU = torch.device("cpu")
VECTORS = dict(task="custom", fields={"pos": "vector"}, heads={"out": {"rep": "vector", "target": "y", "loss": "mse"}},
               inputs=["pos"], outputs=["out"], rotations=16, seed=0, device="cpu", float_floor=False, bootstrap=200)


class FakeClock:
    """Seconds that advance only when the fake model works: ``rows × cost(rows)``."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeProbe:
    """Memory in use rises by ``per_row`` bytes per row while a chunk runs."""

    method = "fake"

    def __init__(self, available: int, per_row: int):
        self.free, self.per_row, self.used, self.high = available, per_row, 0, 0

    def available(self):
        return self.free

    def in_use(self):
        return self.used

    def start(self):
        self.high = self.used

    def peak(self):
        return self.high


def fake_run(cost, *, rows=2048, calls=4, available=None, per_row=0, **options):
    """``calls`` forward calls of ``rows`` rows through a search whose time per sample is
    ``cost(chunk)``; returns the AutoChunks and every chunk size the fake model saw."""
    clock = FakeClock()
    probe = FakeProbe(available, per_row)
    chunks = AutoChunks(clock=clock, probe=lambda device: probe, **options)
    seen = []
    model = torch.nn.Linear(1, 1)

    def forward(start, stop):
        n = stop - start
        seen.append(n)
        clock.now += n * cost(n)
        probe.high = max(probe.high, probe.used + n * per_row)
        return {"out": torch.arange(start, stop)}

    for _ in range(calls):
        parts = run_in_chunks(forward, rows, chunks=chunks, size=8192, model=model, device=CPU)
        assert torch.equal(torch.cat([p["out"] for p in parts]), torch.arange(rows))  # every row once, in order
    return chunks, seen


def u_shaped(best):
    """Time per sample falling 20 % per doubling up to ``best``, rising 30 % per doubling after it."""
    return lambda n: 0.8 ** min(math.log2(n), math.log2(best)) * 1.3 ** max(0.0, math.log2(n / best))


def test_a_model_slower_at_64_than_at_32_is_searched_downwards():
    chunks, seen = fake_run(u_shaped(8), calls=3)
    search = only(chunks)
    assert search.chosen == 8 and search.stop_reason == "smaller no faster"
    assert sorted(search.trials) == [4, 8, 16, 32, 64]


def figures(result) -> list[dict]:
    """The result's rows less what is not a figure (the time taken, the settings' hash)."""
    return [{k: v for k, v in row.items() if k not in ("seconds", "config_hash")} for row in result.rows()]


def only(chunks: AutoChunks) -> ChunkSearch:
    (search,) = chunks.searches.values()
    return search


@pytest.mark.parametrize("best", [4, 32, 256, 1024])
def test_the_search_finds_the_fastest_size_and_keeps_it(best):
    chunks, seen = fake_run(u_shaped(best), calls=6)
    search = only(chunks)
    assert search.chosen == best
    # Doubling stops at the first size that is slower: nothing beyond 2·best was ever run.
    assert max(seen) <= max(64, 2 * best)
    assert seen[-(2048 // best):] == [best] * (2048 // best)  # the last call: every chunk at the choice


def test_a_flat_curve_takes_the_smallest_size_and_stops_early():
    """Doubling that does not pay (≤ 5 %) is not pursued: the smaller size wins the tie (less memory)."""
    chunks, seen = fake_run(lambda n: 1.0 + 1e-3 * math.log2(n))
    assert only(chunks).chosen == 32
    assert max(seen) == 64  # 64 was tried (2 % slower) and nothing larger


def test_no_size_beyond_the_memory_budget_is_tried():
    per_row = 1_000_000
    budget_rows = 300  # half of the available memory holds 300 rows; a size is tried if twice it fits
    chunks, seen = fake_run(u_shaped(4096), available=2 * budget_rows * per_row, per_row=per_row, rows=8192, calls=3)
    search = only(chunks)
    assert search.stop_reason == "memory budget"
    assert max(seen) * 2 <= budget_rows
    assert search.chosen == 128  # the largest power of two with 2·size ≤ 300
    assert search.report()["budget_bytes"] == budget_rows * per_row


def test_chunks_never_exceed_the_largest_forward_call():
    chunks, seen = fake_run(u_shaped(8192), rows=512)
    assert only(chunks).chosen == 512 and only(chunks).stop_reason == "largest forward call"
    assert max(seen) == 512


def test_a_given_size_is_used_as_given_and_its_out_of_memory_is_raised():
    fixed = FixedChunks(100)
    assert [fixed.next_size(r)[0] for r in (250, 150, 50)] == [100, 100, 50]
    with pytest.raises(torch.OutOfMemoryError):
        fixed.out_of_memory(100, torch.OutOfMemoryError("CUDA out of memory"))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
                                   MemoryError()])
def test_allocation_failures_are_recognised(error):
    assert is_out_of_memory(error)


def test_other_errors_are_not_taken_for_out_of_memory():
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error type


class RefusesLargeChunks(torch.nn.Module):
    """``LinearMap`` that fails to allocate (as torch would) for more than ``limit`` rows."""

    def __init__(self, matrix, limit, error):
        super().__init__()
        self.inner = LinearMap(matrix)
        self.limit, self.error, self.refused = limit, error, []

    def forward(self, pos):
        if pos.shape[0] > self.limit:
            self.refused.append(pos.shape[0])
            raise self.error
        return self.inner(pos)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (simulated)"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")])
def test_out_of_memory_on_the_first_trial_halves_the_chunk_and_the_numbers_are_right(error):
    matrix = random_matrix()
    data = vectors(96)
    model = RefusesLargeChunks(matrix.clone(), limit=13, error=error).double()
    auditor = equiaudit.Auditor(data, **VECTORS)
    result = auditor(model)  # nothing fails
    assert model.refused[0] == 32  # the first chunk (the warm-up at 32) was refused ...
    search = only(auditor.plan(model).spec.chunks)
    assert search.cap <= 13 and search.out_of_memory_at[:2] == [32, 16]  # ... halved to 16, refused, then 8
    reference = equiaudit.audit(LinearMap(matrix).double(), data, chunk_size=96 * 16, **VECTORS)
    assert figures(result) == figures(reference)  # the same numbers, to the last digit
    assert result.total.rel_equiv_error == pytest.approx(linear_map_ree(matrix), rel=0.1)  # and the known answer
    later = auditor(model)  # the next audit starts at the reduced size: nothing refused again
    assert len(model.refused) == len(search.out_of_memory_at) and figures(later) == figures(result)


def test_one_row_that_does_not_fit_fails_the_audit():
    model = RefusesLargeChunks(random_matrix(), limit=0, error=torch.OutOfMemoryError("simulated")).double()
    with pytest.raises(torch.OutOfMemoryError):
        equiaudit.audit(model, vectors(8), **VECTORS)


def vectors(n, atoms=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, atoms, 3, generator=g, dtype=torch.float64)
    return {"pos": pos, "y": pos.clone()}


def test_results_are_identical_whatever_the_chunk_size():
    """A float32 transformer: every figure of every row, floor included, is the same at any
    even chunk size and at auto. (An odd number of rows per matmul, 1, 3 or 7, moves the
    model's own float32 outputs in the last bits: CPU GEMM kernels tile rows in pairs; the
    engine adds nothing to that.)"""
    torch.manual_seed(0)
    model = transformer_force_field(hidden=32, layers=1, heads=2)
    data = molecule_clouds(32, atoms=6)
    g = torch.Generator().manual_seed(1)
    data.update(energy=torch.randn(32, generator=g, dtype=torch.float64),
                forces=torch.randn(32, 6, 3, generator=g, dtype=torch.float64))
    settings = dict(task="force_field", rotations=8, seed=0, device="cpu", bootstrap=100, batch_size=16)
    rows = {size: figures(equiaudit.audit(model, data, chunk_size=size, **settings)) for size in (8, 24, 8192, "auto")}
    reference = rows.pop(8192)
    assert reference[0]["rel_equiv_error"] > 1e-3  # a non-equivariant model: a figure with digits to compare
    for size, found in rows.items():
        assert found == reference, size
    # The negative control of the comparison itself: another seed changes the figures.
    other = figures(equiaudit.audit(model, data, chunk_size=64, **{**settings, "seed": 1}))
    assert other[0]["rel_equiv_error"] != reference[0]["rel_equiv_error"]


def test_the_choice_is_made_once_per_auditor_and_kept():
    torch.manual_seed(0)
    model = transformer_force_field(hidden=16, layers=1, heads=2)
    data = molecule_clouds(320, atoms=5)  # 5 batches of 64 × 16 rows: room for every trial up to 1024 twice
    data.update(energy=torch.zeros(320, dtype=torch.float64), forces=torch.zeros(320, 5, 3, dtype=torch.float64))
    auditor = equiaudit.Auditor(data, task="force_field", rotations=16, seed=0, device="cpu", bootstrap=0, float_floor=False)
    auditor(model)
    search = only(auditor.plan(model).spec.chunks)
    assert search.chosen is not None
    searched, trials = search.rows_searched, json.dumps(search.report())
    with torch.no_grad():  # a training step later: other weights, same architecture
        for p in model.parameters():
            p.add_(0.01)
    auditor(model)
    assert search.rows_searched == searched and json.dumps(search.report()) == trials
    report = auditor.plan(model).chunking
    assert report["mode"] == "auto" and report["searches"][0]["pass"] == "forward"
    assert report["chunk_size"] == search.chosen in {t["size"] for t in report["searches"][0]["trials"]}


def test_differentiable_passes_have_a_search_and_budget_of_their_own():
    torch.manual_seed(0)
    model = transformer_force_field(hidden=16, layers=1, heads=2)
    data = molecule_clouds(16, atoms=5)
    data.update(energy=torch.zeros(16, dtype=torch.float64), forces=torch.zeros(16, 5, 3, dtype=torch.float64))
    auditor = equiaudit.Auditor(data, task="force_field", rotations=8, seed=0, device="cpu", bootstrap=0,
                                dynamics={"gradients": True, "twirl": False})
    result = auditor(model)
    assert result.dynamics
    # The orbit pass keeps its graph for the gradient split; the float floor's pass does not.
    searches = auditor.plan(model).spec.chunks.searches
    assert sorted(kind for _, kind, _ in searches) == ["backward", "forward"]
    assert len({id(s) for s in searches.values()}) == 2


def test_chunk_size_setting():
    config = equiaudit.api.settings(task="custom")
    assert config.chunk_size == "auto"
    assert equiaudit.api.settings(task="custom", chunk_size=64).chunk_size == 64
    for bad in (0, -3, "fast", True, 2.5):
        with pytest.raises(ConfigError, match="chunk_size"):
            equiaudit.api.settings(task="custom", chunk_size=bad)


class Linear(torch.nn.Module):
    """``x @ Aᵀ`` for the CLI test's factory."""

    def __init__(self):
        super().__init__()
        self.matrix = torch.nn.Parameter(torch.eye(3))

    def forward(self, pos):
        return pos @ self.matrix.T


@pytest.mark.parametrize("chunk_size", ["auto", 100])
def test_the_cli_says_the_chunk_size_and_run_json_records_why(tmp_path, chunk_size):
    import textwrap

    import numpy as np
    from typer.testing import CliRunner

    from equiaudit.cli.main import app

    data = vectors(256)
    np.savez(tmp_path / "data.npz", pos=data["pos"].numpy(), y=data["y"].numpy())
    (tmp_path / "run").mkdir()
    torch.save(Linear().state_dict(), tmp_path / "run" / "step_000100.pt")
    line = "" if chunk_size == "auto" else f"chunk_size: {chunk_size}\n"
    (tmp_path / "config.yaml").write_text(textwrap.dedent(f"""\
        task: custom
        model: {{factory: "{__file__}:Linear", inputs: [pos], outputs: [out]}}
        data: {{path: {tmp_path / 'data.npz'}}}
        fields: {{pos: vector}}
        heads: {{out: {{rep: vector, target: y, loss: mse}}}}
        group: {{name: so3, rotations: 24}}
        bootstrap: 0
        """) + line)
    cli = CliRunner().invoke(app, ["--debug", "audit", str(tmp_path / "config.yaml"), str(tmp_path / "run"),
                                   "--out", str(tmp_path / "out"), "--no-plot", "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    output = " ".join(cli.output.split())  # the terminal wraps long lines
    chunking = json.loads((tmp_path / "out" / "run.json").read_text())["chunking"]
    if chunk_size == "auto":
        assert "chunk_size auto (measured on the first checkpoint)" in output  # the banner
        (search,) = chunking["searches"]
        assert search["decided"] and chunking["chunk_size"] == search["chunk_size"]
        assert f"chunk_size auto → {search['chunk_size']} rotated samples per forward" in output  # the decision
        assert '"trials": [{"size": 32' in cli.output  # --debug: every trial
        assert all(len(t["seconds_per_sample"]) == 2 for t in search["trials"])
    else:
        assert "chunk_size 100" in output and "chunk_size auto" not in output
        assert chunking == {"mode": "fixed", "chunk_size": 100}

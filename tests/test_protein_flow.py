"""The protein_flow preset on real structures: Proteina's conventions, EGNN at the floor at every
fixed t, a non-equivariant transformer caught, the linear-map closed form on Cα coordinates, breakdowns."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("gemmi")

import equiaudit  # noqa: E402
from equiaudit.api import settings  # noqa: E402
from equiaudit.io.data import load_dataset  # noqa: E402
from equiaudit.plan import resolve  # noqa: E402
from equiaudit.tasks.protein_flow import PROTEINA_TIMES  # noqa: E402
from equiaudit.zoo import egnn_velocity, transformer_velocity  # noqa: E402
from helpers import LinearMap, linear_map_ree, random_matrix  # noqa: E402

DATA = Path(__file__).parent / "data" / "structures"
SMALL = {"max_residues": 24}  # the EGNN's pairs grow as L²: keep the tests fast


def test_preset_conventions():
    config = settings(task="protein_flow", data=SMALL)
    assert config.data.structures["units"] == "nm" and config.data.structures["atoms"] == "CA"
    data = load_dataset(DATA, structures=config.data.structures)
    angstrom = load_dataset(DATA, structures={**SMALL, "units": "angstrom"})
    assert torch.allclose(data["pos"] * 10, angstrom["pos"], rtol=1e-15, atol=0)
    plan = resolve(config, data, device="cpu")
    assert plan.spec.inputs == ["x_t", "t", "residue", "mask"] or tuple(plan.spec.inputs) == ("x_t", "t", "residue", "mask")
    prepared = plan.prepare(data).data
    times = len(PROTEINA_TIMES)
    assert prepared["t"].shape == (4 * times,) and prepared["t"][:times].tolist() == pytest.approx(list(PROTEINA_TIMES))
    mask = prepared["mask"][..., None].double()
    x0, x1, t = prepared["x0"], prepared["x1"], prepared["t"][:, None, None]
    for centred in (x0, x1):
        assert ((centred * mask).sum(1) / mask.sum(1)).abs().max() < 1e-12
    assert torch.allclose(prepared["x_t"], (1 - t) * x0 + t * x1) and torch.allclose(prepared["velocity"], x1 - x0)
    assert torch.equal(x0[:times], x0[:1].expand(times, -1, -1))  # one noise per structure at every t
    sampled = resolve(settings(task="protein_flow", data=SMALL, flow={"t": None}), data, device="cpu").prepare(data).data
    assert sampled["t"].shape == (4,)


def _audit(model, **options):
    return equiaudit.audit(model, str(DATA), config={"data": SMALL}, task="protein_flow", rotations=8, seed=0, device="cpu",
                           bootstrap=0, breakdown={"by": []}, **options)


def test_egnn_reads_at_float_floor_at_every_fixed_t():
    torch.manual_seed(0)
    result = _audit(egnn_velocity(hidden=16, layers=2, n_species=21))
    head = result.heads["velocity"]
    assert head.loss_aug > 0.1 and head.rel_equiv_error <= 10 * head.float_floor
    rows = [r for r in result.breakdown if r["by"] == "t" and r["head"] == "velocity"]
    assert [float(r["bin"]) for r in rows] == list(PROTEINA_TIMES)
    assert all(r["rel_equiv_error"] <= 10 * head.float_floor for r in rows)


def test_transformer_is_caught_with_breakdowns():
    torch.manual_seed(0)
    result = _audit(transformer_velocity(hidden=16, layers=1, heads=2, n_species=21))
    head = result.heads["velocity"]
    assert head.rel_equiv_error > 1e-3 and head.flag != "at_float_floor"
    by = {}
    for row in result.breakdown:
        if row["head"] == "velocity":
            by.setdefault(row["by"], []).append(row)
    assert {"t", "residue", "position", "length"} <= set(by)
    # every split's bins add up to the head's figure (weights and shares as documented)
    for split in ("residue", "position", "length", "t"):
        rows = by[split]
        assert sum(r["weight"] for r in rows) == pytest.approx(1.0)
        assert sum(r["weight"] * r["equiv_error"] for r in rows) == pytest.approx(head.equiv_error, rel=1e-9)
    assert {r["bin"] for r in by["length"]} == {"23", "24"}
    assert "M" in {r["bin"] for r in by["residue"]}  # 1A8O's MSE is read as MET


def test_linear_map_closed_form_on_protein_coordinates():
    matrix = random_matrix(seed=4, scale=0.4)
    data = load_dataset(DATA, structures={"units": "nm"})
    data = {"pos": data["pos"].repeat(16, 1, 1), "mask": data["mask"].repeat(16, 1)}
    result = equiaudit.audit(LinearMap(matrix), data, task="custom", fields={"pos": "vector"},
                             heads={"out": {"rep": "vector", "target": "pos"}}, inputs=["pos"], outputs=["out"],
                             rotations=32, seed=0, device="cpu", bootstrap=0, dtype="float64")
    assert result.heads["out"].rel_equiv_error == pytest.approx(linear_map_ree(matrix), rel=0.05)


def test_malformed_file_is_listed_and_the_others_audited(tmp_path, capfd):
    import shutil

    for name in ("3JQH.cif.gz", "1A8O.pdb.gz"):
        shutil.copy(DATA / name, tmp_path)
    (tmp_path / "broken.pdb").write_text("HEADER    NOT REALLY A STRUCTURE\nATOM  garbage\n")
    torch.manual_seed(0)
    result = equiaudit.audit(transformer_velocity(hidden=8, layers=1, heads=2, n_species=21), str(tmp_path),
                             config={"data": SMALL}, task="protein_flow", rotations=4, seed=0, device="cpu", bootstrap=0)
    assert result.status == "ok" and result.total.n_samples == 2
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("equiaudit: skipped")]
    assert len(lines) == 1 and "broken.pdb" in lines[0]
    with pytest.raises(equiaudit.DataError, match="broken.pdb"):
        equiaudit.audit(transformer_velocity(hidden=8, layers=1, heads=2, n_species=21), str(tmp_path),
                        config={"data": {**SMALL, "strict": True}}, task="protein_flow", rotations=4, device="cpu")

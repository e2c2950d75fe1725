"""Dataset loading: formats, key mapping, padding masks, subsets and clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from equiaudit.errors import DataError
from equiaudit.io.data import load_dataset, save_npz

N, A = 5, 3


def _rmd17_arrays(n=N, a=A, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "nuclear_charges": np.array([6, 1, 8][:a], dtype=np.uint8),
        "coords": rng.normal(size=(n, a, 3)).astype(np.float32),
        "energies": rng.normal(size=n),
        "forces": rng.normal(size=(n, a, 3)),
    }


@pytest.fixture
def rmd17(tmp_path):
    path = tmp_path / "data" / "rmd17.npz"
    arrays = _rmd17_arrays()
    save_npz(path, arrays)
    return path, arrays


def _check_canonical(data, n=N, a=A):
    assert data["pos"].shape == (n, a, 3) and data["pos"].dtype == torch.float64
    assert data["z"].shape == (n, a) and data["z"].dtype == torch.int64
    assert data["energy"].shape == (n,) and data["energy"].dtype == torch.float64
    assert data["forces"].shape == (n, a, 3) and data["forces"].dtype == torch.float64
    assert data["mask"].shape == (n, a) and data["mask"].dtype == torch.bool


# ----------------------------------------------------------------------------- formats


def test_save_npz_is_atomic_and_creates_parent(rmd17):
    path, _ = rmd17
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert sorted(np.load(path, allow_pickle=False).files) == ["coords", "energies", "forces", "nuclear_charges"]


def test_revised_md17_autodetect(rmd17):
    path, arrays = rmd17
    data = load_dataset(path)
    assert set(data) == {"pos", "z", "energy", "forces", "mask"}
    _check_canonical(data)
    assert data["z"].tolist() == [[6, 1, 8]] * N  # (A,) broadcast to (N, A)
    assert data["mask"].all()
    torch.testing.assert_close(data["pos"], torch.from_numpy(arrays["coords"]).double())
    torch.testing.assert_close(data["energy"], torch.from_numpy(arrays["energies"]))


def test_original_md17_autodetect_squeezes_energy(tmp_path):
    a = _rmd17_arrays()
    path = tmp_path / "md17.npz"
    # Original MD17 files also hold string metadata; it must be skipped, not fail.
    np.savez(path, z=a["nuclear_charges"], R=a["coords"], E=a["energies"][:, None], F=a["forces"],
             name=np.array("aspirin"), theory=np.array("PBE+vdW-TS"))
    data = load_dataset(path)
    assert set(data) == {"pos", "z", "energy", "forces", "mask"}
    _check_canonical(data)
    torch.testing.assert_close(data["energy"], torch.from_numpy(a["energies"]))


def test_generic_npz_passes_arrays_through(tmp_path):
    path = tmp_path / "grids.npz"
    grids = np.random.default_rng(0).normal(size=(4, 2, 6, 6, 6)).astype(np.float32)
    save_npz(path, {"density": grids, "label": np.arange(4, dtype=np.int32), "flag": np.ones(4, bool)})
    data = load_dataset(path)
    assert set(data) == {"density", "label", "flag"}  # no atoms: no mask
    assert data["density"].shape == (4, 2, 6, 6, 6) and data["density"].dtype == torch.float64
    assert data["label"].dtype == torch.int64 and data["flag"].dtype == torch.bool


def test_safetensors(tmp_path):
    path = tmp_path / "d.safetensors"
    pos = torch.randn(N, A, 3, dtype=torch.float32)
    save_file({"pos": pos, "z": torch.tensor([[1, 6, 0]] * N, dtype=torch.int32),
               "energy": torch.randn(N)}, str(path))
    data = load_dataset(path)
    assert data["pos"].dtype == torch.float64 and data["z"].dtype == torch.int64
    assert data["mask"].tolist() == [[True, True, False]] * N
    torch.testing.assert_close(data["pos"][:, :2], pos[:, :2].double())


def test_pt_dict_of_tensors(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"positions": torch.randn(N, A, 3), "numbers": torch.tensor([1, 1, 8]), "note": "metadata"}, path)
    data = load_dataset(path, keys={"pos": "positions", "z": "numbers"})
    assert set(data) == {"pos", "z", "mask"}
    assert data["z"].shape == (N, A)


# ----------------------------------------------------------------------------- keys


def test_keys_mapping_with_extra_canonical_fields(rmd17):
    path, _ = rmd17
    # Only pos is mapped explicitly; z/energy/forces come from the recognised layout.
    data = load_dataset(path, keys={"pos": "coords"})
    _check_canonical(data)
    # Mapping a file key under a custom name does not also load it as its canonical field.
    data = load_dataset(path, keys={"e_ref": "energies"})
    assert "e_ref" in data and "energy" not in data and "pos" in data


def test_keys_mapping_on_generic_file_loads_only_mapped_and_canonical(tmp_path):
    path = tmp_path / "d.npz"
    save_npz(path, {"xyz": np.zeros((N, A, 3)), "forces": np.ones((N, A, 3)), "junk": np.zeros(7)})
    data = load_dataset(path, keys={"pos": "xyz"})
    assert set(data) == {"pos", "forces", "mask"}  # 'junk' (another size) is not loaded


def test_missing_key_lists_available_keys(tmp_path):
    a = _rmd17_arrays()
    path = tmp_path / "aspirin.npz"
    save_npz(path, {"z": a["nuclear_charges"], "R": a["coords"], "E": a["energies"], "F": a["forces"]})
    with pytest.raises(DataError) as err:
        load_dataset(path, keys={"pos": "coords"})
    assert str(err.value) == f"{path} has no key 'coords' (mapped from 'pos'); keys in the file: E, F, R, z"


def test_bad_keys_value(rmd17):
    with pytest.raises(DataError, match="field 'pos'"):
        load_dataset(rmd17[0], keys={"pos": None})


# ---------------------------------------------------------------------- padding & masks


def test_mask_derived_from_zero_atomic_numbers(tmp_path):
    z = np.array([[8, 1, 1], [8, 1, 0], [6, 0, 0]])
    pos = np.ones((3, 3, 3))
    path = tmp_path / "pad.npz"
    save_npz(path, {"pos": pos, "z": z, "forces": pos.copy(), "energy": np.zeros(3)})
    data = load_dataset(path)
    assert data["mask"].tolist() == (z > 0).tolist()
    assert data["pos"].sum((-1, -2)).tolist() == [9.0, 6.0, 3.0]  # padded atoms zeroed
    assert data["forces"][~data["mask"]].abs().sum() == 0


def test_mask_from_file_wins(tmp_path):
    path = tmp_path / "pad.npz"
    mask = np.array([[1, 1, 0]] * N, dtype=np.uint8)  # numeric masks become bool
    save_npz(path, {"pos": np.ones((N, A, 3)), "z": np.array([1, 1, 1]), "mask": mask})
    data = load_dataset(path)
    assert data["mask"].dtype == torch.bool and data["mask"].tolist() == [[True, True, False]] * N
    assert data["pos"][:, 2].abs().sum() == 0 and data["z"][:, 2].abs().sum() == 0


def test_float_atomic_numbers_become_int(tmp_path):
    path = tmp_path / "d.npz"
    save_npz(path, {"pos": np.zeros((N, A, 3)), "z": np.array([6.0, 1.0, 0.0])})
    data = load_dataset(path)
    assert data["z"].dtype == torch.int64 and data["mask"].tolist() == [[True, True, False]] * N
    save_npz(path, {"pos": np.zeros((N, A, 3)), "z": np.array([6.5, 1.0, 0.0])})
    with pytest.raises(DataError, match="whole atomic numbers"):
        load_dataset(path)


def test_mask_from_n_atoms(tmp_path):
    path = tmp_path / "obj.npz"
    save_npz(path, {"pos": np.ones((3, 4, 3)), "n_atoms": np.array([4, 2, 1])})
    data = load_dataset(path)
    assert data["mask"].sum(1).tolist() == [4, 2, 1]


# --------------------------------------------------------------------------- subsets


def test_samples_first_and_seeded_subset(rmd17):
    path, arrays = rmd17
    first = load_dataset(path, samples=2)
    torch.testing.assert_close(first["energy"], torch.from_numpy(arrays["energies"][:2]))

    a = load_dataset(path, samples=3, subset_seed=7)
    b = load_dataset(path, samples=3, subset_seed=7)
    torch.testing.assert_close(a["pos"], b["pos"])
    full = torch.from_numpy(arrays["energies"])
    index = [int((full == e).nonzero()) for e in a["energy"]]
    assert index == sorted(index) and len(set(index)) == 3

    assert load_dataset(path, samples=10_000)["pos"].shape[0] == N  # more than available: all


def test_bad_samples(rmd17):
    with pytest.raises(DataError, match="samples must be a positive integer"):
        load_dataset(rmd17[0], samples=0)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="data file not found: .*nope.npz"):
        load_dataset(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported data format"):
        load_dataset(path)


@pytest.mark.parametrize("content", [b"this is not a zip file", b"PK\x03\x04 truncated"])
def test_corrupt_npz(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="cannot read .*bad.npz as .npz") as err:
        load_dataset(path)
    assert "\n" not in str(err.value) and "allow_pickle" not in str(err.value)  # never advise unpickling


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(path)


def test_inconsistent_sample_counts(tmp_path):
    path = tmp_path / "d.npz"
    save_npz(path, {"pos": np.zeros((N, A, 3)), "energy": np.zeros(N - 1)})
    with pytest.raises(DataError, match=r"pos: 5, energy: 4"):
        load_dataset(path)


def test_object_array_mapped_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, pos=np.zeros((N, A, 3)), z=np.array([{"a": 1}] * N, dtype=object))
    with pytest.raises(DataError, match="key 'z'.*not a numeric array"):
        load_dataset(path, keys={"pos": "pos", "z": "z"})
    assert set(load_dataset(path)) == {"pos", "mask"}  # unmapped: skipped, never unpickled


class Custom:
    pass


class _Payload:
    """Unpickling this would run code (touch a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_pt_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"pos": torch.zeros(N, A, 3), "x": _Payload(marker)}, path)
    with pytest.raises(DataError, match="refused for safety"):
        load_dataset(path)
    assert not marker.exists()

    path = tmp_path / "custom.pt"
    torch.save({"pos": torch.zeros(N, A, 3), "meta": Custom()}, path)
    with pytest.raises(DataError, match="refused for safety"):
        load_dataset(path)


def test_corrupt_pt(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read .*bad.pt as a torch file"):
        load_dataset(path)


def test_pt_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(DataError, match="expected a dict of tensors"):
        load_dataset(path)


# ----------------------------------------------------------------------------- extxyz

_EXTXYZ = """3
Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.5 REF_energy=2.0 pbc="F F F"
O 0.0 0.0 0.0 0.1 0.2 0.3
H 1.0 0.0 0.0 0.0 0.0 0.0
H 0.0 1.0 0.0 0.0 0.0 0.0
2
Properties=species:S:1:pos:R:3:forces:R:3 energy=-0.5 REF_energy=3.0 pbc="F F F"
H 0.0 0.0 0.0 1.0 0.0 0.0
H 0.7 0.0 0.0 -1.0 0.0 0.0
"""


def test_extxyz_needs_ase(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ase", None)  # makes `import ase...` raise ImportError
    monkeypatch.setitem(sys.modules, "ase.io", None)
    path = tmp_path / "d.extxyz"
    path.write_text(_EXTXYZ)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert str(err.value) == "reading extxyz needs ASE: pip install 'equiaudit[ase]'"


def test_extxyz_with_ase(tmp_path):
    pytest.importorskip("ase")
    path = tmp_path / "d.extxyz"
    path.write_text(_EXTXYZ)
    data = load_dataset(path)
    _check_canonical(data, n=2, a=3)
    assert data["z"].tolist() == [[8, 1, 1], [1, 1, 0]]
    assert data["mask"].tolist() == [[True, True, True], [True, True, False]]
    assert data["energy"].tolist() == [-1.5, -0.5]
    assert data["forces"][1, 0].tolist() == [1.0, 0.0, 0.0]
    assert data["pos"][1, 2].abs().sum() == 0
    # Per-frame info entries can be mapped with keys.
    data = load_dataset(path, keys={"energy": "REF_energy"})
    assert data["energy"].tolist() == [2.0, 3.0]

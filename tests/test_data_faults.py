"""Issue 11: data faults that used to pass as results (or be blamed on the model) are
refused at load time, with one line naming the file, the field, the sample's index in
the file and what is allowed. The same checks apply to in-memory arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equiaudit.errors import DataError
from equiaudit.io.data import VALUE_LIMIT, subset_index, canonical_dataset, load_dataset, save_npz

N, A = 10, 3


def _rmd17(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "nuclear_charges": np.array([8, 1, 1]),
        "coords": rng.normal(size=(n, A, 3)),
        "energies": rng.normal(size=n),
        "forces": rng.normal(size=(n, A, 3)),
    }


def _refused(path, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load_dataset(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "key, value, shown",
    [("forces", np.nan, "NaN"), ("forces", np.inf, "inf"), ("forces", 1e200, "1e+200"),
     ("energies", np.nan, "NaN"), ("energies", -np.inf, "-inf"), ("energies", 1e200, "1e+200")],
)
def test_bad_targets_are_refused_with_sample_index(tmp_path, key, value, shown):
    """Reported `ok` with an empty REE or a false 0 % before."""
    arrays = _rmd17()
    if key == "forces":
        arrays[key][7, 2, 1] = value
    else:
        arrays[key][7] = value
    path = tmp_path / "rmd17.npz"
    save_npz(path, arrays)
    message = _refused(path)
    field = "'forces'" if key == "forces" else "'energy' (from 'energies')"
    assert message.startswith(f"{path}: {field} is {shown} at sample 7 (its index in the file)")
    assert ("atom 2" in message) == (key == "forces")
    assert "must be finite" in message and "overflow" in message


def test_index_named_is_the_index_in_the_file(tmp_path):
    arrays = _rmd17(n=40)
    arrays["forces"][23, 0, 0] = np.nan
    path = tmp_path / "rmd17.npz"
    save_npz(path, arrays)
    # A subset that holds sample 23 names 23 (not its position in the subset) ...
    with_23 = next(s for s in range(200) if 23 in subset_index(40, 10, s).tolist())
    assert "at sample 23 (its index in the file)" in _refused(path, samples=10, subset_seed=with_23)
    # ... and one without it is fine: only the samples kept are audited, so only they are checked.
    without = next(s for s in range(200) if 23 not in subset_index(40, 10, s).tolist())
    assert load_dataset(path, samples=10, subset_seed=without)["forces"].isfinite().all()


def test_nan_position_is_blamed_on_the_data(tmp_path):
    """One NaN position made every checkpoint fail as 'the model returned NaN'."""
    arrays = _rmd17()
    arrays["coords"][4, 1, 2] = np.nan
    path = tmp_path / "rmd17.npz"
    save_npz(path, arrays)
    assert _refused(path).startswith(f"{path}: 'pos' (from 'coords') is NaN at sample 4 (its index in the file), atom 1")


def test_bad_values_at_padded_atoms_are_ignored(tmp_path):
    pos = np.ones((3, 3, 3))
    forces = np.ones((3, 3, 3))
    pos[1, 2] = np.nan  # atom 2 of sample 1 is padding (z = 0)
    forces[2, 1:] = np.inf
    z = np.array([[8, 1, 1], [8, 1, 0], [6, 0, 0]])
    path = tmp_path / "pad.npz"
    save_npz(path, {"pos": pos, "z": z, "forces": forces, "energy": np.zeros(3)})
    data = load_dataset(path)
    assert data["pos"].isfinite().all() and data["forces"].isfinite().all()
    assert data["pos"][1, 2].abs().sum() == 0


def test_negative_atomic_number_is_an_error(tmp_path):
    """z = -3 was silently treated as padding."""
    path = tmp_path / "neg.npz"
    z = np.array([[8, 1, 1], [8, -3, 1]])
    save_npz(path, {"pos": np.zeros((2, 3, 3)), "z": z})
    message = _refused(path)
    assert message.startswith(f"{path}: 'z' is -3 at sample 1 (its index in the file), atom 1")
    assert "atomic numbers must be positive (0 marks padding)" in message
    # Where the file's mask already marks the atom as padding, its value does not matter.
    save_npz(path, {"pos": np.zeros((2, 3, 3)), "z": z, "mask": z > 0})
    assert load_dataset(path)["z"][1].tolist() == [8, 0, 1]


def test_rmd17_like_file_without_coords_names_the_key(tmp_path):
    """Lacking its positions, the file loaded as a generic one and a head was blamed."""
    arrays = _rmd17()
    del arrays["coords"]
    path = tmp_path / "aspirin.npz"
    save_npz(path, arrays)
    message = _refused(path)
    assert message == (
        f"{path} looks like a revised MD17 file (nuclear_charges, energies, forces) but has no 'coords' "
        "(positions); add it, or map 'pos' to another key with data.keys"
    )
    arrays["xyz"] = _rmd17()["coords"]
    save_npz(path, arrays)
    data = load_dataset(path, keys={"pos": "xyz"})  # mapped: the rest of the layout still applies
    assert set(data) == {"pos", "z", "energy", "forces", "mask"}


def test_md17_like_file_without_atom_types_names_the_key(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "md17.npz"
    save_npz(path, {"R": rng.normal(size=(N, A, 3)), "E": rng.normal(size=(N, 1)), "F": rng.normal(size=(N, A, 3))})
    assert "looks like a MD17 file (R, E, F) but has no 'z' (atomic numbers)" in _refused(path)


def test_value_limit_is_where_squares_stay_finite():
    assert np.isfinite(np.float64(VALUE_LIMIT) ** 2 * 1e8)
    ok = canonical_dataset({"pos": np.zeros((2, 1, 3)), "energy": np.array([VALUE_LIMIT, -VALUE_LIMIT])})
    assert ok["energy"].abs().max() == VALUE_LIMIT


def test_in_memory_arrays_get_the_same_checks():
    forces = torch.zeros(4, 2, 3)
    forces[2, 0, 1] = float("nan")
    with pytest.raises(DataError) as err:
        canonical_dataset({"pos": torch.zeros(4, 2, 3), "z": torch.ones(4, 2), "forces": forces})
    assert str(err.value).startswith("data: 'forces' is NaN at sample 2, atom 0")
    with pytest.raises(DataError, match="'z' is -1 at sample 0, atom 1"):
        canonical_dataset({"pos": torch.zeros(1, 2, 3), "z": torch.tensor([[1, -1]])}, origin="data")
    with pytest.raises(DataError, match=r"^arrays: 'density' is inf at sample 1; .*leave it out with data.keys"):
        grids = torch.zeros(2, 1, 4, 4, 4)
        grids[1, 0, 3, 3, 3] = float("inf")
        canonical_dataset({"density": grids}, origin="arrays")


def test_checks_are_vectorised_over_many_samples():
    """No Python loop over samples: a large dataset is checked in well under a second."""
    import time

    pos = torch.randn(200_000, 8, 3)
    start = time.perf_counter()
    canonical_dataset({"pos": pos, "z": torch.ones(200_000, 8, dtype=torch.int64), "forces": pos.clone(),
                       "energy": torch.randn(200_000)})
    assert time.perf_counter() - start < 5.0  # measured ~0.1 s; a per-sample loop takes seconds


# ------------------------------------------------------------- the new formats, alike


def test_spice_nan_gradient_names_molecule_and_conformation(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "spice.hdf5"
    with h5py.File(path, "w") as f:
        for name, n_conf in (("a", 2), ("b", 3)):
            g = f.create_group(name)
            g["atomic_numbers"] = np.array([8, 1, 1])
            g["conformations"] = np.zeros((n_conf, 3, 3))
            g["dft_total_energy"] = np.zeros(n_conf)
            gradient = np.zeros((n_conf, 3, 3))
            if name == "b":
                gradient[1, 2, 0] = np.nan
            g["dft_total_gradient"] = gradient
    message = _refused(path)
    assert message.startswith(
        f"{path}: 'forces' (from '-dft_total_gradient') is NaN at sample 3 "
        "(its index in the file; molecule 'b' conformation 1), atom 2"
    )


def test_ase_db_inf_energy_names_the_row(tmp_path):
    pytest.importorskip("ase")
    import ase.db
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    path = tmp_path / "m.db"
    db = ase.db.connect(str(path))
    for energy in (0.0, 1.0, float("inf")):
        atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])
        atoms.calc = SinglePointCalculator(atoms, energy=energy)
        db.write(atoms)
    assert _refused(path).startswith(f"{path}: 'energy' is inf at sample 2 (its index in the file; row id 3)")


def test_a_torch_data_file_with_non_string_keys_is_refused_without_stringifying_them(tmp_path):
    import torch

    torch.save({0: torch.zeros(3, 2, 3), "z": torch.ones(3, 2)}, tmp_path / "ints.pt")
    with pytest.raises(DataError, match=r"keys must be field names \(strings\); found a int key"):
        load_dataset(tmp_path / "ints.pt")


@pytest.mark.parametrize("name", ["data.npz", "data.safetensors", "data.pt", "data.xyz", "data.h5", "data.db"])
def test_a_fifo_named_like_data_is_refused_without_opening_it(tmp_path, name):
    import os

    path = tmp_path / name
    try:
        os.mkfifo(path)
    except (AttributeError, OSError):
        pytest.skip("no FIFOs here")
    with pytest.raises(DataError, match="a FIFO, not a regular file: not opened"):
        load_dataset(path)  # (opening it would block forever)

"""ASE databases, HDF5 (SPICE layout and flat) and PyTorch Geometric datasets, written
here by the real libraries and read back: values, padding, masks, subsets, indices,
missing extras, and pickles / hostile metadata that must never run."""

from __future__ import annotations

import importlib.util
import pickle
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from equiaudit.errors import DataError
from equiaudit.io.data import load_dataset

# Mixed molecule sizes: water, methane, hydrogen.
MOLECULES = [[8, 1, 1], [6, 1, 1, 1, 1], [1, 1]]


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _samples(n, seed=0):
    """n molecules cycling through MOLECULES, with positions, energies, forces, charges."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        numbers = np.array(MOLECULES[i % len(MOLECULES)])
        a = len(numbers)
        out.append({
            "numbers": numbers, "positions": rng.normal(size=(a, 3)), "energy": float(rng.normal()),
            "forces": rng.normal(size=(a, 3)), "charges": rng.normal(size=a), "dipole": rng.normal(size=3),
        })
    return out


def _check_padded(data, samples, forces_key="forces"):
    """Every loaded sample equals what went in; padding is zero and masked out."""
    a_max = max(len(s["numbers"]) for s in samples)
    assert data["pos"].shape == (len(samples), a_max, 3) and data["pos"].dtype == torch.float64
    assert data["z"].dtype == torch.int64 and data["mask"].dtype == torch.bool
    for i, s in enumerate(samples):
        a = len(s["numbers"])
        assert data["mask"][i].tolist() == [True] * a + [False] * (a_max - a)
        assert data["z"][i].tolist() == list(s["numbers"]) + [0] * (a_max - a)
        torch.testing.assert_close(data["pos"][i, :a], torch.as_tensor(s["positions"], dtype=torch.float64))
        assert data["pos"][i, a:].abs().sum() == 0
        if forces_key:
            torch.testing.assert_close(data["forces"][i, :a], torch.as_tensor(s[forces_key], dtype=torch.float64))
            assert data["forces"][i, a:].abs().sum() == 0
    if "energy" in data:
        torch.testing.assert_close(data["energy"], torch.tensor([s["energy"] for s in samples], dtype=torch.float64))


# ------------------------------------------------------------------------------ ASE .traj


def test_ase_trajectory_frames_become_samples(tmp_path):
    # An MD or relaxation trajectory as ASE writes it (binary ULM), mixed sizes; each frame a sample.
    pytest.importorskip("ase")
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    samples = _samples(4)
    frames = []
    for s in samples:
        atoms = Atoms(numbers=s["numbers"], positions=s["positions"])
        atoms.calc = SinglePointCalculator(atoms, energy=s["energy"], forces=s["forces"])
        frames.append(atoms)
    ase.io.write(tmp_path / "md.traj", frames)
    data = load_dataset(tmp_path / "md.traj")
    assert set(data) >= {"pos", "z", "energy", "forces", "mask"}
    _check_padded(data, samples)


def test_old_pickle_trajectory_is_refused_without_running(tmp_path):
    # ASE's pre-2015 PickleTrajectory format: ase.io reads .traj as ULM only, so a pickle
    # planted after the old magic is never unpickled.
    pytest.importorskip("ase")
    marker = tmp_path / "executed"
    (tmp_path / "old.traj").write_bytes(b"PickleTrajectory" + pickle.dumps({"pbc": _Payload(marker)}))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "old.traj")
    assert "cannot read" in _one_line(err) and not marker.exists()


# ------------------------------------------------------------------------------ ASE db


def _write_ase_db(path, samples, **connect_kwargs):
    import ase.db
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    db = ase.db.connect(str(path), **connect_kwargs)
    for i, s in enumerate(samples):
        atoms = Atoms(numbers=s["numbers"], positions=s["positions"])
        atoms.calc = SinglePointCalculator(atoms, energy=s["energy"], forces=s["forces"])
        db.write(atoms, step=i, ref=s["energy"] + 1.0, label=f"m{i}",
                 data={"q_ref": s["charges"], "dip": s["dipole"], "note": "text"})
    return db


def test_ase_db_rows_become_samples(tmp_path):
    pytest.importorskip("ase")
    path = tmp_path / "mols.db"
    samples = _samples(5)
    _write_ase_db(path, samples)
    data, index = load_dataset(path, return_index=True)
    assert set(data) == {"pos", "z", "energy", "forces", "mask"}  # no keys: the canonical fields
    _check_padded(data, samples)
    assert index.tolist() == [0, 1, 2, 3, 4]

    # Numeric key-value pairs and data arrays (per atom: padded; per row: stacked) by keys.
    data = load_dataset(path, keys={"e_ref": "ref", "step": "step", "charges": "q_ref", "dipole": "dip"})
    torch.testing.assert_close(data["e_ref"], data["energy"] + 1.0)
    assert data["step"].tolist() == [0, 1, 2, 3, 4]
    for i, s in enumerate(samples):
        a = len(s["numbers"])
        torch.testing.assert_close(data["charges"][i, :a], torch.as_tensor(s["charges"]))
        assert data["charges"][i, a:].abs().sum() == 0
    torch.testing.assert_close(data["dipole"], torch.as_tensor(np.stack([s["dipole"] for s in samples])))

    with pytest.raises(DataError) as err:
        load_dataset(path, keys={"x": "label"})  # a string key-value pair is metadata
    assert "has no key 'label'" in _one_line(err)
    with pytest.raises(DataError) as err:
        load_dataset(path, keys={"x": "note"})
    assert "data entry 'note' is not numeric" in _one_line(err)


def test_ase_db_rows_without_forces_give_no_forces(tmp_path):
    pytest.importorskip("ase")
    import ase.db
    from ase import Atoms

    path = tmp_path / "plain.db"
    samples = _samples(3)
    _write_ase_db(path, samples[:2])
    ase.db.connect(str(path)).write(Atoms(numbers=samples[2]["numbers"], positions=samples[2]["positions"]))
    data = load_dataset(path)
    assert "forces" not in data and "energy" not in data  # not in every row
    _check_padded(data, samples, forces_key=None)
    assert "energy" in load_dataset(path, samples=2)  # the rows read all have it


class _CountingRows:
    """Counts the rows ASE's SQLite backend builds (one per row read)."""

    def __init__(self, monkeypatch):
        import ase.db.sqlite

        self.count = 0
        original = ase.db.sqlite.AtomsRow

        def counting(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(ase.db.sqlite, "AtomsRow", counting)


def test_ase_db_subset_reads_only_the_rows_kept(tmp_path, monkeypatch):
    pytest.importorskip("ase")
    path = tmp_path / "big.db"
    samples = _samples(60)
    _write_ase_db(path, samples)
    full, full_index = load_dataset(path, return_index=True)

    rows = _CountingRows(monkeypatch)
    part, index = load_dataset(path, samples=7, subset_seed=3, return_index=True)
    assert rows.count <= 7 + 1  # the 7 rows, plus one id lookup
    assert index.tolist() == sorted(index.tolist()) and len(set(index.tolist())) == 7
    _check_padded(part, [samples[i] for i in index.tolist()])
    # The same samples, in the same order, as a full read then the same subset (padded
    # only to the largest molecule kept).
    a = part["pos"].shape[1]
    for name in ("pos", "z", "forces", "mask"):
        torch.testing.assert_close(part[name], full[name][index][:, :a])
        assert not full[name][index][:, a:].any()
    torch.testing.assert_close(part["energy"], full["energy"][index])
    assert full_index[index].tolist() == index.tolist()

    first, first_index = load_dataset(path, samples=4, return_index=True)
    assert first_index.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(first["energy"], full["energy"][:4])


def test_ase_db_with_deleted_rows_keeps_id_order(tmp_path):
    pytest.importorskip("ase")
    path = tmp_path / "holes.db"
    samples = _samples(8)
    db = _write_ase_db(path, samples)
    db.delete([2, 5])  # row ids 2 and 5 (samples 1 and 4)
    kept = [s for i, s in enumerate(samples) if i not in (1, 4)]
    data, index = load_dataset(path, return_index=True)
    _check_padded(data, kept)
    assert index.tolist() == list(range(6))
    part, part_index = load_dataset(path, samples=3, subset_seed=1, return_index=True)
    _check_padded(part, [kept[i] for i in part_index.tolist()])


def test_aselmdb(tmp_path):
    pytest.importorskip("ase")
    pytest.importorskip("ase_db_backends")
    path = tmp_path / "mols.aselmdb"
    samples = _samples(6)
    db = _write_ase_db(path, samples)
    db.close()
    data, index = load_dataset(path, keys={"charges": "q_ref"}, return_index=True)
    _check_padded(data, samples)
    assert index.tolist() == list(range(6))
    part, part_index = load_dataset(path, samples=3, subset_seed=5, return_index=True)
    _check_padded(part, [samples[i] for i in part_index.tolist()])
    torch.testing.assert_close(part["energy"], data["energy"][part_index])


def test_ase_missing_gives_install_line(tmp_path, monkeypatch):
    path = tmp_path / "mols.db"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "ase", None)
    monkeypatch.setitem(sys.modules, "ase.db", None)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert _one_line(err) == "reading ASE databases needs ASE: pip install 'equiaudit[ase]'"


def test_aselmdb_backend_missing_gives_install_line(tmp_path, monkeypatch):
    pytest.importorskip("ase")
    path = tmp_path / "mols.aselmdb"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "ase_db_backends", None)
    monkeypatch.setitem(sys.modules, "ase_db_backends.aselmdb", None)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert _one_line(err) == "reading .aselmdb databases needs ase-db-backends: pip install 'equiaudit[aselmdb]'"


def test_not_an_ase_db_is_refused_and_left_unchanged(tmp_path):
    pytest.importorskip("ase")
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x INTEGER)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert "not written by ase.db" in _one_line(err)
    assert path.read_bytes() == before  # ASE did not add its tables

    text = tmp_path / "text.db"
    text.write_text("not a database")
    with pytest.raises(DataError) as err:
        load_dataset(text)
    assert "cannot read" in _one_line(err) and "text.db" in str(err.value)


class _Payload:
    """Unpickling this would run code (touch the marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_hostile_ase_db_cannot_run_code(tmp_path):
    """ASE decodes rows, data and metadata as JSON only: pickles planted there never run."""
    pytest.importorskip("ase")
    marker = tmp_path / "executed"
    evil = pickle.dumps(_Payload(marker))

    def planted(name, *statements):
        path = tmp_path / name
        _write_ase_db(path, _samples(3))
        con = sqlite3.connect(path)
        for sql, args in statements:
            con.execute(sql, args)
        con.commit()
        con.close()
        return path

    # A pickle as the database's metadata (ASE json.loads it when it opens the file).
    path = planted("meta.db", ("INSERT INTO information VALUES ('metadata', ?)", (evil,)))
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert _one_line(err).startswith(f"cannot read {path} with ASE")
    assert not marker.exists()

    # A pickle as a row's data blob: refused when keys makes the reader decode it.
    path = planted("data.db", ("UPDATE systems SET data = ? WHERE id = 1", (evil,)))
    assert set(load_dataset(path)) == {"pos", "z", "energy", "forces", "mask"}  # data not decoded
    with pytest.raises(DataError) as err:
        load_dataset(path, keys={"charges": "q_ref"})
    assert _one_line(err).startswith(f"cannot read {path} with ASE")
    assert not marker.exists()

    # JSON shaped like code: an object array, a jsonpickle-style reducer, a constraint
    # naming a builtin, calculator parameters naming a function: all stay data.
    path = planted(
        "json.db",
        ("UPDATE systems SET data = ? WHERE id = 2",
         ('{"q_ref": {"__ndarray__": [[2], "object", ["os", "system"]]}, '
          '"py/reduce": [{"py/function": "os.system"}, ["touch x"]]}',)),
        ("UPDATE systems SET calculator_parameters = ?, constraints = ? WHERE id = 3",
         ('{"py/object": "os.system"}', '[{"name": "exec", "kwargs": {"source": "1"}}]')),
    )
    assert load_dataset(path)["pos"].shape[0] == 3
    with pytest.raises(DataError) as err:
        load_dataset(path, keys={"charges": "q_ref"})
    assert "data entry 'q_ref' is not numeric" in _one_line(err)
    assert not marker.exists()


# ------------------------------------------------------------------------------- HDF5

SPICE = [("mol_b", [8, 1, 1], 2), ("mol_a", [6, 1, 1, 1, 1], 3), ("mol_c", [1, 1], 1)]


def _write_spice(path, molecules=SPICE, seed=0, skip=()):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(seed)
    truth = {}
    with h5py.File(path, "w") as f:
        for name, numbers, n_conf in molecules:
            a = len(numbers)
            g = f.create_group(name)
            g.create_dataset("subset", data=["SPICE Test Set"], dtype=h5py.string_dtype())
            g.create_dataset("smiles", data=["[H]"], dtype=h5py.string_dtype())
            values = {
                "atomic_numbers": np.array(numbers, dtype=np.int16),
                "conformations": rng.normal(size=(n_conf, a, 3)).astype(np.float32),
                "dft_total_energy": rng.normal(size=n_conf),
                "formation_energy": rng.normal(size=n_conf),
                "dft_total_gradient": rng.normal(size=(n_conf, a, 3)).astype(np.float32),
                "mbis_charges": rng.normal(size=(n_conf, a, 1)).astype(np.float32),
                "scf_dipole": rng.normal(size=(n_conf, 3)).astype(np.float32),
            }
            for key, value in values.items():
                if key not in skip:
                    g.create_dataset(key, data=value)
            truth[name] = values
    # Samples in the file's order: groups by name (h5py), then conformations.
    samples = []
    for name in sorted(truth):
        v = truth[name]
        for c in range(len(v["conformations"])):
            samples.append({
                "molecule": name, "numbers": v["atomic_numbers"], "positions": v["conformations"][c],
                "energy": float(v["dft_total_energy"][c]), "formation": float(v["formation_energy"][c]),
                "forces": -v["dft_total_gradient"][c], "charges": v["mbis_charges"][c], "dipole": v["scf_dipole"][c],
            })
    return samples


def test_spice_hdf5(tmp_path):
    path = tmp_path / "spice.hdf5"
    samples = _write_spice(path)
    data, index = load_dataset(path, return_index=True)
    assert set(data) == {"pos", "z", "energy", "forces", "mask"}  # smiles/subset: metadata
    _check_padded(data, samples)  # forces = -dft_total_gradient, units as stored
    assert index.tolist() == list(range(6))
    assert [s["molecule"] for s in samples] == ["mol_a"] * 3 + ["mol_b"] * 2 + ["mol_c"]

    data = load_dataset(path, keys={"energy": "formation_energy", "charges": "mbis_charges", "dipole": "scf_dipole"})
    torch.testing.assert_close(data["energy"], torch.tensor([s["formation"] for s in samples], dtype=torch.float64))
    assert data["charges"].shape == (6, 5, 1) and data["dipole"].shape == (6, 3)
    for i, s in enumerate(samples):
        a = len(s["numbers"])
        torch.testing.assert_close(data["charges"][i, :a], torch.as_tensor(s["charges"], dtype=torch.float64))
        assert data["charges"][i, a:].abs().sum() == 0
        torch.testing.assert_close(data["dipole"][i], torch.as_tensor(s["dipole"], dtype=torch.float64))
    # A gradient named by keys comes as stored (not negated).
    grad = load_dataset(path, keys={"forces": "dft_total_gradient"})["forces"]
    torch.testing.assert_close(grad, -load_dataset(path)["forces"])


def test_spice_hdf5_subset_matches_full_read(tmp_path):
    path = tmp_path / "spice.h5"
    samples = _write_spice(path, molecules=[(f"m{i:02d}", MOLECULES[i % 3], 1 + i % 4) for i in range(12)])
    full = load_dataset(path)
    part, index = load_dataset(path, samples=5, subset_seed=2, return_index=True)
    assert len(index) == 5 and index.tolist() == sorted(index.tolist())
    _check_padded(part, [samples[i] for i in index.tolist()])
    torch.testing.assert_close(part["energy"], full["energy"][index])
    first, first_index = load_dataset(path, samples=3, return_index=True)
    assert first_index.tolist() == [0, 1, 2]
    _check_padded(first, samples[:3])


def test_spice_hdf5_missing_dataset_is_named(tmp_path):
    path = tmp_path / "spice.hdf5"
    _write_spice(path, skip=("conformations",))
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert "molecule group 'mol_a' has no 'conformations' dataset" in _one_line(err)

    path = tmp_path / "no_energy.hdf5"
    _write_spice(path, skip=("dft_total_energy",))
    assert "energy" not in load_dataset(path)
    with pytest.raises(DataError) as err:
        load_dataset(path, keys={"energy": "dft_total_energy"})
    assert "has no key 'dft_total_energy'" in _one_line(err)


def test_flat_hdf5_like_npz(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "rmd17.hdf5"
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(4, 3, 3))
    with h5py.File(path, "w") as f:
        f["nuclear_charges"] = np.array([8, 1, 1])
        f["coords"] = coords
        f["energies"] = np.arange(4.0)
        f["forces"] = rng.normal(size=(4, 3, 3))
        f["name"] = "aspirin"  # a string: metadata
    data = load_dataset(path)
    assert set(data) == {"pos", "z", "energy", "forces", "mask"}
    torch.testing.assert_close(data["pos"], torch.as_tensor(coords))
    assert data["z"].tolist() == [[8, 1, 1]] * 4
    assert load_dataset(path, samples=2, subset_seed=0)["pos"].shape == (2, 3, 3)
    with pytest.raises(DataError) as err:
        load_dataset(path, keys={"pos": "coords", "label": "name"})
    assert "key 'name' (mapped from 'label') is not a numeric array" in _one_line(err)


def test_hdf5_errors(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError) as err:
        load_dataset(bad)
    assert _one_line(err).startswith(f"cannot read {bad} as HDF5")

    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError) as err:
        load_dataset(bad)
    assert _one_line(err) == "reading HDF5 files needs h5py: pip install 'equiaudit[hdf5]'"


# -------------------------------------------------------------------------------- PyG


@pytest.fixture
def pyg():
    """torch_geometric.data, imported the way equiaudit does (torch's global allowlist untouched)."""
    if importlib.util.find_spec("torch_geometric") is None:
        pytest.skip("torch_geometric is not installed (pip install 'equiaudit[pyg]')")
    from equiaudit.io.data_pyg import _import_pyg

    return _import_pyg()


def _graphs(pyg, samples):
    return [
        pyg.Data(pos=torch.as_tensor(s["positions"], dtype=torch.float32), z=torch.as_tensor(s["numbers"]),
                 y=torch.tensor([s["energy"]]), force=torch.as_tensor(s["forces"], dtype=torch.float32),
                 charge=torch.as_tensor(s["charges"]), dipole=torch.as_tensor(s["dipole"])[None],
                 edge_index=torch.tensor([[0, 1], [1, 0]]))
        for s in samples
    ]


def _close32(data, samples):
    """PyG stores float32: compare against float32-rounded inputs."""
    rounded = [dict(s, positions=np.float32(s["positions"]), forces=np.float32(s["forces"])) for s in samples]
    _check_padded(data, rounded)


@pytest.mark.parametrize("where", ["root", "processed", "file"])
def test_pyg_in_memory_dataset(tmp_path, pyg, where):
    samples = _samples(7)
    (tmp_path / "qm" / "processed").mkdir(parents=True)
    target = tmp_path / "qm" / "processed" / "data.pt"
    pyg.InMemoryDataset.save(_graphs(pyg, samples), str(target))
    torch.save("pre_transform repr", tmp_path / "qm" / "processed" / "pre_transform.pt")  # PyG bookkeeping
    path = {"root": tmp_path / "qm", "processed": tmp_path / "qm" / "processed", "file": target}[where]

    data, index = load_dataset(path, return_index=True)
    assert set(data) == {"pos", "z", "energy", "forces", "mask"}  # y -> energy, force -> forces
    _close32(data, samples)
    assert index.tolist() == list(range(7))

    data = load_dataset(path, keys={"charge": "charge", "dipole": "dipole"})
    assert data["charge"].shape == (7, 5) and data["dipole"].shape == (7, 3)  # per node / per graph
    for i, s in enumerate(samples):
        a = len(s["numbers"])
        torch.testing.assert_close(data["charge"][i, :a], torch.as_tensor(s["charges"]))
        torch.testing.assert_close(data["dipole"][i], torch.as_tensor(s["dipole"]))

    part, part_index = load_dataset(path, samples=3, subset_seed=4, return_index=True)
    _close32(part, [samples[i] for i in part_index.tolist()])
    with pytest.raises(DataError) as err:
        load_dataset(path, keys={"e": "edge_index"})
    assert "is per edge" in _one_line(err)


def test_pyg_list_of_data(tmp_path, pyg):
    samples = _samples(5, seed=1)
    path = tmp_path / "graphs.pt"
    torch.save(_graphs(pyg, samples), path)
    data, index = load_dataset(path, samples=4, subset_seed=0, return_index=True)
    _close32(data, [samples[i] for i in index.tolist()])
    _close32(load_dataset(path), samples)


def test_pyg_folder_errors(tmp_path, pyg):
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert "not a PyTorch Geometric dataset folder" in _one_line(err)
    processed = tmp_path / "ds" / "processed"
    processed.mkdir(parents=True)
    for name in ("train.pt", "test.pt"):
        pyg.InMemoryDataset.save(_graphs(pyg, _samples(2)), str(processed / name))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "ds")
    assert "holds several PyTorch Geometric files (test.pt, train.pt)" in _one_line(err)


def test_pyg_pickled_code_is_refused(tmp_path, pyg):
    marker = tmp_path / "executed"
    graphs = _graphs(pyg, _samples(2))
    cases = {
        "list.pt": [*graphs, _Payload(marker)],
        "attr.pt": [pyg.Data(pos=torch.zeros(2, 3), evil=_Payload(marker))],
    }
    data, slices = pyg.InMemoryDataset.collate(graphs)
    cases["imd.pt"] = (data.to_dict(), slices, pyg.Data, _Payload(marker))
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(DataError) as err:
            load_dataset(tmp_path / name)
        assert "needs exec" in _one_line(err) and "refused for safety (nothing in it ran)" in str(err.value)
        assert not marker.exists()


def test_pyg_missing_gives_install_line(tmp_path, pyg, monkeypatch):
    path = tmp_path / "graphs.pt"
    torch.save(_graphs(pyg, _samples(2)), path)
    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    monkeypatch.setitem(sys.modules, "torch_geometric.data", None)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert _one_line(err) == "reading PyTorch Geometric data needs torch_geometric: pip install 'equiaudit[pyg]'"


def test_reading_pyg_leaves_torchs_allowlist_as_it_was(tmp_path, pyg):
    """`import torch_geometric` adds its classes to torch's process-wide weights-only
    allowlist; reading a PyG file must not (checkpoints are read under the same rules)."""
    path = tmp_path / "graphs.pt"
    torch.save(_graphs(pyg, _samples(2)), path)
    script = textwrap.dedent(f"""
        import torch
        before = set(torch.serialization.get_safe_globals())
        from equiaudit.io.data import load_dataset
        assert load_dataset({str(path)!r})["pos"].shape[0] == 2
        import sys; assert "torch_geometric" in sys.modules
        after = set(torch.serialization.get_safe_globals())
        assert after == before, sorted(map(str, after - before))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)

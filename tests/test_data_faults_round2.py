"""Hostile data files, second round (issue 20): HDF5 references, extxyz atom counts, PyG fields.

Each test builds the hostile file itself. A FIFO that a reader wrongly opens would block for
ever: :func:`unblocked` opens its other end after a while, so such a regression fails (the
reader gets an empty file and says something else) instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equiaudit.cli.main import app
from equiaudit.errors import DataError
from equiaudit.io.data import load_dataset
from run_helpers import make_run, write_config

h5py = pytest.importorskip("h5py")


def fifo(path: Path) -> Path:
    try:
        os.mkfifo(path)
    except (AttributeError, OSError):
        pytest.skip("no FIFOs here")
    return path


@contextlib.contextmanager
def unblocked(path: Path, after: float = 20.0):
    """Open ``path``'s write end once a reader blocks on it past ``after`` seconds, and close it."""
    done = threading.Event()

    def release():
        if done.wait(after):
            return
        while not done.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only with a reader waiting
            except OSError:
                pass
            done.wait(0.05)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        done.set()
        thread.join()
        assert time.perf_counter() - start < after, "the reader blocked on the FIFO"


def pos_file(path: Path, n: int = 3) -> Path:
    with h5py.File(path, "w") as handle:
        handle["pos"] = np.arange(n * 4 * 3, dtype=np.float64).reshape(n, 4, 3)
    return path


# ------------------------------------------------------------------ 3-4. the regular-file rule


@pytest.mark.parametrize("how", ["external link", "raw external", "virtual source"])
@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_fifo_pulled_in_by_an_hdf5_file_is_never_opened(tmp_path, how, where):
    data = tmp_path / "data"
    data.mkdir()
    pipe = fifo((data if where == "inside" else tmp_path) / "pipe.h5")
    name = str(pipe) if where == "outside" else pipe.name
    path = data / "data.h5"
    with h5py.File(path, "w") as handle:
        if how == "external link":
            handle["pos"] = h5py.ExternalLink(name, "/pos")
        elif how == "raw external":
            handle.create_dataset("pos", shape=(3, 4, 3), dtype="f8", external=[(str(pipe), 0, h5py.h5f.UNLIMITED)])
        else:
            layout = h5py.VirtualLayout(shape=(3, 4, 3), dtype="f8")
            layout[:] = h5py.VirtualSource(name, "pos", shape=(3, 4, 3))
            handle.create_virtual_dataset("pos", layout)
    # Even when following external files is allowed: a FIFO is never a file to read.
    with unblocked(pipe), pytest.raises(DataError, match=r"data\.h5: .*pipe\.h5, a FIFO, not a regular file: not opened"):
        load_dataset(path, follow_external=True)


def test_a_spice_molecule_whose_gradient_lives_in_a_fifo_is_refused(tmp_path):
    pipe = fifo(tmp_path / "pipe.bin")
    path = tmp_path / "spice.h5"
    with h5py.File(path, "w") as handle:
        for name in ("good", "bad"):
            group = handle.create_group(name)
            group["atomic_numbers"] = np.array([8, 1, 1])
            group["conformations"] = np.zeros((2, 3, 3))
            if name == "good":
                group["dft_total_gradient"] = np.zeros((2, 3, 3))
            else:
                group.create_dataset("dft_total_gradient", shape=(2, 3, 3), dtype="f8",
                                     external=[(pipe.name, 0, h5py.h5f.UNLIMITED)])
    with unblocked(pipe), pytest.raises(DataError, match=r"dataset '/bad/dft_total_gradient' \(raw external storage\) "
                                                         r"names .*pipe\.bin, a FIFO"):
        with contextlib.chdir(tmp_path):  # raw external names are found from the working directory
            load_dataset(path)


def test_a_device_as_raw_external_storage_is_refused(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    path = tmp_path / "zero.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("pos", shape=(3, 4, 3), dtype="f8", external=[("/dev/zero", 0, h5py.h5f.UNLIMITED)])
    with pytest.raises(DataError, match="a character device, not a regular file"):
        load_dataset(path, follow_external=True)


# ------------------------------------------------------------------ 5-6. leaving the data folder


def _outside_link(tmp_path: Path, how: str, absolute: bool) -> Path:
    (tmp_path / "outside").mkdir()
    secret = pos_file(tmp_path / "outside" / "secret.h5")
    data = tmp_path / "data"
    data.mkdir()
    name = str(secret) if absolute else "../outside/secret.h5"
    path = data / "data.h5"
    with h5py.File(path, "w") as handle:
        if how == "external link":
            handle["pos"] = h5py.ExternalLink(name, "/pos")
        else:
            layout = h5py.VirtualLayout(shape=(3, 4, 3), dtype="f8")
            layout[:] = h5py.VirtualSource(name, "pos", shape=(3, 4, 3))
            handle.create_virtual_dataset("pos", layout)
    return path


@pytest.mark.parametrize("how, absolute", [("external link", False), ("virtual source", True), ("virtual source", False)])
def test_hdf5_references_leaving_the_data_folder_are_refused_unless_followed_and_said(tmp_path, how, absolute):
    path = _outside_link(tmp_path, how, absolute)
    with pytest.raises(DataError, match=r"secret\.h5, outside the data file's folder .*data\.follow_external: true"):
        load_dataset(path)
    with pytest.warns(UserWarning, match=r"secret\.h5, outside the data file's folder \(data\.follow_external: true\)"):
        data = load_dataset(path, follow_external=True)
    assert torch.equal(data["pos"], torch.arange(36, dtype=torch.float64).reshape(3, 4, 3))


def test_a_chain_of_links_is_checked_link_by_link(tmp_path):
    # data.h5 -> inner.h5 (same folder: fine) -> ../outside/secret.h5 (leaves it: refused).
    (tmp_path / "outside").mkdir()
    pos_file(tmp_path / "outside" / "secret.h5")
    data = tmp_path / "data"
    data.mkdir()
    with h5py.File(data / "inner.h5", "w") as handle:
        handle["group/pos"] = h5py.ExternalLink("../outside/secret.h5", "/pos")
    with h5py.File(data / "data.h5", "w") as handle:
        handle["pos"] = h5py.ExternalLink("inner.h5", "/group/pos")
    with pytest.raises(DataError, match=r"inner\.h5: external link '/group/pos' reads .*secret\.h5, outside"):
        load_dataset(data / "data.h5")


def test_references_inside_the_data_folder_are_read_without_a_word(tmp_path):
    pos_file(tmp_path / "part.h5")
    (tmp_path / "raw.bin").write_bytes(np.ones((3, 4, 3)).tobytes())
    with h5py.File(tmp_path / "data.h5", "w") as handle:
        handle["pos"] = h5py.ExternalLink("part.h5", "/pos")
        handle.create_dataset("target", shape=(3, 4, 3), dtype="f8", external=[(str(tmp_path / "raw.bin"), 0, h5py.h5f.UNLIMITED)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_dataset(tmp_path / "data.h5")
    assert torch.equal(data["pos"], torch.arange(36, dtype=torch.float64).reshape(3, 4, 3))
    assert torch.equal(data["target"], torch.ones(3, 4, 3, dtype=torch.float64))


def _config_for(tmp_path: Path, data_path: Path, extra: str = "") -> Path:
    config = write_config(tmp_path, samples=3, rotations=2, bootstrap=20)
    text = config.read_text().replace(f"data: {{path: '{tmp_path / 'data.npz'}', samples: 3}}",
                                      f"data: {{path: '{data_path}', samples: 3{extra}}}")
    assert str(data_path) in text
    config.write_text(text.replace("heads: {out: {rep: vector, target: target}}", "heads: {out: {rep: vector, target: pos}}"))
    return config


def test_the_cli_refuses_an_outside_link_in_one_line_and_follows_it_when_asked(tmp_path):
    path = _outside_link(tmp_path, "external link", False)
    run = make_run(tmp_path, "aug", {10: 0.3})
    result = CliRunner().invoke(app, ["audit", str(_config_for(tmp_path, path)), str(run), "--out", str(tmp_path / "o1"), "--no-plot"])
    assert result.exit_code == 2, result.output
    assert "outside the data file's folder" in result.output and "Traceback" not in result.output
    followed = CliRunner().invoke(app, ["audit", str(_config_for(tmp_path, path, ", follow_external: true")), str(run),
                                        "--out", str(tmp_path / "o2"), "--no-plot"])
    assert followed.exit_code == 0, followed.output
    assert (tmp_path / "o2" / "summary.csv").exists()
    said = [line for line in followed.output.splitlines() if line.startswith("warning:")]
    assert len(said) == 1 and "secret.h5, outside the data file's folder" in said[0], followed.output


# ------------------------------------------------------------------ 7. extxyz atom counts


def test_an_extxyz_declaring_a_huge_atom_count_is_refused_before_parsing(tmp_path):
    pytest.importorskip("ase")
    path = tmp_path / "data.extxyz"
    path.write_text("2\nenergy=1.0\nH 0 0 0\nH 0 0 1\n999999999999\n\nH 0 0 0\n")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"frame 1 declares 999,999,999,999 atoms, over the limit of 1,000,000"):
        load_dataset(path)
    assert time.perf_counter() - start < 5
    # The limit is data.max_atoms; a file within it is read as before.
    ok = tmp_path / "ok.xyz"
    ok.write_text("2\n\nH 0 0 0\nH 0 0 1\n3\n\nH 0 0 0\nH 0 0 1\nO 1 0 0\n")
    assert load_dataset(ok)["pos"].shape == (2, 3, 3)
    with pytest.raises(DataError, match="frame 1 declares 3 atoms, over the limit of 2 atoms per structure"):
        load_dataset(ok, max_atoms=2)


def test_the_cli_refuses_a_huge_atom_count_in_seconds(tmp_path):
    pytest.importorskip("ase")
    path = tmp_path / "big.xyz"
    path.write_text("999999999999\n\nH 0 0 0\n")
    run = make_run(tmp_path, "aug", {10: 0.3})
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["audit", str(_config_for(tmp_path, path)), str(run), "--out", str(tmp_path / "o"), "--no-plot"])
    assert result.exit_code == 2, result.output
    assert time.perf_counter() - start < 30
    assert "declares 999,999,999,999 atoms" in " ".join(result.output.split())


# ------------------------------------------------------------------ 8. PyG fields that are not tensors


def test_a_pyg_field_that_is_not_a_tensor_names_file_graph_and_field(tmp_path):
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    path = tmp_path / "graphs.pt"
    good = Data(pos=torch.randn(3, 3), z=torch.tensor([1, 6, 8]))
    torch.save([good, Data(pos="not a tensor", z=torch.tensor([1, 6, 8]))], path)
    with pytest.raises(DataError, match=r"graphs\.pt: graph 1: field 'pos' is a str, not a tensor"):
        load_dataset(path)
    torch.save([good, Data(pos=torch.randn(3, 3), z=torch.tensor([1, 6, 8]), energy=["a", "list"])], path)
    with pytest.raises(DataError, match=r"graph 1: field 'energy' is a list, not a tensor"):
        load_dataset(path)
    torch.save([good, Data(pos=torch.randn(3, 3), z=torch.tensor([1, 6, 8]), force=torch.zeros(3, 3, dtype=torch.complex64))], path)
    with pytest.raises(DataError, match=r"graph 1: field 'force' is a torch.complex64 tensor, not real numbers"):
        load_dataset(path)
    run = make_run(tmp_path, "aug", {10: 0.3})
    torch.save([good, Data(pos="not a tensor", z=torch.tensor([1, 6, 8]))], path)
    result = CliRunner().invoke(app, ["audit", str(_config_for(tmp_path, path)), str(run), "--out", str(tmp_path / "o"), "--no-plot"])
    assert result.exit_code == 2, result.output
    assert "graph 1: field 'pos' is a str" in " ".join(result.output.split())

"""metatrain (PET) as a model family, end to end: a tiny PET trained by ``mtt train`` here,
audited with ``equiaudit audit RUN_DIR --data FILE`` and no config. Needs
``pip install "equiaudit[metatrain]"`` (CI installs it); skipped without it.

* The run is made once per session: EMT-labelled Cu clusters (ASE), ``mtt train`` with tiny
  hypers for 3 epochs, a checkpoint every 2 (``model_0.ckpt``, ``model_2.ckpt``; the final
  ``model.ckpt`` is epoch 2 again; ``composition_model.ckpt``, ``scaler.ckpt`` and the
  exported ``model.pt`` beside them).
* The oracle for the family's energies and forces is metatrain's own evaluation
  (``evaluate_model``, what ``mtt eval`` runs) of the same checkpoint loaded by metatrain's
  own ``model_from_checkpoint`` and exported, on the same structures, one system at a time
  with metatrain's own neighbour lists. (That reference load unpickles our own freshly
  written files with ``weights_only=False``: the test trusts what it just made; equiaudit
  never does.)
* Safety: a metatrain-shaped checkpoint whose pickle carries a payload (``os.system``) is
  refused, and the payload's marker file never appears.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("metatrain")
pytest.importorskip("metatomic.torch")
ase_build = pytest.importorskip("ase")

from ase import Atoms  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.io import read, write  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from equiaudit.cli.main import app  # noqa: E402
from equiaudit.io.checkpoints import load_into_model, read_checkpoint  # noqa: E402
from equiaudit.zoo.families import Peek, build, recognise  # noqa: E402
from helpers import emt_cu_clusters  # noqa: E402

OPTIONS = """
seed: 0
device: cpu
base_precision: 32
architecture:
  name: pet
  model: {cutoff: 4.0, d_pet: 8, d_head: 8, d_node: 8, d_feedforward: 8, num_heads: 1,
          num_attention_layers: 1, num_gnn_layers: 1}
  training: {batch_size: 4, num_epochs: 3, checkpoint_interval: 2, num_workers: 0, learning_rate: 0.003}
training_set:
  systems: {read_from: train.xyz, length_unit: angstrom}
  targets: {energy: {key: energy, unit: eV, forces: {key: forces}}}
validation_set:
  systems: {read_from: val.xyz, length_unit: angstrom}
  targets: {energy: {key: energy, unit: eV, forces: {key: forces}}}
test_set: 0.0
"""


cu_clusters = emt_cu_clusters  # (tests/helpers.py)


@pytest.fixture(scope="session")
def pet_run(tmp_path_factory) -> Path:
    """``mtt train``'s output folder of a tiny PET (about half a minute on one CPU core)."""
    work = tmp_path_factory.mktemp("mtt")
    write(work / "train.xyz", cu_clusters(16, seed=0))
    write(work / "val.xyz", cu_clusters(6, seed=1))
    (work / "options.yaml").write_text(OPTIONS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "metatrain", "train", "options.yaml", "-o", "model.pt"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = sorted(p.parent for p in work.glob("outputs/*/*/model_0.ckpt"))
    assert len(runs) == 1, list(work.rglob("*"))
    return runs[0]


def padded(frames: list[Atoms]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(a) for a in frames)
    pos = torch.zeros(len(frames), width, 3)
    z = torch.zeros(len(frames), width, dtype=torch.long)
    mask = torch.zeros(len(frames), width, dtype=torch.bool)
    for b, a in enumerate(frames):
        pos[b, : len(a)] = torch.from_numpy(a.positions)
        z[b, : len(a)] = torch.from_numpy(a.numbers)
        mask[b, : len(a)] = True
    return pos, z, mask


def metatrain_reference(path: Path, frames: list[Atoms]) -> list[tuple[float, torch.Tensor]]:
    """(energy, forces) of each frame by metatrain's own loading, export and evaluate_model."""
    import metatomic.torch as mta
    from metatrain.utils.data.target_info import get_energy_target_info
    from metatrain.utils.evaluate_model import evaluate_model
    from metatrain.utils.io import model_from_checkpoint
    from metatrain.utils.neighbor_lists import get_requested_neighbor_lists, get_system_with_neighbor_lists

    checkpoint = torch.load(path, weights_only=False, map_location="cpu")  # our own file, just written
    exported = model_from_checkpoint(checkpoint, context="restart").export()
    target = get_energy_target_info("energy", {"unit": "eV", "quantity": "energy"}, add_position_gradients=True)
    requested = get_requested_neighbor_lists(exported)
    out = []
    for atoms in frames:
        system = mta.systems_to_torch(atoms, dtype=torch.float32)
        system = get_system_with_neighbor_lists(system, requested)
        block = evaluate_model(exported, [system], {"energy": target}, is_training=False)["energy"].block()
        forces = -block.gradient("positions").values.reshape(-1, 3)
        out.append((float(block.values.reshape(())), forces.detach()))
    return out


def test_energies_and_forces_equal_metatrains_own_evaluation(pet_run):
    frames = read(pet_run.parents[2] / "val.xyz", ":")
    pos, z, mask = padded(frames)
    model = build("metatrain", pet_run / "model_0.ckpt")  # built once, as an audit does
    for name in ("model_0.ckpt", "model_2.ckpt"):
        loaded = read_checkpoint(pet_run / name)  # equiaudit's loader: weights-only, placeholders
        assert loaded.weights_source.startswith("model_state_dict (dropped non-tensor ['finetune_config'])")
        assert loaded.step == int(name[6]) and loaded.step_source == "epoch"
        load_into_model(model, loaded)
        out = model(pos, z, mask)
        for b, (energy, forces) in enumerate(metatrain_reference(pet_run / name, frames)):
            n = len(frames[b])
            assert float(out["energy"][b]) == pytest.approx(energy, rel=1e-5)
            scale = float(forces.abs().max())
            assert float((out["forces"][b, :n].detach() - forces).abs().max()) <= 1e-5 * scale
            assert torch.count_nonzero(out["forces"][b, n:]) == 0  # padded atoms


def test_recognised_from_contents_not_names(pet_run, tmp_path):
    kinds = {p.name: recognise(p) for p in pet_run.iterdir() if p.is_file()}
    assert kinds["model_0.ckpt"].kind == kinds["model_2.ckpt"].kind == "checkpoint"
    assert kinds["model_2.ckpt"].architecture == "pet" and kinds["model_2.ckpt"].details["epoch"] == 2
    assert kinds["composition_model.ckpt"].kind == kinds["scaler.ckpt"].kind == "support"
    assert kinds["model.ckpt"].kind == "support" and "model_2.ckpt" in kinds["model.ckpt"].reason
    assert kinds["model.pt"].kind == "torchscript" and "--allow-torchscript" in kinds["model.pt"].reason
    assert kinds["train.log"] is None
    # Renamed, the files are what their contents say.
    (tmp_path / "weights.bin").write_bytes((pet_run / "scaler.ckpt").read_bytes())
    (tmp_path / "scaler.ckpt").write_bytes((pet_run / "model_0.ckpt").read_bytes())
    assert recognise(tmp_path / "weights.bin").kind == "support"
    assert recognise(tmp_path / "scaler.ckpt").kind == "checkpoint"


def test_run_dir_audited_with_no_config(pet_run, tmp_path):
    out = tmp_path / "out"
    data = pet_run.parents[2] / "val.xyz"
    result = CliRunner().invoke(app, ["audit", str(pet_run), "--data", str(data), "--out", str(out), "-k", "3",
                                      "--no-plot", "--set", "batch_size=4"])
    assert result.exit_code == 0, result.output
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({r["checkpoint"] for r in rows}) == ["model_0.ckpt", "model_2.ckpt"]  # one row set per model_N.ckpt
    assert {r["status"] for r in rows} == {"ok"} and {r["head"] for r in rows} == {"total", "energy", "forces"}
    assert {r["step"] for r in rows} == {"0", "2"}
    # PET is not equivariant by construction: caught, above the float floor.
    assert all(r["flag"] != "at_float_floor" and float(r["rel_equiv_error"]) > 0 for r in rows if r["head"] == "total")
    text = " ".join(result.output.split())
    for name in ("composition_model.ckpt", "scaler.ckpt", "model.pt"):
        assert text.count(f"skipped: {name}") == 1, (name, result.output)
    # The final model.ckpt holds model_2.ckpt's weights: folded onto it by discovery, said once.
    assert text.count("model.ckpt = model_2.ckpt (same weights; audited once)") == 1, result.output
    assert "family metatrain built from model_0.ckpt" in text and "heads energy, forces" in text
    run = json.loads((out / "run.json").read_text())
    assert run["model_family"]["family"] == "metatrain" and run["model_family"]["detected"] is True
    assert run["config"]["heads"] == {"energy": {}, "forces": {}} and run["config"]["group"]["name"] == "so3"
    assert run["config"]["batch_size"] == 4  # --set


def test_yaml_family_config_audits_the_same(pet_run, tmp_path):
    data = pet_run.parents[2] / "val.xyz"
    config = tmp_path / "audit.yaml"
    config.write_text(f"task: force_field\nmodel: {{family: metatrain, grad: true}}\ndata: {{path: {data}}}\n"
                      f"checkpoints: {{path: {pet_run / 'model_2.ckpt'}}}\ngroup: {{rotations: 2}}\n")
    result = CliRunner().invoke(app, ["audit", str(config), "--out", str(tmp_path / "out"), "--no-plot"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["checkpoint"] for r in rows} == {"model_2.ckpt"} and {r["status"] for r in rows} == {"ok"}


def test_payload_in_a_metatrain_shaped_checkpoint_is_refused_unrun(pet_run, tmp_path):
    """A checkpoint with metatrain's keys and a pickled ``os.system`` call: never run."""
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "model_4.ckpt"
    torch.save({"architecture_name": "pet", "model_ckpt_version": 16, "epoch": 4,
                "model_data": {"model_hypers": {"cutoff": 4.0}, "trigger": Payload()},
                "model_state_dict": {"w": torch.zeros(2)}}, evil, pickle_protocol=2)
    assert b"system" in evil.read_bytes()  # the payload is in the file
    peek = Peek(evil)
    assert peek.contents() is None and "os.system" in peek.error  # refused: not anyone's checkpoint
    assert recognise(evil) is None
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "model_*.ckpt"), str(pet_run / "model_0.ckpt"), "--data",
                                      str(pet_run.parents[2] / "val.xyz"), "--out", str(out), "-k", "2", "--no-plot"])
    assert result.exit_code == 1, result.output  # that checkpoint failed, the other was audited
    with open(out / "summary.csv", newline="") as handle:
        rows = {r["checkpoint"]: r for r in csv.DictReader(handle)}
    assert rows["model_4.ckpt"]["status"] == "unsafe_pickle" and rows["model_0.ckpt"]["status"] == "ok"
    assert "os.system" in " ".join(result.output.split())
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # and torch's own guard agrees
        torch.load(evil, weights_only=True)
    assert not marker.exists()


def test_torchscript_export_runs_only_when_allowed(pet_run, tmp_path):
    data = str(pet_run.parents[2] / "val.xyz")
    archive = str(pet_run / "model.pt")
    refused = CliRunner().invoke(app, ["audit", archive, "--data", data, "--out", str(tmp_path / "no"), "--no-plot"])
    assert refused.exit_code == 2 and "TorchScript archive: a program" in " ".join(refused.output.split())
    assert not (tmp_path / "no" / "summary.csv").exists()
    allowed = CliRunner().invoke(app, ["audit", archive, "--data", data, "--out", str(tmp_path / "yes"), "-k", "2",
                                       "--no-plot", "--allow-torchscript"])
    assert allowed.exit_code == 0, allowed.output
    with open(tmp_path / "yes" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["checkpoint"] for r in rows} == {"model.pt"} and {r["status"] for r in rows} == {"ok"}


def test_python_api_takes_a_loaded_atomistic_model(pet_run):
    """``equiaudit.audit(model, ...)`` with metatomic's AtomisticModel as the user loaded it;
    its energies and forces are metatrain's evaluate_model's of the same archive."""
    import metatomic.torch as mta
    from metatrain.utils.data.target_info import get_energy_target_info
    from metatrain.utils.evaluate_model import evaluate_model
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    import equiaudit
    from equiaudit.zoo.families.metatrain import metatomic_force_field

    loaded = mta.load_atomistic_model(str(pet_run / "model.pt"))
    frames = read(pet_run.parents[2] / "val.xyz", ":")
    pos, z, mask = padded(frames)
    out = metatomic_force_field(loaded)(pos, z, mask)
    target = get_energy_target_info("energy", {"unit": "eV", "quantity": "energy"}, add_position_gradients=True)
    for b, atoms in enumerate(frames):
        system = get_system_with_neighbor_lists(mta.systems_to_torch(atoms, dtype=torch.float32),
                                                loaded.requested_neighbor_lists())
        block = evaluate_model(loaded, [system], {"energy": target}, is_training=False)["energy"].block()
        assert float(out["energy"][b]) == pytest.approx(float(block.values.reshape(())), rel=1e-5)
        forces = -block.gradient("positions").values.reshape(-1, 3).detach()
        assert float((out["forces"][b, : len(atoms)].detach() - forces).abs().max()) <= 1e-5 * float(forces.abs().max())
    result = equiaudit.audit(loaded, str(pet_run.parents[2] / "val.xyz"), task="force_field", grad=True, rotations=2)
    assert result.total.rel_equiv_error > 0 and result.total.flag != "at_float_floor"

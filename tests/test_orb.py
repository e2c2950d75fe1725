"""The Orb family: an Orb v3 direct model built by orb-models' own architecture function,
saved as Orb's finetune.py saves (``torch.save(model.state_dict(), "checkpoint_epochN.ckpt")``),
then audited from those files with only its architecture named.

Known answers: equiaudit's batched evaluation (one AtomGraphs built with tensor operations)
equals ``model.predict`` on Orb's own graphs (``ase_atoms_to_atom_graphs`` + ``batch_graphs``)
of the same structures; Orb's direct model is not equivariant, so it is caught above the floor.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("orb_models")
pytest.importorskip("ase")

from ase import Atoms  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.io import write  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from equiaudit.batching import to_ase_atoms  # noqa: E402
from equiaudit.cli.main import app  # noqa: E402
from helpers import emt_cu_clusters  # noqa: E402

NAME = "orb_v3_direct_20_omat"


cu_clusters = emt_cu_clusters  # (tests/helpers.py)


def orb_architecture():
    """Orb v3 direct, 20 neighbours, as orb-models' pretrained.orb_v3_direct_20_omat builds it
    before its weight download (which is never called here): random initial weights."""
    from orb_models.forcefield import pretrained
    from orb_models.forcefield.atomic_system import SystemConfig

    return pretrained.orb_v3_direct_architecture(device="cpu", system_config=SystemConfig(radius=6.0, max_num_neighbors=20))


@pytest.fixture(scope="module")
def orb_run(tmp_path_factory):
    """finetune.py's checkpoint folder: two epochs of the same architecture (the second one's
    weights moved), and EMT-labelled validation structures."""
    work = tmp_path_factory.mktemp("orb")
    torch.manual_seed(0)
    model = orb_architecture()
    run = work / "ckpts"
    run.mkdir()
    torch.save(model.state_dict(), run / "checkpoint_epoch0.ckpt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(model.state_dict(), run / "checkpoint_epoch5.ckpt")
    write(work / "val.xyz", cu_clusters(4, seed=1))
    return run, work / "val.xyz"


def padded(frames):
    n = max(len(a) for a in frames)
    pos = torch.zeros(len(frames), n, 3, dtype=torch.float64)
    z = torch.zeros(len(frames), n, dtype=torch.long)
    mask = torch.zeros(len(frames), n, dtype=torch.bool)
    for b, atoms in enumerate(frames):
        pos[b, :len(atoms)] = torch.as_tensor(atoms.positions)
        z[b, :len(atoms)] = torch.as_tensor(atoms.numbers)
        mask[b, :len(atoms)] = True
    return pos, z, mask


def test_energies_and_forces_equal_orbs_own_predict(orb_run):
    from orb_models.forcefield.atomic_system import SystemConfig, ase_atoms_to_atom_graphs
    from orb_models.forcefield.base import batch_graphs

    from equiaudit.io.checkpoints import load_into_model, read_checkpoint
    from equiaudit.zoo.families.base import build

    run, data = orb_run
    path = run / "checkpoint_epoch5.ckpt"
    # Orb's own route: its architecture, its own load_state_dict, its graphs, model.predict.
    reference = orb_architecture()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference.eval()
    from ase.io import read

    frames = read(data, index=":")
    pos, z, mask = padded(frames)
    graphs = batch_graphs([ase_atoms_to_atom_graphs(a, SystemConfig(radius=6.0, max_num_neighbors=20))
                           for a in to_ase_atoms(pos, z, mask)])
    with torch.no_grad():
        expected = reference.predict(graphs)
    # equiaudit's route: the family builds the named architecture, equiaudit's loader loads the file.
    ours = build("orb", path, name=NAME)
    load_into_model(ours, read_checkpoint(path))
    with torch.no_grad():
        out = ours(pos.float(), z, mask)
    assert torch.allclose(out["energy"], expected["energy"], rtol=1e-5, atol=1e-5 * float(expected["energy"].abs().max()))
    scale = float(expected["forces"].abs().max())
    assert torch.allclose(out["forces"][mask], expected["forces"], rtol=1e-5, atol=1e-5 * scale)
    assert bool((out["forces"][~mask] == 0).all())


def test_recognised_from_contents(orb_run, tmp_path):
    from equiaudit.zoo.families.base import Peek, recognise

    run, _ = orb_run
    found = recognise(run / "checkpoint_epoch0.ckpt")
    assert found is not None and (found.family, found.kind, found.architecture) == ("orb", "checkpoint", "direct")
    assert found.details["message_passing_steps"] == 5
    renamed = tmp_path / "weights.pt"  # the name says nothing; the keys do
    renamed.write_bytes((run / "checkpoint_epoch0.ckpt").read_bytes())
    assert recognise(renamed, Peek(renamed)).family == "orb"
    torch.save({"layer.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    assert recognise(tmp_path / "other.pt") is None


def test_run_dir_audited_with_the_architecture_named(orb_run, tmp_path):
    run, data = orb_run
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["audit", str(run), "--data", str(data), "--out", str(out), "-k", "3",
                                      "--no-plot", "--set", f"model.name={NAME}"])
    assert result.exit_code == 0, result.output
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({r["checkpoint"] for r in rows}) == ["checkpoint_epoch0.ckpt", "checkpoint_epoch5.ckpt"]
    assert {r["status"] for r in rows} == {"ok"} and {r["head"] for r in rows} == {"total", "energy", "forces"}
    # Orb's direct model predicts forces with an unconstrained head: caught, above the float floor.
    assert all(r["flag"] != "at_float_floor" and float(r["rel_equiv_error"]) > 1e-6 for r in rows if r["head"] == "total")
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["config"]["model"]["family"] == "orb"
    # Without the name: one line saying what to add, exit 2, nothing audited.
    bare = CliRunner().invoke(app, ["audit", str(run), "--data", str(data), "--out", str(tmp_path / "bare")])
    assert bare.exit_code == 2 and "model.name=orb_v3_direct_20_omat" in " ".join(bare.output.split())


def test_builder_keywords_and_bad_options():
    from equiaudit.zoo.families.orb import orb_force_field

    small = orb_force_field(architecture="orb_v3_direct_architecture", latent_dim=32, base_mlp_hidden_dim=64,
                            head_mlp_hidden_dim=32, num_message_passing_steps=2, max_num_neighbors=4)
    assert small.max_num_neighbors == 4 and len(small.model.model.gnn_stacks) == 2
    with pytest.raises(TypeError, match="no argument"):
        orb_force_field(architecture="orb_v3_direct_architecture", hidden=3)
    with pytest.raises(ValueError, match="unknown Orb model name"):
        orb_force_field(name="orb_v9")


def test_conservative_model_under_inference_mode_equals_predict():
    """Conservative Orb takes forces by autograd inside predict: the family runs it outside
    equiaudit's inference mode and gets Orb's own grad_forces."""
    from orb_models.forcefield.atomic_system import SystemConfig, ase_atoms_to_atom_graphs
    from orb_models.forcefield.base import batch_graphs

    from equiaudit.zoo.families.orb import defaults, orb_force_field

    torch.manual_seed(0)
    model = orb_force_field(architecture="orb_v3_conservative_architecture", latent_dim=32, base_mlp_hidden_dim=64,
                            head_mlp_hidden_dim=32, num_message_passing_steps=2, max_num_neighbors=4).eval()
    assert model.conservative and defaults(model).grad
    pos, z, mask = padded(cu_clusters(3, seed=2))
    pos = pos.float()
    with torch.inference_mode():
        out = model(pos, z, mask)
    expected = model.model.predict(batch_graphs([ase_atoms_to_atom_graphs(a, SystemConfig(6.0, 4))
                                                 for a in to_ase_atoms(pos, z, mask)]))
    forces = expected[model.model.grad_forces_name].detach()
    assert torch.allclose(out["energy"], expected["energy"].detach(), rtol=1e-5)
    assert torch.allclose(out["forces"][mask], forces, rtol=1e-5, atol=1e-5 * float(forces.abs().max()))


def test_yaml_family_and_name_build_the_named_architecture(orb_run):
    """``model: {family: orb, name: ...}`` in a config: the name reaches the family's build."""
    from equiaudit.io.config import parse_config
    from equiaudit.io.models import build_configured

    run, data = orb_run
    config = parse_config({"task": "force_field", "model": {"family": "orb", "name": NAME},
                           "data": {"path": str(data)}, "checkpoints": {"path": str(run)}})
    assert config.model.family == "orb" and config.model.kwargs == {"name": NAME}
    model = build_configured(config.model)
    assert model.name == NAME and model.max_num_neighbors == 20 and len(model.model.model.gnn_stacks) == 5

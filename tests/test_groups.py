"""Groups beyond SO(3): o3 (with pseudovectors), translation and permutation, with their floors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from equiaudit.errors import ConfigError
from equiaudit.groups import make_group
from equiaudit.groups.o3 import O3Set
from equiaudit.groups.permutation import PERMUTATION, permutation_index
from equiaudit.groups.translation import TRANSLATION, TranslationSet
from equiaudit.io.config import parse_config
from helpers import audit_config


# ----------------------------------------------------------------- models (config factories)

class PermutationEquivariant(torch.nn.Module):
    """Per-atom MLP on (position, element) plus a masked sum over atoms: exactly permutation-equivariant."""

    def __init__(self, position_embedding: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.atom = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.slot = torch.nn.Parameter(torch.randn(16, 3)) if position_embedding else None

    def forward(self, pos, z, mask):
        h = self.atom(torch.cat([pos, z[..., None].to(pos.dtype) / 8], -1))
        if self.slot is not None:  # depends on the atom's index: not permutation-equivariant
            h = h + self.slot[: pos.shape[1]]
        h = h * mask[..., None]
        return {"energy": h.square().sum((1, 2)), "forces": h + h.sum(1, keepdim=True) / 10 * mask[..., None]}


class CrossProduct(torch.nn.Module):
    """Angular-momentum-like output: Σ_i x_i × v_i, an axial (pseudo)vector."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, pos, vel, mask):
        return {"spin": self.scale * torch.cross(pos, vel, dim=-1).sum(1)}


class Displacement(torch.nn.Module):
    """Per-atom vectors from the centroid (``centred``: translation-invariant) or from the origin."""

    def __init__(self, centred: bool = True):
        super().__init__()
        self.centred = centred
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, pos, z, mask):
        origin = (pos * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None] if self.centred else 0
        displacement = self.scale * (pos - origin) * mask[..., None]
        return {"forces": displacement, "moved": pos + displacement}


def _data(path, n=24, atoms=7, padded=True, seed=0):
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n, atoms, 3)) + rng.normal(size=(n, 1, 3)) * 3  # not centred
    z = rng.choice([1, 6, 8], size=(n, atoms))
    mask = np.ones((n, atoms), dtype=bool)
    if padded:
        sizes = rng.integers(3, atoms + 1, size=n)
        mask = np.arange(atoms)[None] < sizes[:, None]
        pos, z = pos * mask[..., None], z * mask
    np.savez(path, pos=pos, z=z, mask=mask, vel=rng.normal(size=(n, atoms, 3)),
             energy=rng.normal(size=n), forces=rng.normal(size=(n, atoms, 3)), spin=rng.normal(size=(n, 3)))
    return path


def _audit(tmp_path, factory, group, *, heads=None, fields=None, inputs=None, kwargs=None, dtype="float64", data=None):
    config = parse_config({
        "task": "custom",
        "model": {"factory": f"{__file__}:{factory}", "kwargs": kwargs or {}, "dtype": dtype,
                  "inputs": inputs or ["pos", "z", "mask"]},
        "data": {"path": str(data or _data(tmp_path / "data.npz"))},
        "fields": fields or {"pos": "point", "z": "scalar"},
        "heads": heads or {"energy": {"rep": "scalar"}, "forces": {"rep": "vector"}},
        "group": group,
        "bootstrap": 50,
    })
    audit, result = audit_config(config, tmp_path)
    assert result.ok, result.message
    return audit, result


def _ree(result, head="total"):
    return result[head].rel_equiv_error


def _flag(result, head="total"):
    """The float-floor rule on the head's numbers (the flag column says not_learned first, and
    these random models have learnt nothing)."""
    from equiaudit.floor import flag

    return flag(result[head].rel_equiv_error, result[head].float_floor)


# ------------------------------------------------------------------------------ permutation

def test_permutation_index_moves_valid_atoms_only_and_uniformly():
    mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    keys = torch.rand(2, 6000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    perm = permutation_index(keys, mask)
    assert (perm[0, :, 1] == 1).all() and (perm[0, :, 4] == 4).all()  # padded slots keep their atom
    assert (perm.sort(-1).values == torch.arange(5)).all()  # permutations
    # Slot 0 of sample 0 receives each of its 3 valid atoms a third of the time.
    freq = torch.bincount(perm[0, :, 0], minlength=5).double() / 6000
    assert freq[[0, 2, 3]].sub(1 / 3).abs().max() < 0.03 and freq[[1, 4]].sum() == 0


def test_permutation_action_round_trip_and_invariant_fields():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    keys = torch.rand(1, 5, 4, generator=g, dtype=torch.float64)
    pos, energy, z = torch.randn(1, 4, 3, generator=g), torch.randn(1), torch.tensor([[1, 6, 8, 0]])
    orbit = PERMUTATION.act("point", pos, keys, mask)
    assert orbit.shape == (1, 5, 4, 3)
    assert torch.equal(PERMUTATION.act_inverse("point", orbit, keys, mask), pos.expand(1, 5, 4, 3))
    assert torch.equal(PERMUTATION.act("scalar", energy, keys, mask), energy.expand(1, 5))  # per sample: invariant
    permuted_z = PERMUTATION.act("scalar", z, keys, mask)
    assert (permuted_z[..., 3] == 0).all() and (permuted_z.sort(-1).values == torch.tensor([0, 1, 6, 8])).all()


def test_permutation_equivariant_model_reads_at_the_floor_and_an_index_embedding_does_not(tmp_path):
    _, equivariant = _audit(tmp_path, "PermutationEquivariant", {"name": "permutation", "rotations": 4})
    _, indexed = _audit(tmp_path, "PermutationEquivariant", {"name": "permutation", "rotations": 4},
                        kwargs={"position_embedding": True})
    assert equivariant.total.loss_aug > 0.1
    assert _ree(equivariant) < 1e-25 and _flag(equivariant) == "at_float_floor"
    assert all(_flag(equivariant, h) == "at_float_floor" for h in ("energy", "forces"))
    assert _ree(indexed) > 1e-3 and _flag(indexed) == ""


def test_the_same_model_is_not_rotation_equivariant(tmp_path):
    _, rotated = _audit(tmp_path, "PermutationEquivariant", {"name": "so3", "rotations": 4})
    assert _ree(rotated) > 1e-3 and _flag(rotated) == ""


# ------------------------------------------------------------------------------------- o3

def test_o3_elements_are_haar_times_a_fair_sign():
    elements = O3Set(64).sample(64, 0)
    det = torch.linalg.det(elements)
    assert torch.allclose(det.abs(), torch.ones_like(det))
    assert 0.4 < (det < 0).double().mean() < 0.6
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(elements @ elements.transpose(-1, -2), eye.expand_as(elements), atol=1e-12)


@pytest.mark.parametrize("rep, at_floor_o3", [("pseudovector", True), ("vector", False)])
def test_cross_product_reads_at_the_floor_under_o3_only_as_a_pseudovector(tmp_path, rep, at_floor_o3):
    kwargs = dict(heads={"spin": {"rep": rep}}, fields={"pos": "point", "vel": "vector"}, inputs=["pos", "vel", "mask"])
    _, o3 = _audit(tmp_path, "CrossProduct", {"name": "o3", "rotations": 8}, **kwargs)
    _, so3 = _audit(tmp_path, "CrossProduct", {"name": "so3", "rotations": 8}, **kwargs)
    assert _flag(so3) == "at_float_floor"  # proper rotations cannot tell the two apart
    assert (_flag(o3) == "at_float_floor") is at_floor_o3
    if not at_floor_o3:
        assert _ree(o3) > 0.1


# ----------------------------------------------------------------------------- translation

def test_translations_are_bounded_and_act_on_points_only():
    ball = TranslationSet(8, radius=2.0).sample(500, 0)
    assert ball.shape == (500, 8, 3) and ball.norm(dim=-1).max() <= 2.0
    assert ball.norm(dim=-1).median() > 2.0 * 0.75  # uniform in the ball: median radius 2·2^(-1/3) ≈ 1.59
    box = TranslationSet(8, radius=0.5, shape="box").sample(100, 0)
    assert box.abs().max() <= 0.5 and box.norm(dim=-1).max() > 0.5
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    pos = torch.randn(1, 3, 3, dtype=torch.float64)
    shift = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    moved = TRANSLATION.act("point", pos, shift, mask)
    assert torch.allclose(moved[0, 0, :2], pos[0, :2] + shift[0, 0]) and torch.equal(moved[0, 0, 2], pos[0, 2])
    assert torch.equal(TRANSLATION.act("vector", pos, shift, mask)[:, 0], pos)
    assert torch.allclose(TRANSLATION.act_inverse("point", moved, shift, mask), pos.unsqueeze(1))


def test_centring_model_is_translation_invariant_and_an_origin_bound_one_is_not(tmp_path):
    heads = {"forces": {"rep": "vector"}, "moved": {"rep": "point", "target": "pos"}}
    group = {"name": "translation", "rotations": 4, "radius": 1.5}
    _, centred = _audit(tmp_path, "Displacement", group, heads=heads)
    _, origin = _audit(tmp_path, "Displacement", group, heads=heads, kwargs={"centred": False})
    assert _flag(centred, "forces") == "at_float_floor"
    assert _flag(centred, "moved") == "at_float_floor"  # a point output moves with its input
    assert _ree(origin, "forces") > 0.01 and _flag(origin, "forces") == ""
    assert _ree(origin, "moved") > 0.01


# ---------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("group, message", [
    ({"name": "so3", "radius": 1.0}, "group.radius does not apply to group so3"),
    ({"name": "translation", "radius": -1}, "must be a positive number"),
    ({"name": "translation", "shape": "cube"}, "allowed: ball, box"),
    ({"name": "permutation", "radius": 1.0}, "does not apply to group permutation"),
])
def test_bad_group_options_are_config_errors(tmp_path, group, message):
    with pytest.raises(ConfigError, match=message):
        _audit(tmp_path, "Displacement", group, heads={"forces": {"rep": "vector"}})


def test_make_group_defaults():
    assert make_group("translation", None).n_elements == 32
    assert make_group("permutation", 4, n_atoms=5).sample(2, 0).shape == (2, 4, 5)
    with pytest.raises(ValueError, match="per-atom data"):
        make_group("permutation", 4)
    with pytest.raises(ValueError, match="unknown group 'so4'; allowed: so3, octahedral"):
        make_group("so4", 4)


def test_a_sample_gets_the_same_elements_whatever_is_drawn_beside_it():
    """Elements are a function of (seed, sample id): batches, orders and padding do not matter."""
    for group in (make_group("so3", 24), make_group("so3", 8, {"sampling": "haar"}), make_group("octahedral", 6),
                  make_group("o3", 5), make_group("translation", 4)):
        everything = group.sample(torch.arange(10), 3)
        assert torch.equal(group.sample(torch.tensor([7, 2]), 3), everything[[7, 2]])
        assert not torch.equal(group.sample(torch.arange(10), 4), everything)  # another seed
    keys = make_group("permutation", 4, n_atoms=9).sample(torch.arange(3), 0)
    assert torch.equal(make_group("permutation", 4, n_atoms=5).sample(torch.arange(3), 0), keys[..., :5])  # padding


@pytest.mark.parametrize("group", ["translation", "permutation"])
@pytest.mark.parametrize("option, message", [("local", "local .* needs a rotation group"),
                                             ("interp_floor", "interp_floor .* needs a rotation group")])
def test_rotation_only_figures_are_refused_for_other_groups(group, option, message):
    # --local differentiates along so(3) and the interpolation floor rotates and back: neither
    # describes a translation or a permutation (they used to report a rotation figure, or crash).
    import equiaudit
    from test_api import SETTINGS, vectors

    with pytest.raises(ConfigError, match=message):
        equiaudit.audit(torch.nn.Identity(), vectors(8), **{**SETTINGS, "fields": {"pos": "point"}, "group": group, option: True})

"""equiaudit.audit takes a TorchSim ModelInterface and an ASE Calculator as they are.

Known answers. An invariant classical potential (TorchSim's Lennard-Jones, ASE's EMT) reads at
the float floor. The same potential in a uniform external field — every atom pushed by the same
force ``F0`` (charges ``q`` in a field ``E``: ``F0 = qE``, energy ``−F0·Σᵢ xᵢ``) — is caught with
the field's closed-form equivariance error, derived here from docs/metric.md:

* the orbit prediction of the forces is ``P(g) = g⁻¹·f(g·x) = Rᵀ(R F(x) + F0) = F(x) + Rᵀ F0``
  (``F`` the potential's own, equivariant, forces);
* over the 24 cube rotations (``group: octahedral``, enumerated: exact, no bias correction) the
  orbit mean of ``Rᵀ F0`` is 0 (no non-zero vector is fixed by the whole cube group), so
  ``f_G(x) = F(x)`` and, the loss being MSE, ``EE = mean_k ‖P_k − f_G‖²`` per atom
  ``= mean_k ‖Rₖᵀ F0‖² = |F0|²`` summed over the three components;
* the force_field task's loss averages over atoms and components, so ``EE_forces = |F0|²/3``
  for every sample, whatever the structure and the labels;
* the field's energy ``−F0·Σᵢ xᵢ`` vanishes on the centred positions equiaudit feeds (``point``
  fields are centred, and a rotation keeps ``Σᵢ xᵢ = 0``), so ``EE_energy = 0`` and the weighted
  total (weights 1) is ``EE = |F0|²/3``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import equiaudit
from equiaudit.adapters import ASECalculatorForceField, SlowModelWarning, TorchSimForceField, as_force_field
from equiaudit.batching import to_ase_atoms, unflatten

F0 = (0.3, -0.2, 0.5)  # eV/Å, the external force on every atom
FIELD_EE = sum(f * f for f in F0) / 3  # |F0|²/3, derived in the module docstring
SETTINGS = dict(task="force_field", group="octahedral", seed=0, device="cpu")


def clusters(n=6, seed=0):
    """Cu clusters (5 atoms, one sample padded to 4) near an fcc motif, float64."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.tensor([[0, 0, 0], [2.55, 0, 0], [0, 2.55, 0], [0, 0, 2.55], [2.55, 2.55, 0]], dtype=torch.float64)
    pos = motif[None].repeat(n, 1, 1) + 0.15 * torch.randn(n, 5, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[0, 4] = False
    pos[~mask] = 0.0
    return pos, torch.full((n, 5), 29), mask


def labelled(pos, z, mask, energy, forces, seed=1):
    """The data with labels = the potential's own values plus noise (so the loss is not ~0)."""
    g = torch.Generator().manual_seed(seed)
    noisy_forces = forces + 0.05 * torch.randn(forces.shape, generator=g, dtype=torch.float64)
    return {"pos": pos, "z": z, "mask": mask, "energy": energy + 0.05 * torch.randn(energy.shape, generator=g,
                                                                                          dtype=torch.float64),
            "forces": torch.where(mask[..., None], noisy_forces, 0.0)}


def check_field(result):
    assert result.heads["forces"].equiv_error == pytest.approx(FIELD_EE, rel=1e-9)
    assert abs(result.heads["energy"].equiv_error) < 1e-18
    assert result.total.equiv_error == pytest.approx(FIELD_EE, rel=1e-9)
    assert result.total.flag != "at_float_floor" and result.total.rel_equiv_error > 0.5


def check_floor(result, heads=("total",)):
    """REE at float64's rounding (a relative error ~1e-14 squared), flagged where the floor is measurable."""
    assert result.total.rel_equiv_error < 1e-20 and result.total.loss_aug > 1e-4
    for name in heads:
        head = result.total if name == "total" else result.heads[name]
        assert head.rel_equiv_error <= 10 * head.float_floor, name


# --------------------------------------------------------------------------- TorchSim


def lennard_jones():
    models = pytest.importorskip("torch_sim.models.lennard_jones")
    return models.LennardJonesModel(sigma=2.3, epsilon=0.4, cutoff=6.0, dtype=torch.float64)


def field_model(base):
    from torch_sim.models.interface import ModelInterface

    class InField(ModelInterface):
        """A TorchSim model in a uniform external field: forces + F0, energy − F0·Σx per system."""

        def __init__(self):
            super().__init__()
            self.base = base
            self._device, self._dtype = base.device, base.dtype
            self._compute_forces, self._compute_stress = True, False
            self.field = torch.tensor(F0, dtype=base.dtype)

        def forward(self, state, **kwargs):
            out = dict(self.base(state))
            per_atom = state.positions @ self.field
            out["energy"] = out["energy"] - torch.zeros_like(out["energy"]).index_add(0, state.system_idx, per_atom)
            out["forces"] = out["forces"] + self.field
            return out

    return InField()


def test_torchsim_model_one_batched_state_equals_the_model_itself():
    model = lennard_jones()
    from torch_sim import SimState

    pos, z, mask = clusters()
    wrapped = as_force_field(model)
    assert isinstance(wrapped, TorchSimForceField)
    out = wrapped(pos, z, mask)
    calls = []
    model.register_forward_hook(lambda m, args, result: calls.append(args[0].n_systems))
    wrapped(pos, z, mask)
    assert calls == [len(pos)]  # one call, one state for the whole batch
    for b in range(len(pos)):  # structure by structure, TorchSim's own state
        n = int(mask[b].sum())
        state = SimState(positions=pos[b, :n], masses=torch.ones(n, dtype=torch.float64),
                         cell=torch.zeros(1, 3, 3, dtype=torch.float64), pbc=False, atomic_numbers=z[b, :n])
        own = model(state)
        assert float(out["energy"][b]) == pytest.approx(float(own["energy"][0]), rel=1e-12)
        assert torch.allclose(out["forces"][b, :n], own["forces"], rtol=1e-12, atol=1e-12)
        assert bool((out["forces"][b, n:] == 0).all())


def test_torchsim_lennard_jones_at_the_float_floor_and_in_a_field_caught_with_its_closed_form():
    model = lennard_jones()
    pos, z, mask = clusters()
    own = TorchSimForceField(model)(pos, z, mask)
    data = labelled(pos, z, mask, own["energy"], own["forces"])
    check_floor(equiaudit.audit(model, data, **SETTINGS))
    check_field(equiaudit.audit(field_model(model), data, **SETTINGS))


# --------------------------------------------------------------------------- ASE


def emt_labels(pos, z, mask):
    from ase.calculators.emt import EMT

    energies, forces = [], []
    for atoms in to_ase_atoms(pos, z, mask):
        atoms.calc = EMT()
        energies.append(atoms.get_potential_energy())
        forces.append(torch.as_tensor(atoms.get_forces()))
    return torch.tensor(energies, dtype=torch.float64), unflatten(torch.cat(forces), mask)


def test_ase_calculator_at_the_float_floor_and_in_a_field_caught_with_its_closed_form():
    pytest.importorskip("ase")
    from ase.calculators.emt import EMT

    class EMTInField(EMT):
        """EMT in a uniform external field: forces + F0, energy − F0·Σx."""

        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            super().calculate(atoms, properties, system_changes)
            field = np.array(F0)
            shift = -float((self.atoms.positions @ field).sum())
            self.results["energy"] += shift
            self.results["free_energy"] = self.results.get("free_energy", 0.0) + shift
            self.results["forces"] = self.results["forces"] + field

    pos, z, mask = clusters()
    data = labelled(pos, z, mask, *emt_labels(pos, z, mask))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = equiaudit.audit(EMT(), data, **SETTINGS)
    # EMT gives bit-identical energies on the float floor's jittered copies (its energy floor
    # reads 0, so the total's flag cannot be set); the forces' floor is measurable and flagged.
    check_floor(result, heads=("forces",))
    assert result.heads["energy"].rel_equiv_error < 1e-20
    cost = [w for w in caught if issubclass(w.category, SlowModelWarning)]
    assert len(cost) == 1 and "one structure at a time" in str(cost[0].message)
    assert "ms per structure" in str(cost[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowModelWarning)
        check_field(equiaudit.audit(EMTInField(), data, **SETTINGS))


def test_ase_wrapper_measures_its_cost_and_keeps_padding():
    pytest.importorskip("ase")
    from ase.calculators.emt import EMT

    pos, z, mask = clusters(n=3)
    wrapped = as_force_field(EMT())
    assert isinstance(wrapped, ASECalculatorForceField) and wrapped.seconds_per_structure is None
    out = wrapped(pos.float(), z, mask)
    energy, forces = emt_labels(pos, z, mask)
    assert out["energy"].dtype == torch.float32 and out["forces"].shape == (3, 5, 3)
    assert torch.allclose(out["energy"].double(), energy, rtol=1e-6)
    assert torch.allclose(out["forces"].double(), forces, atol=1e-5)
    assert float(out["forces"][0, 4].abs().sum()) == 0.0
    assert wrapped.structures == 3 and wrapped.seconds_per_structure > 0


def test_anything_else_is_left_alone():
    module = torch.nn.Linear(3, 3)
    assert as_force_field(module) is module
    with pytest.raises(equiaudit.ConfigError if hasattr(equiaudit, "ConfigError") else Exception, match="nn.Module"):
        equiaudit.audit(object(), {"pos": torch.zeros(2, 3, 3), "z": torch.ones(2, 3)}, task="force_field")

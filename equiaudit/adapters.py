"""What people hold, behind the padded force-field signature: TorchSim models and ASE calculators.

:func:`equiaudit.audit` (and :class:`equiaudit.Auditor`) accept, besides an ``nn.Module`` with
the padded signature ``forward(pos (B, A, 3), z (B, A), mask (B, A)) -> {"energy": (B,),
"forces": (B, A, 3)}``:

* a **TorchSim** ``ModelInterface`` (package ``torch-sim-atomistic``): wrapped by
  :class:`TorchSimForceField`, which builds ONE batched ``SimState`` for all ``B·K`` rotated
  structures (flat real atoms, their ``system_idx``) and calls the model once;
* an **ASE** ``Calculator`` (EMT, any MLIP's calculator): wrapped by
  :class:`ASECalculatorForceField`, which evaluates the structures one at a time — ASE's
  calculator API takes one ``Atoms`` — so it is correct for every calculator and slow by
  nature: after the audit equiaudit warns with the measured cost per structure
  (:attr:`ASECalculatorForceField.seconds_per_structure`).

:func:`as_force_field` does the detection; anything else is returned unchanged. Both wrappers
are molecules-only (no cell: equiaudit's force-field data carries none), return ``energy``
``(B,)`` and ``forces`` ``(B, A, 3)`` (zeros on padded atoms) in the caller's dtype and
device, and compute in the wrapped model's dtype (TorchSim: ``model.dtype``; ASE: float64),
which is also the dtype the float floor is measured at.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import torch
from torch import nn

from equiaudit.batching import _valid, to_ase_atoms, unflatten

__all__ = ["TorchSimForceField", "ASECalculatorForceField", "as_force_field", "SlowModelWarning", "report_cost"]


class SlowModelWarning(UserWarning):
    """A model evaluated one structure at a time (an ASE calculator): its measured cost."""


def _dtype_anchor(dtype: torch.dtype) -> nn.Parameter:
    """A zero-size frozen parameter: it tells equiaudit the wrapper's compute dtype (inputs are
    cast to it, the float floor's jitter is sized by it) and follows ``.to(device)``."""
    return nn.Parameter(torch.zeros(0, dtype=dtype), requires_grad=False)


@contextlib.contextmanager
def _outside_inference_mode():
    """Let a model take autograd forces inside equiaudit's ``inference_mode`` evaluation.

    Yields True when inference mode was on (the caller then clones its inputs, which are
    inference tensors, and detaches the outputs)."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.enable_grad():
            yield True
    else:
        yield False


def _masses(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Atomic masses (amu) of atomic numbers ``z``, ASE's table."""
    from ase.data import atomic_masses

    table = torch.as_tensor(atomic_masses, dtype=dtype, device=z.device)
    return table[z.long().clamp(0, len(table) - 1)]


class TorchSimForceField(nn.Module):
    """A TorchSim ``ModelInterface`` behind the padded ``(pos, z, mask)`` signature.

    ``forward`` builds one ``torch_sim.SimState`` for the whole batch — ``positions`` ``(M, 3)``
    (real atoms in batch order), ``atomic_numbers`` ``(M,)``, ``masses`` (ASE's table),
    ``system_idx`` ``(M,)``, a zero ``cell`` ``(B, 3, 3)`` and ``pbc=False`` (molecules) — in the
    model's dtype and on its device, calls the model once and maps ``energy`` ``(B,)`` and
    ``forces`` ``(M, 3)`` back to ``(B,)`` / ``(B, A, 3)``. The model must compute forces
    (``compute_forces=True``). Models that take forces by autograd run outside equiaudit's
    ``inference_mode``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not getattr(model, "compute_forces", True):
            raise ValueError("this TorchSim model was built with compute_forces=False: build it with compute_forces=True")
        self.model = model
        self._anchor = _dtype_anchor(getattr(model, "dtype", torch.float64))

    def forward(self, pos: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from torch_sim import SimState

        valid = _valid(mask, pos)
        batch_size, n_atoms = valid.shape
        device = getattr(self.model, "device", pos.device)
        dtype = self._anchor.dtype
        with _outside_inference_mode() as left:
            flat_pos = pos[valid].to(device=device, dtype=dtype)
            numbers = z.to(pos.device)[valid].to(device=device, dtype=torch.long)
            if left:  # inference tensors cannot enter autograd: fresh copies
                flat_pos, numbers = flat_pos.clone(), numbers.clone()
            n_node = valid.sum(1).to(device)
            state = SimState(
                positions=flat_pos,
                masses=_masses(numbers, dtype),
                cell=torch.zeros((batch_size, 3, 3), dtype=dtype, device=device),
                pbc=False,
                atomic_numbers=numbers,
                system_idx=torch.arange(batch_size, device=device).repeat_interleave(n_node),
            )
            out = self.model(state)
            energy, forces = out["energy"], out.get("forces")
            if left:
                energy = energy.detach()
                forces = forces.detach() if forces is not None else None
        if forces is None:
            raise ValueError("the TorchSim model returned no 'forces' (build it with compute_forces=True)")
        energy = energy.reshape(batch_size).to(device=pos.device, dtype=pos.dtype)
        forces = forces.to(device=pos.device, dtype=pos.dtype)
        return {"energy": energy, "forces": unflatten(forces, valid)}


class ASECalculatorForceField(nn.Module):
    """An ASE ``Calculator`` behind the padded ``(pos, z, mask)`` signature.

    ``forward`` makes one ``ase.Atoms`` per structure (:func:`equiaudit.batching.to_ase_atoms`)
    and asks the calculator for ``get_potential_energy()`` and ``get_forces()`` — the one
    per-structure loop equiaudit allows, because an ASE calculator takes one structure at a
    time. Slow by nature; the cost is measured: :attr:`structures`, :attr:`seconds` and
    :attr:`seconds_per_structure` accumulate over calls (:meth:`reset_cost` clears them).
    No gradients flow (``--local`` and ``--dynamics`` do not apply).
    """

    def __init__(self, calculator: Any):
        super().__init__()
        self.calculator = calculator
        self._anchor = _dtype_anchor(torch.float64)
        self.reset_cost()

    def reset_cost(self) -> None:
        """Forget the structures counted so far."""
        self.structures = 0
        self.seconds = 0.0

    @property
    def seconds_per_structure(self) -> float | None:
        """Measured wall time per structure (None before the first call)."""
        return self.seconds / self.structures if self.structures else None

    def forward(self, pos: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        valid = _valid(mask, pos)
        atoms_list = to_ase_atoms(pos, z, valid)
        start = time.perf_counter()
        energies, forces = [], []
        for atoms in atoms_list:  # ASE's Calculator API: one structure per call
            atoms.calc = self.calculator
            energies.append(float(atoms.get_potential_energy()))
            forces.append(torch.as_tensor(atoms.get_forces(), dtype=torch.float64))
            atoms.calc = None
        self.seconds += time.perf_counter() - start
        self.structures += len(atoms_list)
        energy = torch.tensor(energies, dtype=torch.float64)
        flat_forces = torch.cat(forces) if forces else torch.zeros((0, 3), dtype=torch.float64)
        return {"energy": energy.to(device=pos.device, dtype=pos.dtype),
                "forces": unflatten(flat_forces.to(device=pos.device, dtype=pos.dtype), valid)}


def _is_torchsim_model(x: Any) -> bool:
    try:
        from torch_sim.models.interface import ModelInterface
    except ImportError:
        return False
    return isinstance(x, ModelInterface)


def _is_ase_calculator(x: Any) -> bool:
    try:
        from ase.calculators.calculator import BaseCalculator
    except ImportError:
        return False
    return isinstance(x, BaseCalculator)


def as_force_field(x: Any) -> Any:
    """``x`` behind the padded signature: a TorchSim ``ModelInterface`` or an ASE ``Calculator``
    wrapped; anything else (an ``nn.Module`` already) returned as it is."""
    if isinstance(x, ASECalculatorForceField):
        x.reset_cost()  # the cost reported after this audit is this audit's
    if isinstance(x, (TorchSimForceField, ASECalculatorForceField)):
        return x
    if _is_torchsim_model(x):
        return TorchSimForceField(x)
    if _is_ase_calculator(x):
        return ASECalculatorForceField(x)
    return x


def report_cost(model: Any) -> None:
    """After an audit: warn with an ASE calculator's measured cost per structure."""
    if isinstance(model, ASECalculatorForceField) and model.structures:
        name = type(model.calculator).__name__
        warnings.warn(
            f"the ASE calculator {name} was evaluated one structure at a time: {model.structures} structures, "
            f"{1e3 * model.seconds_per_structure:.3g} ms per structure ({model.seconds:.3g} s in all); "
            f"a batched model (a TorchSim model, an equiaudit family) evaluates all B·K rotated structures at once",
            SlowModelWarning, stacklevel=3)

"""``Symmetrized(model, …)``: a model made (more) equivariant by averaging over its orbit. Pure.

The wrapper has the wrapped model's signature and returns, for each output,

    f_k(x) = mean_{j=1..k} g_j⁻¹ · f(g_j · x)

with the audit's own group actions and representations (:mod:`equiaudit.groups`,
:mod:`equiaudit.representations`): ``point`` inputs are centred on their masked centroid and
rotated (``R (x − c)``), ``vector`` inputs rotated (``R v``), grids resampled or, under
the cube group, permuted exactly; outputs are mapped back by the inverse action in float64
and averaged over the k elements. ``point`` outputs get the centroid ``c`` of the first
``point`` input added back, so they live in the caller's frame.

What the average costs and buys (``docs/metric.md``): the k inputs run as one forward of
``B·k`` structures, so a call costs about k forwards. With k i.i.d. Haar rotations the
expected held-out loss of the average is ``L_sym + EE/k`` for an MSE loss (the audit's
``loss_sym`` and ``equiv_error``: the twirling rows of ``--dynamics`` measure it and name the
smallest k that removes a target share of EE); with every element of a finite group (the 24
cube rotations on grids) the wrapped model is exactly equivariant to that group.

Which elements:

* ``elements="random"`` (default): fresh elements on every call, drawn from ``seed`` and the
  call's index (a reproducible sequence; each sample of a batch gets its own elements);
* ``elements="fixed"``: one set of k elements drawn once from ``seed``, the same for every
  sample and call (a fixed rotation grid: the wrapper is then a deterministic function);
* a finite group (``group="octahedral"``, ``"icosahedral"``): all its elements, exactly.

Force fields whose forces are ``−dE/dpos`` (``grad=True``): the orbit average of the mapped
back forces is ``−∇`` of the averaged energy up to the centring: rotating ``x − c(x)`` adds
the Jacobian of the centroid, which removes the net force over the valid atoms. That
projection is applied to every per-atom ``vector`` output of a ``grad`` model, so its
forces are exactly those of the averaged energy (``tests/test_symmetrize.py`` checks them
against autograd of the averaged energy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from equiaudit.actions.points import masked_centroid
from equiaudit.errors import ConfigError, ModelOutputError
from equiaudit.groups import make_group
from equiaudit.random import SampleRandom
from equiaudit.representations import get_representation
from equiaudit.tasks import get_task

__all__ = ["Symmetrized", "ELEMENT_MODES"]

ELEMENT_MODES = ("random", "fixed")


class Symmetrized(nn.Module):
    """The orbit average ``mean_k g_k⁻¹·f(g_k·x)`` of ``model`` (see the module docstring).

    Args:
        model: the network; called as the audit calls it (``inputs=``: positional fields in
            order, or ``{argument: field}`` keywords).
        k: the number of group elements per call (the config's ``rotations``); None: the
            group's default (the whole group for ``octahedral``/``icosahedral``).
        elements: ``random`` (fresh per call, seeded) or ``fixed`` (drawn once).
        seed: seeds the elements.
        reps: representations of outputs that are not heads (``{"stress": "tensor2"}``).
        config, **keywords: the same keys as :func:`equiaudit.audit` for the representation
            and the call: ``task=``, ``fields=``, ``heads=``, ``inputs=``, ``outputs=``, ``grad=``,
            ``group=``, ``rotations=``, ``sampling=``, ``mask=``.

    Example::

        sym = equiaudit.Symmetrized(model, 8, task="force_field")
        out = sym(pos, z, mask)            # {"energy": (B,), "forces": (B, A, 3)}
    """

    def __init__(self, model: nn.Module, k: int | None = None, *, elements: str = "random", seed: int = 0,
                 reps: Mapping[str, str] | None = None, config: Any = None, **keywords: Any):
        super().__init__()
        from equiaudit.api import settings  # (api imports the plan; keep this module's imports light)

        if elements not in ELEMENT_MODES:
            raise ConfigError(f"Symmetrized: elements={elements!r} is not allowed; allowed: {', '.join(ELEMENT_MODES)}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"Symmetrized: k={k!r} must be an integer ≥ 1")
        cfg = settings(config, model_given=True, data_given=True, seed=seed, **keywords)
        try:
            preset = get_task(cfg.task)
        except ValueError as exc:
            raise ConfigError(f"Symmetrized: task: {exc}") from exc
        self.model = model
        self.elements = elements
        self.seed = int(cfg.seed)
        self.field_reps = {**preset.fields, **cfg.fields}
        self.inputs: Sequence[str] | Mapping[str, str] = cfg.model.inputs if cfg.model.inputs is not None else list(preset.inputs)
        self.outputs = cfg.model.outputs
        self.grad = bool(cfg.model.grad)
        self.mask_field = cfg.mask
        options = {**preset.options, **cfg.task_options}
        if cfg.heads is None:
            heads = {name: (h.get("output") or name, h["rep"]) for name, h in preset.default_heads(options).items()}
        else:
            preset_heads = preset.default_heads(options)
            heads = {}
            for name, head in cfg.heads.items():
                merged = {**preset_heads.get(name, {}), **{k: v for k, v in vars(head).items() if v is not None}}
                if "rep" not in merged:
                    raise ConfigError(f"Symmetrized: heads.{name}.rep is required (no preset default for this head)")
                heads[name] = (merged.get("output") or name, merged["rep"])
        self.head_outputs = [output for output, _ in heads.values()]
        self.output_reps = {output: rep for output, rep in heads.values()}
        self.output_reps.update(reps or {})
        for rep in [*self.field_reps.values(), *self.output_reps.values()]:
            try:
                get_representation(rep)
            except ValueError as exc:
                raise ConfigError(f"Symmetrized: {exc}") from exc
        any_grid = any(get_representation(r).grid for r in [*self.field_reps.values(), *self.output_reps.values()])
        # Grids default to the exact cube group (the audit's default for voxels); points to so3.
        name = cfg.group or ("octahedral" if any_grid else preset.group)
        group_options = dict(cfg.group_options)
        if cfg.sampling is not None:
            group_options["sampling"] = cfg.sampling
        try:
            # k = 1 (one random rotation per call: test-time augmentation) is the first of two
            # draws: each element of a draw is marginally Haar. The audit needs k ≥ 2, this does not.
            self.group = make_group(name, 2 if k == 1 else k if k is not None else cfg.rotations, group_options)
        except ValueError as exc:
            raise ConfigError(f"Symmetrized: group: {exc}") from exc
        self.k = 1 if k == 1 else self.group.n_elements
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return f"k={self.k}, group={self.group.label}, elements={self.elements}, seed={self.seed}"

    def _draw(self, n: int, device: torch.device) -> torch.Tensor:
        """Group elements ``(n, k, ...)`` float64 for one call."""
        if self.elements == "fixed":
            random, ids = SampleRandom.named(self.seed, "symmetrize"), torch.zeros(n, dtype=torch.int64)
        else:
            call = int(self.calls)
            self.calls += 1
            random, ids = SampleRandom.named(self.seed, f"symmetrize/{call}"), torch.arange(n, dtype=torch.int64)
        return self.group.sample(ids, random)[:, : self.k].to(device)

    def _named_inputs(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], list[tuple[str, str | int]]]:
        """``{field: value}`` and where each came from (keyword name or position)."""
        named: dict[str, Any] = {}
        places: list[tuple[str, str | int]] = []
        if isinstance(self.inputs, Mapping):
            for argument, field in self.inputs.items():
                if argument in kwargs:
                    named[field] = kwargs[argument]
                    places.append((field, argument))
            for i, value in enumerate(args):
                named.setdefault(f"__arg{i}", value)
        else:
            for i, field in enumerate(self.inputs):
                if i < len(args):
                    named[field], place = args[i], i
                elif field in kwargs:
                    named[field], place = kwargs[field], field
                else:
                    continue
                places.append((field, place))
        return named, places

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        named, places = self._named_inputs(args, kwargs)
        tensors = [v for v in named.values() if isinstance(v, torch.Tensor)]
        if not tensors:
            raise ConfigError("Symmetrized: no tensor input to symmetrize (check inputs=)")
        b = tensors[0].shape[0]
        device = tensors[0].device
        elements = self._draw(b, device)
        k = elements.shape[1]
        mask = named.get(self.mask_field) if self.mask_field else None
        mask = mask if isinstance(mask, torch.Tensor) else None
        centroid = None
        new_args, new_kwargs = list(args), dict(kwargs)
        for field, place in places:
            value = named[field]
            if not isinstance(value, torch.Tensor):
                continue
            rep = self.field_reps.get(field, "scalar")
            if get_representation(rep).centred and centroid is None:
                centroid = masked_centroid(value.double(), mask)
            orbit = self.group.action.act(rep, value.double() if value.is_floating_point() else value, elements, mask)
            orbit = orbit.reshape(b * k, *orbit.shape[2:])
            orbit = orbit.to(value.dtype) if value.is_floating_point() else orbit
            if self.grad and orbit.is_floating_point() and not orbit.requires_grad:
                orbit = orbit.detach().requires_grad_(True)  # the model differentiates through its inputs
            if isinstance(place, int):
                new_args[place] = orbit
            else:
                new_kwargs[place] = orbit
        keep_graph = torch.is_grad_enabled()
        # A grad model differentiates through its inputs whatever the caller's mode.
        with torch.enable_grad() if self.grad else contextlib.nullcontext():
            out = self.model(*new_args, **new_kwargs)
        named_out, rebuild = self._named_outputs(out)
        averaged = {}
        for name, value in named_out.items():
            averaged[name] = self._average(name, value, elements, mask, centroid, b, k)
            if not keep_graph:
                averaged[name] = averaged[name].detach()
        return rebuild(averaged)

    def _named_outputs(self, out: Any):
        if isinstance(out, Mapping):
            return dict(out), lambda d: type(out)(d) if not isinstance(out, dict) else d
        single = isinstance(out, torch.Tensor)
        values = (out,) if single else tuple(out)
        names = list(self.outputs or self.head_outputs)
        if len(names) != len(values):
            raise ModelOutputError(f"Symmetrized: the model returned {len(values)} output(s) but outputs names {len(names)}: {names}")
        if single:
            return {names[0]: values[0]}, lambda d: d[names[0]]
        return dict(zip(names, values)), lambda d: tuple(d[n] for n in names)

    def _average(self, name: str, value: torch.Tensor, elements: torch.Tensor, mask: torch.Tensor | None,
                 centroid: torch.Tensor | None, b: int, k: int) -> torch.Tensor:
        """``mean_k g_k⁻¹ · value[b, k]`` for one output ``(B·k, ...)`` → ``(B, ...)``."""
        rep_name = self.output_reps.get(name)
        if rep_name is None:
            raise ModelOutputError(f"Symmetrized: output {name!r} has no representation; name it in heads= or "
                                   f"reps={{{name!r}: 'tensor2'}} (allowed: scalar, point, vector, …)")
        rep = get_representation(rep_name)
        orbit = value.double().reshape(b, k, *value.shape[1:])
        back = self.group.action.act_inverse(rep_name, orbit, elements, mask).mean(1)
        if rep.centred and centroid is not None and back.dim() == 3:
            back = back + centroid  # point outputs back in the caller's frame
        if (self.grad and rep_name == "vector" and centroid is not None and mask is not None and back.dim() == 3
                and back.shape[1] == mask.shape[1]):
            # −∇ of the averaged energy: the centroid's Jacobian removes the net force over the valid atoms.
            weights = mask.to(back.dtype).unsqueeze(-1)
            net = (back * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
            back = (back - net) * weights
        return back.to(value.dtype)

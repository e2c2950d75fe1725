"""The GPU fast path: pinned host memory, batches staged on a side stream, ``torch.compile``.

On a CUDA device :meth:`equiaudit.plan.AuditPlan.evaluate` takes its batches from
:func:`staged_batches`, which, while the model runs on batch ``i`` (default stream),
copies batch ``i+1`` to the device and builds its orbit inputs ``(B·K, ...)`` on a side
stream, so the rotations, casts and host-to-device copies of the next batch overlap the
forward passes of this one:

* the prepared data sit in pinned (page-locked) host memory (:func:`pinned`), so the
  copies are ``non_blocking`` DMA transfers that do not stall the host thread;
* before batch ``i`` is used, the default stream waits for the side stream
  (``wait_stream``), which at that point holds only batch ``i``'s staging (batch
  ``i+1``'s is enqueued after the wait);
* tensors made on the side stream and used on the default one are marked with
  ``record_stream``, so the caching allocator does not hand their memory to the next
  staging while the default stream still reads them.

Everything is numerically the same as the plain path (same operations, same order per
batch), so the statistics are identical. On the CPU (or with ``prebuild=False``) the
batches pass through untouched: there is nothing to overlap.

:func:`compile_model` is ``--compile``: ``nn.Module.compile()`` in place, so the
``state_dict`` keys stay those of the plain module (checkpoints load into it as before)
and loading a checkpoint's weights (in place) needs no recompilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

__all__ = ["pinned", "staged_batches", "compile_model"]


def pinned(prepared, device: torch.device | str):
    """``prepared`` (:class:`~equiaudit.plan.Prepared`) with its tensors in pinned host
    memory when ``device`` is CUDA (for ``non_blocking`` copies); unchanged otherwise."""
    if torch.device(device).type != "cuda":
        return prepared

    def pin(value: torch.Tensor | None):
        return value.pin_memory() if value is not None and value.device.type == "cpu" else value

    return dataclasses.replace(prepared, data={k: pin(v) for k, v in prepared.data.items()}, elements=pin(prepared.elements))


def staged_batches(plan, model, prepared, selected: Callable[[int], bool] | None = None, *,
                   prebuild: bool | None = None) -> Iterator[tuple]:
    """``(number, fields, ids, elements, index, rotated, chosen)`` for every batch of
    ``prepared`` in order; ``chosen``: ``selected(number)`` (all by default). For chosen
    batches on a CUDA device (``prebuild``: default, CUDA) ``fields`` and ``elements`` are
    on the device and ``rotated`` holds the orbit inputs, built one batch ahead on a side
    stream (see the module docstring); otherwise ``rotated`` is None and the tensors are
    as stored (the plan moves them)."""
    from equiaudit.engine import orbit_inputs

    device = plan.device
    cuda = device.type == "cuda"
    prebuild = cuda if prebuild is None else prebuild
    batches = list(prepared.batches(plan.batch_size))
    chosen = [selected is None or selected(i) for i in range(len(batches))]
    if not prebuild:
        for number, (fields, ids, elements, index) in enumerate(batches):
            yield number, fields, ids, elements, index, None, chosen[number]
        return
    side = torch.cuda.Stream(device) if cuda else None
    main = torch.cuda.current_stream(device) if cuda else None

    def stage(number: int) -> tuple[dict, torch.Tensor, dict]:
        fields, _, elements, _ = batches[number]
        # no_grad, not inference_mode: the floors and the local metric reuse these tensors outside it.
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext(), torch.no_grad():
            on_device = {k: v.to(device, non_blocking=True) for k, v in fields.items()}
            elements = elements.to(device, non_blocking=True)
            rotated = orbit_inputs(model, on_device, elements, plan.spec)
        return on_device, elements, rotated

    def following(number: int) -> int | None:
        return next((i for i in range(number + 1, len(batches)) if chosen[i]), None)

    ahead = following(-1)
    staged = stage(ahead) if ahead is not None else None
    for number, (fields, ids, elements, index) in enumerate(batches):
        if not chosen[number]:
            yield number, fields, ids, elements, index, None, False
            continue
        current = staged
        if cuda:
            main.wait_stream(side)  # only batch `number`'s staging is on the side stream yet
            for tensor in _tensors(current):
                tensor.record_stream(main)
        ahead = following(number)
        staged = stage(ahead) if ahead is not None else None  # overlaps this batch's forwards
        on_device, elements_on_device, rotated = current
        yield number, on_device, ids, elements_on_device, index, rotated, True


def _tensors(staged) -> Iterator[torch.Tensor]:
    on_device, elements, rotated = staged
    yield from on_device.values()
    yield elements
    yield from rotated.values()


def compile_model(model: torch.nn.Module, **options) -> torch.nn.Module:
    """``model`` with a ``torch.compile`` d forward (in place; see the module docstring).
    ``options`` go to ``torch.compile`` (``mode``, ``dynamic``...)."""
    if not isinstance(model, torch.nn.Module):
        from equiaudit.errors import ConfigError

        raise ConfigError(f"--compile needs a torch.nn.Module, got {type(model).__name__}")
    model.compile(**options)
    return model


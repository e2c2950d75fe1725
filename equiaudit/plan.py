"""The audit plan: settings + data → everything fixed across checkpoints; and the one evaluation path. Pure.

:func:`resolve` turns validated settings (:class:`~equiaudit.io.config.AuditConfig`) and the
data's fields into an :class:`AuditPlan`: the orbit spec (fields, heads, how to call the
model), the group, the task's options, the floors and breakdowns asked for, batch sizes,
device. It reads no file and builds no model: the CLI's runner, :func:`equiaudit.audit`,
:class:`equiaudit.EquivarianceMetric` and the training callbacks all build their plan here.

Then every caller evaluates the same way:

* :meth:`AuditPlan.prepare` adds the task's derived fields and draws each sample's group
  elements — per sample, from the seed and the sample's id (:mod:`equiaudit.random`);
* :meth:`AuditPlan.evaluate_batch` runs one batch (the orbit forward passes, and where
  asked the float floor's null orbit, the interpolation round trip, the local metric and
  the breakdown columns) into :class:`~equiaudit.stats.SampleStats`;
* :meth:`AuditPlan.evaluate` does that over a prepared dataset, batch by batch;
* :meth:`AuditPlan.summarize` reduces finalized statistics to an
  :class:`~equiaudit.result.AuditResult` (bootstrap interval, floors, breakdown rows).

Because statistics are per sample and keyed by id, the pieces of one audit can be made
anywhere (batches of a loader, ranks, shards) and summarized together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from equiaudit import dynamics as dyn
from equiaudit.analysis import DynamicsOptions
from equiaudit.breakdown import BUILTIN_SPLITS, BreakdownOptions, batch_columns, breakdown_rows, split_fields
from equiaudit.chunking import AutoChunks, describe
from equiaudit.engine import HeadSpec, OrbitSpec, evaluate_orbits, evaluate_round_trip
from equiaudit.errors import ConfigError, DataError
from equiaudit.fast import staged_batches
from equiaudit.floor import FLOOR_COPIES, FLOOR_SAMPLES, flag, null_orbit_error
from equiaudit.groups import GROUPS, Group, RotationAction, make_group
from equiaudit.io.config import AuditConfig, check_rotation_rows
from equiaudit.local import local_batch
from equiaudit.metrics import ratio_standard_error
from equiaudit.null import MIN_SKILL, NOT_LEARNED, loss_null, null_columns, skill, skill_flag
from equiaudit.metrics import summarize as summarize_ratio
from equiaudit.model_state import evaluation_mode
from equiaudit.random import SampleRandom, sample_ids
from equiaudit.representations import get_representation, position_fields
from equiaudit.result import AuditResult, HeadResult
from equiaudit.rotations import is_signed_permutation
from equiaudit.stats import SampleStats, with_total
from equiaudit.tasks import CUSTOM, TaskPreset, get_task

__all__ = ["AuditPlan", "Prepared", "resolve", "resolve_device", "default_batch_size", "evaluation_mode", "ORBIT_BYTES"]

# Budget for one float64 orbit tensor (B, K, *E) of one head when batch_size is not set:
# large grids (VoxMol's 64³ × 8 channels) then get small batches instead of running out of memory.
ORBIT_BYTES = 64 * 2**20
DEFAULT_BATCH_SIZE = 64
# A prepared field (R,) int64: the sample each row comes from, for tasks that evaluate a sample
# on several rows (flow.t, diffusion.sigma); the interval then resamples clusters, not rows.
CLUSTER = "cluster"

# --target-ci never stops on fewer samples than this (see AuditPlan.target_reached).
TARGET_MIN_SAMPLES = 32
# ... and skips the bootstrap while TARGET_SCREEN_Q × the delta-method standard error exceeds
# the target (the bootstrap-t quantile q of the interval r ± q·se is about 1.96 or more at 95 %).
TARGET_SCREEN_Q = 1.5


@dataclass(frozen=True)
class Prepared:
    """A dataset ready to evaluate: fields ``(N, ...)`` with the task's derived ones, the
    samples' ids ``(N,)`` int64 (their position in the audit), group elements
    ``(N, K, ...)`` and, where known, each sample's index in the data file ``(N,)``."""

    data: dict[str, torch.Tensor]
    ids: torch.Tensor
    elements: torch.Tensor
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_samples(self) -> int:
        """Samples, not rows: a sample evaluated at several fixed times (``flow.t``) or noise
        levels (``diffusion.sigma``) is one cluster of rows."""
        clusters = self.data.get(CLUSTER)
        return len(self.ids) if clusters is None else int(torch.unique(clusters).numel())

    def head(self, n: int | None) -> Prepared:
        """The first ``n`` samples (all of them for None)."""
        if n is None or n >= len(self.ids):
            return self
        return Prepared({k: v[:n] for k, v in self.data.items()}, self.ids[:n], self.elements[:n],
                        None if self.index is None else self.index[:n])

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(fields, ids, elements, index)`` of consecutive batches."""
        n = len(self.ids)
        for start in range(0, n, batch_size):
            part = slice(start, min(start + batch_size, n))
            index = None if self.index is None else self.index[part]
            yield {k: v[part] for k, v in self.data.items()}, self.ids[part], self.elements[part], index


@dataclass(frozen=True)
class AuditPlan:
    """Everything that stays fixed across the checkpoints of an audit (see the module docstring).

    Attributes:
        spec: fields, heads, model call and the group (:class:`~equiaudit.engine.OrbitSpec`).
        seed: seeds every per-sample draw (elements, task noise, floor jitter) and the bootstrap.
        batch_size: samples per batch (each batch is one set of forward passes of
            ``batch_size × K`` inputs, chunked by ``spec.chunk_size`` or ``spec.chunks``).
        bootstrap: bootstrap resamples of the interval (0: none).
        device: where the model runs.
        task, task_options: the preset and its resolved options (``flow:``, ``voxel:``).
        float_floor, interp_floor, local: the extra figures to measure.
        breakdown: what ``breakdown.csv`` splits by (None: no breakdown rows).
        dynamics: gradients, curvature, landscape, twirling (``--dynamics``; None: none).
        model_dtype: cast the model's floating parameters to this (None: keep its own).
        config: the settings the plan was resolved from (hash, ``run.json``), if any.
        target_ci: ``--target-ci``: evaluate batches in order only until the total REE's 95 %
            interval is at most ± this (REE fraction units); None: every sample.
        min_skill: ``--min-skill``: a head (or the total) whose skill ``1 − L_sym/loss_null`` is
            below this is flagged ``not_learned`` (:mod:`equiaudit.null`).
    """

    spec: OrbitSpec
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    bootstrap: int = 1000
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    task: TaskPreset = CUSTOM
    task_options: Mapping[str, Any] = field(default_factory=dict)
    float_floor: bool = True
    interp_floor: bool = False
    local: bool = False
    breakdown: BreakdownOptions | None = None
    dynamics: DynamicsOptions | None = None
    model_dtype: torch.dtype | None = None
    config: AuditConfig | None = None
    target_ci: float | None = None
    min_skill: float = MIN_SKILL

    @property
    def group(self) -> Group:
        return self.spec.group

    @property
    def heads(self) -> list[str]:
        return [h.name for h in self.spec.heads]

    @property
    def chunking(self) -> dict[str, Any]:
        """The chunk size and, for ``chunk_size: auto``, how it was chosen (``run.json``'s ``chunking``)."""
        return describe(self.spec)

    def config_hash(self) -> str | None:
        return self.config.settings_hash() if self.config is not None else None

    def random(self, stream: str) -> SampleRandom:
        return SampleRandom.named(self.seed, stream)

    def breakdown_identity(self, fields: Mapping[str, torch.Tensor] | None = None) -> str:
        """What shapes this plan's extra rows (breakdown options and the per-sample fields split
        by; the dynamics options), as a string; ``""`` with neither. The cache keys the
        breakdown, dynamics and twirl rows it stores on it."""
        if self.breakdown is None and self.dynamics is None:
            return ""
        options = dataclasses.asdict(self.breakdown) if self.breakdown is not None else {}
        if fields is not None and self.breakdown is not None:
            options["by"] = split_fields(fields, self.breakdown)
        if self.dynamics is not None:
            options["dynamics"] = dataclasses.asdict(self.dynamics)
        return json.dumps(options, sort_keys=True, default=list)

    @property
    def twirl_ks(self) -> tuple[int, ...]:
        """The k of test-time twirling: 1, 2, 4, … K (empty when not asked)."""
        return dyn.default_ks(self.group.n_elements) if self.dynamics is not None and self.dynamics.twirl else ()

    def objective(self, model: torch.nn.Module, prepared: Prepared, *, samples: int | None = None):
        """The audit as a differentiable objective (:data:`equiaudit.dynamics.HeadObjective`):
        a closure yielding, per batch of the first ``samples`` samples, ``{head: (L_sym part,
        EE part)}`` — per-sample values summed and divided by the number of samples, so the
        parts add up to the dataset's ``L_sym`` and bias-corrected ``EE`` of each head. The
        same samples, elements and evaluation as :meth:`evaluate`, with the graph kept."""
        part = prepared.head(samples)
        n = len(part)

        def closure():
            for batch, _, elements, _ in part.batches(self.batch_size):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                results = evaluate_orbits(model, batch, elements.to(self.device), self.spec, differentiable=True)
                yield split_parts(results, n)

        return closure

    # ------------------------------------------------------------------ preparing data

    def prepare(self, data: Mapping[str, torch.Tensor], ids: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> Prepared:
        """The task's derived fields and the group elements of ``data`` ``(N, ...)``.

        ``ids`` ``(N,)``: the samples' ids (default ``0 … N−1``, their order in the data);
        every derived value of a sample depends on the seed and its id only. ``index``: the
        samples' indices in the data file, reported by the worst-sample breakdown.

        A task that evaluates each sample on T rows (``flow.t``) returns ``N·T`` rows with a
        ``cluster`` field; the result then has ``N·T`` rows, ids ``id·T + j`` and the index repeated.
        """
        n = len(next(iter(data.values())))
        ids = sample_ids(n) if ids is None else torch.as_tensor(ids, dtype=torch.int64)
        prepared = self.task.prepare(dict(data), self.task_options, self.random("task"), ids)
        if CLUSTER in prepared:
            # T consecutive rows per sample (e.g. flow.t): row j of sample `id` is audited as
            # sample id·T + j, with its own rotations; `cluster` keeps the sample for the interval.
            repeat = len(prepared[CLUSTER]) // n
            ids = ids.repeat_interleave(repeat) * repeat + torch.arange(repeat, dtype=torch.int64).repeat(n)
            index = None if index is None else torch.as_tensor(index).repeat_interleave(repeat)
        check_rotation_rows(len(ids), self.group.n_elements)  # before allocating (N, K, 3, 3)
        return Prepared(prepared, ids, self.group.sample(ids, self.random("rotations")), index)

    # ------------------------------------------------------------------ evaluating

    def n_batches(self, n_samples: int) -> int:
        """How many batches :meth:`evaluate` cuts ``n_samples`` into (batch ``i`` holds samples
        ``i·batch_size …``): the unit that ranks and shards divide."""
        return -(-n_samples // self.batch_size)

    def evaluate(self, model: torch.nn.Module, prepared: Prepared, *, piece: int = 0,
                 on_batch: Callable[[int, int], None] | None = None,
                 batches: Callable[[int], bool] | None = None,
                 stop: Callable[[int, SampleStats], bool] | None = None,
                 gradients: dyn.GradientAccumulator | None = None) -> SampleStats:
        """Statistics of ``model`` on every batch of ``prepared`` (``on_batch(done, total)``
        reports progress in samples). ``batches(i)`` selects which batches to evaluate (a
        rank's share of a sharded audit); all of them by default. ``stop(i, stats)``, called
        after batch ``i`` (evaluated here or not), ends the evaluation when it returns True;
        by default :meth:`target_reached` when :attr:`target_ci` is set. ``gradients``
        (:meth:`gradient_accumulator`): accumulate the gradient split from the same forward passes."""
        stats = SampleStats(self.heads, piece)
        limit = self.split_rows(prepared)
        if stop is None and self.target_ci is not None:
            stop = lambda number, so_far: self.target_reached(so_far)  # noqa: E731
        with evaluation_mode(model):
            # On CUDA the next batch is copied and rotated on a side stream meanwhile (equiaudit.fast).
            for number, batch, ids, elements, index, rotated, chosen in staged_batches(self, model, prepared, batches):
                if chosen:
                    self.evaluate_batch(model, batch, ids, elements, stats=stats, index=index, rotated=rotated,
                                        gradients=gradients, rows=(number * self.batch_size, limit))
                if on_batch is not None:
                    on_batch(min((number + 1) * self.batch_size, len(prepared)), len(prepared))
                if stop is not None and stop(number, stats):
                    break
        return stats

    def target_reached(self, stats: SampleStats) -> bool:
        """``--target-ci``: the 95 % interval of the total REE of ``stats`` is at most
        ±:attr:`target_ci` (the interval :meth:`summarize` reports for them). Fewer than
        :data:`TARGET_MIN_SAMPLES` samples (clusters, for rows at several fixed t) never
        suffice: a bootstrap over a handful of samples can be narrow by chance."""
        if self.target_ci is None or stats.n_samples < TARGET_MIN_SAMPLES:
            return False
        aug, error = self._total_per_sample(stats)
        if len(aug) < TARGET_MIN_SAMPLES:
            return False
        # Screen before the bootstrap, which is checked after every batch: the half-width is
        # q·se with q the bootstrap-t quantile (≈ 1.96 and above at 95 %); while even 1.5·se is
        # wider than the target, the interval cannot be within it. Without the screen, a target
        # never reached cost 4× the audit of a small model (4096 samples in batches of 32).
        if not TARGET_SCREEN_Q * ratio_standard_error(aug, error) <= self.target_ci:
            return False
        low, high = self._interval(aug, error)
        return math.isfinite(low) and math.isfinite(high) and (high - low) / 2 <= self.target_ci

    def total_interval(self, stats: SampleStats, *, min_samples: int = 0) -> tuple[float, float] | None:
        """The 95 % interval of the total REE of ``stats``, exactly as :meth:`summarize` makes it
        (resampling clusters when rows share a sample); None with fewer than ``min_samples``
        independent samples."""
        aug, error = self._total_per_sample(stats)
        if len(aug) < min_samples:
            return None
        return self._interval(aug, error)

    def _total_per_sample(self, stats: SampleStats) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted total ``(L_aug, EE)`` per independent sample ``(N,)`` (cluster means
        when rows share a sample), what the total's interval resamples."""
        names = [f"{prefix}/{h}" for prefix in ("loss_aug", "equiv_error") for h in self.heads] + [CLUSTER]
        samples = stats.finalized(columns=names).tables["samples"].columns()
        aug, error = self._weighted("loss_aug", samples)["total"], self._weighted("equiv_error", samples)["total"]
        if samples.get(CLUSTER) is not None:
            aug, error = _cluster_means(aug, error, samples[CLUSTER])
        return aug, error

    def _interval(self, aug: torch.Tensor, error: torch.Tensor) -> tuple[float, float]:
        s = summarize_ratio(aug, error, n_bootstrap=self.bootstrap, generator=torch.Generator().manual_seed(self.seed))
        return s.ci_low, s.ci_high

    def _weighted(self, prefix: str, table: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``{"total", *heads}`` per-row values of the columns ``prefix/<head>`` (None when absent)."""
        if f"{prefix}/{self.heads[0]}" not in table:
            return None
        weights = {h.name: h.weight for h in self.spec.heads}
        return with_total({h: table[f"{prefix}/{h}"].double() for h in weights}, weights)

    def evaluate_batch(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], ids: torch.Tensor,
                       elements: torch.Tensor, *, stats: SampleStats, index: torch.Tensor | None = None,
                       rotated: Mapping[str, torch.Tensor] | None = None,
                       gradients: dyn.GradientAccumulator | None = None, rows: tuple[int, int] = (0, 0)) -> SampleStats:
        """Evaluate one prepared batch (fields ``(B, ...)``, ids ``(B,)``, elements ``(B, K, ...)``,
        optional file indices ``(B,)``) into ``stats``. The model must be in eval mode on
        :attr:`device` (see :func:`evaluation_mode`). ``rotated``: the orbit inputs, if built
        already (:func:`equiaudit.fast.staged_batches`).

        ``gradients``: the gradient split is accumulated from this same forward pass (kept
        differentiable, then two backward passes per head); ``rows = (first, n)``: the batch's
        first row's position and the number of leading rows the split covers (``dynamics.samples``).
        """
        device = self.device
        batch = {k: v.to(device) for k, v in batch.items()}
        elements = elements.to(device)
        spec = self.spec
        ks = self.twirl_ks
        first, n_rows = rows
        differentiable = gradients is not None and first < n_rows
        results = evaluate_orbits(model, batch, elements, spec, keep_predictions=bool(ks), rotated=rotated,
                                  differentiable=differentiable)
        # The statistics need no graph (the split, below, does); a grad model's floor and local pass enable their own.
        self._record_batch(model, batch, ids, elements, {h: r.detached() for h, r in results.items()} if differentiable else results,
                           stats, index)
        if differentiable:
            chosen = first + torch.arange(len(ids), device=device) < n_rows
            gradients.add(split_parts(results, n_rows, chosen), rows=int(chosen.sum()))
        return stats

    def _record_batch(self, model, batch, ids, elements, results, stats: SampleStats, index) -> None:
        """The per-sample columns of one evaluated batch (and its floor, interpolation, local,
        twirl and breakdown figures) into ``stats``."""
        device, spec, ks = self.device, self.spec, self.twirl_ks
        ids = ids.cpu()
        columns: dict[str, torch.Tensor] = {"id": ids, "origin": stats.origins(len(ids))}
        if CLUSTER in batch:
            columns[CLUSTER] = batch[CLUSTER].cpu()
        if index is not None:
            if len(index) != len(ids):  # one file index per sample of a task with T rows per sample
                index = torch.as_tensor(index).repeat_interleave(len(ids) // len(index))
            columns["index"] = index
        for head, result in results.items():
            columns[f"loss_aug/{head}"] = result.loss_aug
            columns[f"equiv_error/{head}"] = result.equiv_error
            columns[f"loss_rot/{head}"] = result.loss_per_rotation
            columns[f"error_rot/{head}"] = result.equiv_error_per_rotation
        for head_spec in spec.heads:
            # The null predictor's sufficient statistics (equiaudit.null): from the targets, no forward pass.
            columns.update(null_columns(head_spec, spec, batch, self.task.denoises.get(head_spec.name)))
        for head_spec in spec.heads if ks else ():
            result = results[head_spec.name]
            try:
                twirl = dyn.twirled_loss(result.pred.detach(), result.target, head_spec.loss, ks=ks, weight=result.weight,
                                         exact=spec.group.exact, blocks=None if spec.group.exact else spec.group.blocks,
                                         huber_delta=head_spec.huber_delta, generator=torch.Generator().manual_seed(self.seed))
            except ValueError:
                continue  # a non-quadratic loss on blocked (quasi) rotations: no unbiased twirl (use sampling: haar)
            columns[f"twirl/{head_spec.name}"] = twirl.loss_twirled
        if self.interp_floor:
            for head, result in evaluate_round_trip(model, batch, elements, spec).items():
                columns[f"interp/{head}"] = result.equiv_error
        if self.local:
            for head, (error, scale) in local_batch(model, batch, spec).items():
                columns[f"local_error/{head}"] = error
                columns[f"local_scale/{head}"] = scale
        if self.breakdown is not None:
            extra, blocks = batch_columns(batch, elements, results, spec, self.breakdown)
            columns.update(extra)
            for block in blocks:
                row = block.pop("row")
                stats.tables["units"].add(id=ids[row], origin=columns["origin"][row], **block)
        stats.tables["samples"].add(**columns)
        if self.float_floor:
            chosen = ids < FLOOR_SAMPLES
            if chosen.any():
                subset = {k: v[chosen.to(device)] for k, v in batch.items()}
                errors = null_orbit_error(model, subset, ids[chosen].to(device), spec, seed=self.seed, n_copies=FLOOR_COPIES)
                stats.tables["floor"].add(id=ids[chosen], origin=columns["origin"][chosen],
                                          **{f"floor/{h}": e for h, e in errors.items()})

    # ------------------------------------------------------------------ reducing

    def summarize(self, stats: SampleStats, *, seconds: float = 0.0) -> AuditResult:
        """The figures of finalized-or-not statistics (they are finalized here)."""
        stats = stats.finalized()
        samples = stats.tables["samples"].columns()
        if not samples or len(samples["id"]) == 0:
            raise DataError("no samples were evaluated: the data is empty")
        weighted = self._weighted
        augs, errors = weighted("loss_aug", samples), weighted("equiv_error", samples)
        floors = weighted("floor", stats.tables["floor"].columns())
        interps = weighted("interp", samples)
        local_errors, local_scales = weighted("local_error", samples), weighted("local_scale", samples)
        clusters = samples.get(CLUSTER)
        nulls = {h: loss_null(h, samples) for h in self.heads}
        nulls["total"] = sum(h.weight * nulls[h.name] for h in self.spec.heads)
        out: dict[str, HeadResult] = {}
        for name in augs:
            aug, error = augs[name], errors[name]
            if clusters is not None:
                aug, error = _cluster_means(aug, error, clusters)
            s = summarize_ratio(aug, error, n_bootstrap=self.bootstrap, generator=torch.Generator().manual_seed(self.seed))
            extra: dict[str, Any] = {}
            if interps is not None:
                extra["interp_floor"] = interps[name].mean().item() / s.loss_aug if s.loss_aug > 0 else math.nan
            if floors is not None and len(floors[name]):
                floor = floors[name].mean().item() / s.loss_aug if s.loss_aug > 0 else math.nan
                extra["float_floor"], extra["flag"] = floor, flag(s.rel_equiv_error, floor)
            if local_errors is not None:
                err, scale = local_errors[name].sum().item(), local_scales[name].sum().item()
                extra["local_equiv_error"] = err / len(augs[name])  # per row
                extra["rel_local_equiv_error"] = err / scale if scale > 0 else math.nan
            null = nulls[name]
            extra["skill"], extra["loss_null"] = skill(s.loss_sym, null), null
            if skill_flag(extra["skill"], self.min_skill):
                extra["flag"] = NOT_LEARNED  # before at_float_floor: a model that learnt nothing is not "equivariant"
            out[name] = HeadResult(name, s.loss_aug, s.loss_sym, s.equiv_error, s.rel_equiv_error, s.ci_low, s.ci_high,
                                   s.n_samples, s.median_rel_equiv_error, **extra)
        rows = breakdown_rows(stats, self.spec, self.breakdown) if self.breakdown is not None else []
        twirl = self._twirl_rows(weighted("twirl", samples), augs, errors, out)
        total = out.pop("total")
        return AuditResult(total, out, n_rotations=self.group.n_elements, group=self.group.name, group_label=self.group.label,
                           config_hash=self.config_hash(), breakdown=rows, twirl=twirl, seconds=seconds,
                           head_weights={h.name: h.weight for h in self.spec.heads})

    def _twirl_rows(self, twirled: dict[str, torch.Tensor] | None, augs: Mapping[str, torch.Tensor],
                    errors: Mapping[str, torch.Tensor], results: Mapping[str, HeadResult]) -> list[dict]:
        """``twirl.csv`` rows: per head and k, the held-out loss of the k-rotation average."""
        if twirled is None:
            return []
        rows = []
        for head, values in twirled.items():  # values (N, n_k); augs, errors (N,)
            r = results[head]
            losses = values.mean(0)
            share = dyn.share_of_equiv_error_removed(augs[head], values, errors[head])
            target = self.dynamics.twirl_target if self.dynamics is not None else 0.9
            smallest = dyn.smallest_k_removing(self.twirl_ks, share, target)
            for k, loss, removed in zip(self.twirl_ks, losses.tolist(), share.tolist()):
                rows.append({"head": head, "k": k, "loss_twirled": loss, "share_of_equiv_error_removed": removed,
                             "loss_aug": r.loss_aug, "loss_sym": r.loss_sym, "equiv_error": r.equiv_error,
                             "smallest_k": smallest, "twirl_target": target})
        return rows

    def gradient_accumulator(self, model: torch.nn.Module) -> dyn.GradientAccumulator | None:
        """Where :meth:`evaluate` accumulates the gradient split (``dynamics.gradients``), over the
        parameters ``dynamics.params`` selects; None when no split is asked for."""
        from equiaudit.analysis import select_params

        if self.dynamics is None or not self.dynamics.gradients:
            return None
        params = [p for _, p in select_params(model, self.dynamics.params)]
        return dyn.GradientAccumulator(params, {h.name: h.weight for h in self.spec.heads})

    def split_rows(self, prepared: Prepared) -> int:
        """How many leading rows of ``prepared`` the gradient split covers (``dynamics.samples``, all by default)."""
        samples = None if self.dynamics is None else self.dynamics.samples
        return len(prepared) if samples is None else min(samples, len(prepared))

    def accumulated_splits(self, gradients: dyn.GradientAccumulator | None, prepared: Prepared) -> dict | None:
        """The split accumulated by :meth:`evaluate`, when it covered every row asked for; None
        otherwise (no split asked, or the evaluation stopped early, e.g. at ``target_ci``, or
        skipped batches): :meth:`with_dynamics` then computes it in a pass of its own."""
        if gradients is None or gradients.rows != self.split_rows(prepared):
            return None
        return gradients.splits()

    def audit(self, model: torch.nn.Module, prepared: Prepared, *, step: int | None = None, **options) -> AuditResult:
        """:meth:`evaluate` (with the gradient split on the same forward passes, when asked),
        :meth:`summarize` and :meth:`with_dynamics`."""
        start = time.perf_counter()
        gradients = self.gradient_accumulator(model)
        stats = self.evaluate(model, prepared, gradients=gradients, **options)
        result = self.summarize(stats, seconds=time.perf_counter() - start)
        result = self.with_dynamics(result, model, prepared, step=step, splits=self.accumulated_splits(gradients, prepared))
        return dataclasses.replace(result, seconds=time.perf_counter() - start)

    def with_dynamics(self, result: AuditResult, model: torch.nn.Module, prepared: Prepared, *,
                      step: int | None = None, splits: dict | None = None) -> AuditResult:
        """With :attr:`dynamics`: ``result`` plus the gradient split (``splits`` if accumulated
        during the evaluation, else computed here) and curvature of ``model`` and, at the steps
        asked (always for ``landscape: true``), its landscape
        (:func:`equiaudit.analysis.checkpoint_dynamics`); else ``result`` unchanged."""
        from equiaudit.analysis import checkpoint_dynamics

        options = self.dynamics
        if options is None or not (options.gradients or options.hessian or options.landscape_at(step)):
            return result
        found = checkpoint_dynamics(self, model, prepared, options, step=step, splits=splits)
        return dataclasses.replace(result, dynamics=found.rows, landscape=found.landscape)


def split_parts(results: Mapping[str, Any], n_rows: int, chosen: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One batch's ``{head: (L_sym part, EE part)}`` for the gradient split: per-row values
    ``(B,)`` of the rows ``chosen`` (all by default) summed and divided by ``n_rows``, so the
    parts of every batch add up to the means over the rows the split covers."""
    def part(values: torch.Tensor) -> torch.Tensor:
        return (values if chosen is None else values * chosen.to(values.dtype)).sum() / n_rows

    return {h: (part(r.loss_aug - r.equiv_error), part(r.equiv_error)) for h, r in results.items()}


def _cluster_means(aug: torch.Tensor, error: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values ``(R,)`` summed per cluster ``(C,)``, times ``C/R``.

    Rows of one cluster (one sample at several times) are not independent: the bootstrap
    must resample clusters. Sums keep ``ΣEE/ΣL`` exactly; the common factor ``C/R`` (which
    no ratio or studentized interval sees) keeps ``loss_aug``, ``equiv_error`` the per-row means.
    """
    distinct, inverse = torch.unique(clusters, return_inverse=True)
    scale = len(distinct) / len(clusters)
    sums = torch.zeros(2, len(distinct), dtype=torch.float64).index_add_(1, inverse, torch.stack([aug, error]).double())
    return sums[0] * scale, sums[1] * scale


# ---------------------------------------------------------------------- resolving


def resolve_device(name: str | torch.device | None, model: torch.nn.Module | None = None) -> torch.device:
    """``auto`` (or None) → the model's own device when it has parameters, else CUDA when
    available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked)."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if model is not None:
            param = next((p for p in model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            if param is not None:
                return param.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not str(name).startswith("cuda:"):
        raise ConfigError(f"--device={name!r} is not allowed; allowed: auto, cpu, cuda")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def default_batch_size(fields: Mapping[str, torch.Tensor], spec: OrbitSpec, n_rotations: int) -> int:
    """At most 64 samples per batch, fewer when one head's orbit would exceed :data:`ORBIT_BYTES`."""
    largest = max(fields[h.target][0].numel() for h in spec.heads)
    return int(max(1, min(DEFAULT_BATCH_SIZE, ORBIT_BYTES // (8 * n_rotations * largest))))


def _fields_list(fields: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(map(str, fields))


def _heads(config: AuditConfig, preset: TaskPreset, fields: Mapping[str, torch.Tensor],
           options: Mapping[str, Any]) -> tuple[HeadSpec, ...]:
    preset_heads = preset.default_heads(options)
    if config.heads is None:
        heads_raw = {n: dict(h) for n, h in preset_heads.items() if h["target"] in fields}
    else:
        heads_raw = {}
        for name, head in config.heads.items():
            merged = dict(preset_heads.get(name, {}))
            merged.update({k: v for k, v in vars(head).items() if v is not None})
            merged.setdefault("target", name)
            if "rep" not in merged:
                raise ConfigError(f"config: heads.{name}.rep is required (no preset default for this head)")
            heads_raw[name] = merged
    if not heads_raw:
        wanted = ", ".join(sorted({h["target"] for h in preset_heads.values()})) or "none"
        raise ConfigError(f"config: no heads to audit: the data has none of the task's targets ({wanted}); "
                          f"fields: {_fields_list(fields)}")
    for name, head in heads_raw.items():
        if head["target"] not in fields:
            raise ConfigError(
                f"config: heads.{name}.target={head['target']!r} is not a field of the data; fields: {_fields_list(fields)}"
            )
    return tuple(HeadSpec(name=name, **head) for name, head in heads_raw.items())


def _task_options(config: AuditConfig, preset: TaskPreset, fields: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The task's section over the preset's defaults, with data-dependent defaults fixed."""
    given = config.task_options
    unknown = sorted(set(given) - set(preset.options))
    if unknown:
        raise ConfigError(f"config: unknown key '{preset.section}.{unknown[0]}'; allowed: {', '.join(preset.options)}")
    return preset.resolve_options({**preset.options, **given}, fields)


# Voxel grids default to the exact cube group, whatever the task (README, metric.md): continuous
# rotations of a grid resample it, which adds an interpolation error of its own.
GRID_GROUP = "octahedral"


def _group(config: AuditConfig, preset: TaskPreset, spec: OrbitSpec, fields: Mapping[str, torch.Tensor]) -> Group:
    reps = [*spec.fields.values(), *(h.rep for h in spec.heads)]
    grids = any(get_representation(r).grid for r in reps)
    name = config.group or (GRID_GROUP if grids else preset.group)
    entry = GROUPS.get(name)
    if entry is not None and not entry.acts_on_grids and grids:
        raise ConfigError(f"config: group: {name} does not act on voxel grids; use so3, o3 or octahedral")
    mask = fields.get(spec.mask) if spec.mask else None
    points = position_fields(spec.fields, fields)
    n_atoms = mask.shape[1] if mask is not None else (points[0].shape[1] if points else None)
    options = dict(config.group_options)
    if config.sampling is not None:
        options["sampling"] = config.sampling
    try:
        return make_group(name, config.rotations, options, n_atoms=n_atoms)
    except ValueError as exc:
        raise ConfigError(f"config: group: {exc}") from exc


def _grid_settings(config: AuditConfig, spec: OrbitSpec, preset: TaskPreset, options: Mapping[str, Any],
                   fields: Mapping[str, torch.Tensor], group: Group) -> tuple[OrbitSpec, bool]:
    """Voxel grids: the cubic-grid check for cube rotations; under continuous rotations the
    preset's exact orbit inputs and the spherical mask. Returns the spec and whether the
    interpolation floor applies (continuous rotations of grids)."""
    voxel_heads = [h for h in spec.heads if get_representation(h.rep).grid]
    voxel_fields = [f for f in spec.input_fields if get_representation(spec.fields.get(f, "scalar")).grid]
    if not voxel_heads and not voxel_fields:
        return spec, False
    # Continuous rotations resample grids; signed permutations (cube rotations) move voxels exactly.
    probe = group.sample(sample_ids(4), SampleRandom(0))
    continuous = probe.dim() == 4 and probe.shape[-2:] == (3, 3) and not is_signed_permutation(probe)
    for name in voxel_fields + [h.target for h in voxel_heads]:
        shape = tuple(fields[name].shape[2:])
        if len(shape) != 3:
            raise DataError(f"voxel field {name!r} must be (N, C, D, H, W); got {tuple(fields[name].shape)}")
        if not continuous and len(set(shape)) != 1:
            raise ConfigError(
                f"cube rotations permute voxels and need cubic grids; {name!r} is (D, H, W) = {shape}: use group so3"
            )
    use_mask = options.get("spherical_mask", "auto")
    if use_mask not in ("auto", True, False):
        raise ConfigError(f"config: voxel.spherical_mask={use_mask!r} is not allowed; allowed: auto, true, false")
    from equiaudit.actions.voxels import spherical_mask

    weights = {}
    if use_mask is True or (use_mask == "auto" and continuous):
        weights = {h.name: spherical_mask(tuple(fields[h.target].shape[2:]))[None, None] for h in voxel_heads}
    builder = preset.orbit_inputs(options, fields) if preset.orbit_inputs is not None and continuous else None
    spec = dataclasses.replace(spec, orbit_inputs=builder, head_weights={**spec.head_weights, **weights})
    return spec, continuous


def resolve(
    config: AuditConfig,
    fields: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device | None = "auto",
    model: torch.nn.Module | None = None,
) -> AuditPlan:
    """The plan for ``config`` on data with these ``fields`` (a dataset or a first batch,
    ``(N, ...)``, before the task's preparation). Checks every name against the data.

    ``model`` (optional) only informs ``device="auto"`` (its own device).
    """
    device = resolve_device(device, model)
    try:
        preset = get_task(config.task)
    except ValueError as exc:
        raise ConfigError(f"config: task: {exc}") from exc
    options = _task_options(config, preset, fields)
    probe_n = min(2, len(next(iter(fields.values()))))
    probe = {k: v[:probe_n] for k, v in fields.items()}
    # The task's derived fields (x_t, velocity, noisy grids...) exist only after preparation:
    # the spec is checked against a prepared probe of two samples.
    prepared = preset.prepare(dict(probe), options, SampleRandom.named(config.seed, "task"), sample_ids(probe_n))
    n = len(next(iter(fields.values())))
    fields = {**fields, **{name: value[:1].expand(n, *value.shape[1:]) for name, value in prepared.items() if name not in probe}}
    spec_fields = {**preset.fields, **config.fields}
    heads = _heads(config, preset, fields, options)
    inputs = config.model.inputs if config.model.inputs is not None else list(preset.inputs)
    for field_name in inputs.values() if isinstance(inputs, Mapping) else inputs:
        if field_name not in fields:
            raise ConfigError(f"config: model.inputs names {field_name!r}, not a field of the data; fields: {_fields_list(fields)}")
    autocast = getattr(torch, config.model.autocast) if config.model.autocast else None
    spec = OrbitSpec(
        fields=spec_fields,
        heads=heads,
        inputs=inputs,
        outputs=config.model.outputs,
        mask=config.mask if config.mask in fields else None,
        grad=config.model.grad,
        chunk_size=config.chunk_size if isinstance(config.chunk_size, int) else OrbitSpec.chunk_size,
        chunks=AutoChunks() if config.chunk_size == "auto" else None,
        autocast=autocast,
    )
    group = _group(config, preset, spec, fields)
    spec = dataclasses.replace(spec, group=group)
    spec, continuous_grid = _grid_settings(config, spec, preset, options, fields, group)
    interp = continuous_grid if config.interp_floor == "auto" else bool(config.interp_floor)
    if not isinstance(group.action, RotationAction):
        # Both figures are about rotations: the round trip through a rotated grid, the Lie derivative along so(3).
        if config.local:
            raise ConfigError(f"config: local (the Lie derivative along so(3)) needs a rotation group (so3, o3, …), not {group.name}")
        if interp:
            raise ConfigError(f"config: interp_floor (the rotate-and-back round trip) needs a rotation group, not {group.name}")
    known = {k: v for k, v in config.breakdown.items() if k in ("elements", "worst", "bins")}
    breakdown = BreakdownOptions(by=tuple(config.breakdown.get("by", ())), **known)
    try:
        split_fields(fields, breakdown)
    except ValueError as exc:
        raise ConfigError(f"config: {exc}; or one of: {', '.join(BUILTIN_SPLITS)}") from exc
    batch_size = config.batch_size if "batch_size" in config.raw else default_batch_size(fields, spec, group.n_elements)
    return AuditPlan(
        spec=spec,
        seed=config.seed,
        batch_size=batch_size,
        bootstrap=config.bootstrap,
        device=device,
        task=preset,
        task_options=options,
        float_floor=config.float_floor,
        interp_floor=interp,
        local=config.local,
        breakdown=breakdown,
        dynamics=None if config.dynamics is None else DynamicsOptions(**config.dynamics),
        model_dtype=getattr(torch, config.model.dtype) if config.model.dtype else None,
        config=config,
        target_ci=config.target_ci,
        min_skill=config.min_skill,
    )

"""``equiaudit train`` and ``equiaudit demo``: make data, train the zoo models, audit them.

Layout under ``OUT``::

    data/lj13_train.npz, data/lj13_test.npz, data/ka13_*.npz    (rMD17-style keys)
    <task>/run/step_000000.pt ...                                (training dicts)
    <task>/train_log.csv, <task>/config.yaml                     (the audit config used)
    <task>/summary.csv, run.json, trajectory.png                 (the audit)
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from equiaudit.errors import ConfigError
from equiaudit.io.atomic import atomic_write_text
from equiaudit.io.checkpoints import discover_checkpoints, save_checkpoint
from equiaudit.io.config import load_config
from equiaudit.io.data import load_dataset, save_npz
from equiaudit.io.layout import OutputFolder
from equiaudit.report.compare import compare_rows, trajectories
from equiaudit.report.products import write_products
from equiaudit.report.summary import read_rows
from equiaudit.runner import Runner, RunEvents, open_audit
from equiaudit.null import NOT_LEARNED
from equiaudit.report.table import NOT_LEARNED_NOTE, format_interval, format_number, format_percent, format_skill, ree_mark
from equiaudit.zoo.recipes import RECIPES, Recipe, make_cluster_data, split
from equiaudit.zoo.train import log_spaced_steps, train

__all__ = ["write_data", "train_task", "run_train_command", "run_demo_command"]


def _progress(console: Console) -> Progress:
    """Bars on a terminal; plain periodic lines in a pipe or a log (:mod:`equiaudit.cli.progress`)."""
    from equiaudit.cli.progress import progress

    return progress(console)


def write_data(recipe: Recipe, data_dir: Path, seed: int) -> tuple[Path, Path]:
    """Sample the recipe's clusters and write rMD17-style train/test files (deterministic for a seed)."""
    train_path = data_dir / f"{recipe.data_name}_train.npz"
    test_path = data_dir / f"{recipe.data_name}_test.npz"
    data = make_cluster_data(recipe.cluster, recipe.n_train + recipe.n_test, seed)
    for path, part in zip((train_path, test_path), split(data, recipe.n_train)):
        save_npz(path, {"nuclear_charges": part["z"], "coords": part["pos"], "energies": part["energy"], "forces": part["forces"]})
    return train_path, test_path


def _training_label(recipe: Recipe, augment: bool = True) -> str:
    """How the recipe trains, e.g. ``with rotation augmentation, weights averaged (EMA 0.999)``."""
    label = f"{'with' if augment else 'without'} rotation augmentation"
    return label + (f", weights averaged (EMA {recipe.settings.ema_decay:g})" if recipe.settings.ema_decay else "")


def _float32(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in data.items()}


def _audit_config(recipe: Recipe, run_dir: Path, test_path: Path, seed: int) -> dict:
    config = {
        "task": recipe.task,
        "model": {"factory": f"equiaudit.zoo:{recipe.builder}", "kwargs": dict(recipe.kwargs),
                  "grad": bool(recipe.kwargs.get("grad", False))},
        "checkpoints": {"path": str(run_dir.resolve())},
        "data": {"path": str(test_path.resolve()), "samples": recipe.audit["samples"]},
        "group": dict(recipe.audit["group"]),
        "seed": seed,
    }
    if "heads" in recipe.audit:
        config["heads"] = {name: dict(head) for name, head in recipe.audit["heads"].items()}
    if "voxel" in recipe.audit:
        config["voxel"] = dict(recipe.audit["voxel"])
    if "dynamics" in recipe.audit:
        config["dynamics"] = dict(recipe.audit["dynamics"])
    return config


def train_task(
    recipe: Recipe,
    task_dir: Path,
    data_dir: Path,
    *,
    steps: int,
    seed: int,
    augment: bool,
    progress: Progress | None = None,
) -> tuple[Path, list[dict]]:
    """Data, training and checkpoints (``task_dir/run``) for one recipe; returns the audit
    config's path (``task_dir/config.yaml``) and the training log."""
    run_dir = task_dir / "run"
    train_path, test_path = write_data(recipe, data_dir, seed)
    train_data = _float32(load_dataset(train_path))
    held_out = _float32(load_dataset(test_path, samples=64))
    settings = replace(recipe.settings, steps=steps, seed=seed, augment=augment)
    checkpoint_steps = log_spaced_steps(steps)
    for stale in run_dir.glob("step_*.pt"):  # a previous, possibly longer run
        stale.unlink()
    model = recipe.build_model(seed)
    bar = progress.add_task(f"training {recipe.builder}", total=steps) if progress else None

    def on_checkpoint(step: int, trained: torch.nn.Module, record: dict) -> None:
        save_checkpoint(run_dir / f"step_{step:06d}.pt", trained.state_dict(), step=step,
                        held_out_loss=record["held_out_loss"], train_loss=record["train_loss"], wall_time=record["seconds"],
                        ema_decay=settings.ema_decay, averaged=bool(settings.ema_decay))

    log = train(model, recipe.loss(augment), train_data, held_out, settings, checkpoint_steps=checkpoint_steps,
                on_checkpoint=on_checkpoint, on_step=(lambda s: progress.update(bar, completed=s)) if progress else None)
    if progress:
        progress.remove_task(bar)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(log[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(log)
    atomic_write_text(task_dir / "train_log.csv", buffer.getvalue())
    config_path = task_dir / "config.yaml"
    header = f"# Written by `equiaudit train {recipe.task}`: audits the checkpoints in run/.\n"
    atomic_write_text(config_path, header + yaml.safe_dump(_audit_config(recipe, run_dir, test_path, seed), sort_keys=False))
    return config_path, log


def _audit_task(config_path: Path, device: str, progress: Progress):
    """Audit every checkpoint named by a written config, into the config's folder (cached)."""
    config = load_config(config_path)
    audit = open_audit(config, device=device)
    refs = discover_checkpoints([config.checkpoints])
    bar = progress.add_task(f"auditing {config.task}", total=len(refs))
    events = RunEvents(on_result=lambda result: progress.advance(bar))
    with Runner(audit, OutputFolder(config_path.parent), events=events) as runner:
        results, rows = runner.run(refs)
    progress.remove_task(bar)
    return audit, results, rows


def _trajectory_table(task: str, rows: list[dict], log: list[dict], threshold: float, dynamics: list[dict] = ()) -> Table:
    held = {r["step"]: r["held_out_loss"] for r in log}
    ratio = {int(r["step"]): r["grad_norm_ratio"] for r in dynamics if r["head"] == "total" and r.get("step")}
    table = Table(title=f"{task}: REE over training", header_style="bold")
    names = ("step", "held-out loss", "L_aug", "L_sym", "REE", "95 % CI", "skill") + (("‖∇EE‖/‖∇L_sym‖",) if ratio else ())
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        if row["head"] != "total":
            continue
        step = int(row["step"])
        ree = float(row["rel_equiv_error"]) if row["status"] == "ok" else math.nan
        not_learned = row.get("flag") == NOT_LEARNED
        style = "dim" if not_learned else ("green" if ree <= threshold else None)
        cells = [str(step), format_number(held.get(step)), format_number(row.get("loss_aug")),
                 format_number(row.get("loss_sym")), format_percent(ree) + ree_mark(row.get("flag")),
                 format_interval(row.get("rel_equiv_error_ci_low"), row.get("rel_equiv_error_ci_high")),
                 format_skill(row.get("skill"))]
        table.add_row(*cells, *([format_number(ratio.get(step))] if ratio else []), style=style)
    if any(r.get("flag") == NOT_LEARNED for r in rows if r["head"] == "total"):
        table.caption = NOT_LEARNED_NOTE
    return table


def _verdict(rows: list[dict], threshold: float) -> dict:
    """The paper's number for this run: first step with REE ≤ threshold (or the lowest reached)."""
    total = [t for t in trajectories(rows) if t.head == "total"]
    return compare_rows(total, threshold=threshold)[0] if total else {}


def _recipe(task: str, ema_decay: float | None) -> Recipe:
    """The task's recipe, with the weight averaging overridden when ``ema_decay`` is given (0: off)."""
    recipe = RECIPES[task]
    if ema_decay is None:
        return recipe
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"--ema-decay must be in [0, 1) (0 turns averaging off), got {ema_decay:g}")
    return replace(recipe, settings=replace(recipe.settings, ema_decay=ema_decay))


def run_train_command(
    *, task: str, out: Path, steps: int | None, seed: int, augment: bool, console: Console, ema_decay: float | None = None
) -> int:
    """Body of ``equiaudit train``."""
    recipe = _recipe(task, ema_decay)
    with _progress(console) as progress:
        config_path, log = train_task(recipe, out / task, out / "data", steps=steps or recipe.settings.steps, seed=seed,
                                      augment=augment, progress=progress)
    table = Table(title=f"{task}: {recipe.builder} trained {_training_label(recipe, augment)}", header_style="bold")
    for name in ("step", "train loss", "held-out loss", "seconds"):
        table.add_column(name, justify="right")
    for r in log:
        table.add_row(str(r["step"]), format_number(r["train_loss"]), format_number(r["held_out_loss"]), f"{r['seconds']:.1f}")
    console.print(table)
    console.print(f"checkpoints in {config_path.parent / 'run'}; audit them with:\n  equiaudit audit {config_path} --out {config_path.parent}",
                  highlight=False)
    return 0


def run_demo_command(
    *, tasks: Sequence[str], out: Path, steps: int | None, seed: int, device: str, threshold: float, console: Console,
    ema_decay: float | None = None,
) -> int:
    """Body of ``equiaudit demo``: for each task, data → training → audit → trajectory and verdict."""
    from equiaudit.cli.threads import threads_label

    console.print(f"equiaudit demo: device {device}, {threads_label()}", highlight=False)
    results = []
    failed = 0
    for task in tasks:
        recipe = _recipe(task, ema_decay)
        n_steps = steps or recipe.settings.steps
        start = time.perf_counter()
        console.rule(f"[bold]{task}[/]: {recipe.builder} on {recipe.data_name.upper()}, {n_steps} steps {_training_label(recipe)}")
        baseline = recipe.baseline_recipe()
        with _progress(console) as progress:
            config_path, log = train_task(recipe, out / task, out / "data", steps=n_steps, seed=seed, augment=True, progress=progress)
            audit, audit_results, rows = _audit_task(config_path, device, progress)
            if baseline is not None:
                base_config, _ = train_task(baseline, out / task / "baseline", out / "data", steps=min(n_steps, baseline.settings.steps),
                                            seed=seed, augment=True, progress=progress)
                _, base_results, base_rows = _audit_task(base_config, device, progress)
                audit_results += base_results
        failed += sum(not r.ok for r in audit_results)
        group = f"{audit.plan.group.label}, K={audit.plan.group.n_elements}, N={audit.prepared.n_samples}"
        write_products(config_path.parent, title=f"{task} · {recipe.builder} · {group}", threshold=threshold)
        folder = OutputFolder(config_path.parent)
        dynamics = read_rows(folder / folder.DYNAMICS)
        console.print(_trajectory_table(task, rows, log, threshold, dynamics))
        verdict = _verdict(rows, threshold)
        seconds = time.perf_counter() - start
        if verdict.get("first_step_below") is not None:
            line = f"REE first ≤ {100 * threshold:g} % at step {verdict['first_step_below']}"
            stays = verdict.get("first_step_stays_below")
            line += f", and stays there from step {stays}" if stays is not None else ", but rises above it later"
        elif verdict.get("n_not_learned") and verdict.get("n_not_learned") == verdict.get("n_checkpoints"):
            line = "no checkpoint has learnt the task yet (skill below 0.1 at every step): its REE is not read"
        else:
            line = f"REE never reached ≤ {100 * threshold:g} %; lowest {format_percent(verdict.get('min_rel_equiv_error'))}"
        if verdict.get("n_not_learned") and verdict.get("n_not_learned") != verdict.get("n_checkpoints"):
            line += f" (ignoring {verdict['n_not_learned']} not_learned checkpoint(s))"
        console.print(f"[bold]→ {line}[/]; final {format_percent(verdict.get('final_rel_equiv_error'))} at step "
                      f"{verdict.get('final_step')} ({group}; {seconds:.0f} s). Written to {config_path.parent}/", highlight=False)
        for meta in sorted((folder / folder.LANDSCAPE).glob("*.json")) if (folder / folder.LANDSCAPE).is_dir() else []:
            grid = json.loads(meta.read_text())
            console.print(f"  loss landscape at step {grid['step']} ({grid['n']}×{grid['n']}, Hessian directions λ = "
                          f"{', '.join(f'{v:.3g}' for v in grid['eigenvalues'].values())}): quadratic-fit R² "
                          f"L_sym {grid['r2_sym']:.3f}, EE {grid['r2_equiv']:.3f} → {meta.with_suffix('.png')}", highlight=False)
        if baseline is not None:
            final = [r for r in base_rows if r["head"] == "total"][-1]
            console.print(f"  equivariant baseline {baseline.builder}, same training, step {final['step']}: "
                          f"REE {format_percent(final['rel_equiv_error'])} (float floor {format_percent(final.get('float_floor'))}) "
                          f"at held-out L_aug {format_number(final['loss_aug'])}", highlight=False)
        final_total = next((r for r in reversed(rows) if r["head"] == "total"), {})
        results.append((task, verdict, log[-1]["held_out_loss"], seconds, final_total))
    summary = Table(title=f"equiaudit demo: share of held-out loss due to imperfect equivariance (threshold {100 * threshold:g} %)",
                    header_style="bold")
    for name in ("task", "first step ≤ threshold", "stays ≤ threshold from", "final REE", "final skill", "final held-out loss",
                 "wall time"):
        summary.add_column(name, justify="right")
    step_or_never = lambda value: "never" if value is None else str(value)  # noqa: E731
    ignored = 0
    for task, verdict, held, seconds, final in results:
        ignored += int(verdict.get("n_not_learned") or 0)
        summary.add_row(task, step_or_never(verdict.get("first_step_below")), step_or_never(verdict.get("first_step_stays_below")),
                        format_percent(verdict.get("final_rel_equiv_error")) + ree_mark(final.get("flag")),
                        format_skill(final.get("skill")), format_number(held), f"{seconds:.0f} s")
    if ignored:
        summary.caption = (f"{ignored} not_learned checkpoint(s) (skill = 1 − L_sym/loss_null below 0.1) are ignored by the "
                           "threshold steps: a model that has learnt nothing reads as equivariant")
    console.print(summary)
    return 1 if failed else 0


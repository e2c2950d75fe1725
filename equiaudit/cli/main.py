"""The ``equiaudit`` command line: thin commands that parse, call the library and render.

Errors become one line on stderr and an exit code: 2 for a bad config, data or command
line, 1 when some checkpoint failed (the rest are still written), 0 otherwise.
``--debug`` (or ``EQUIAUDIT_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from equiaudit import __version__
from equiaudit.errors import CheckpointError, ConfigError, DataError, DataWarning, EquiauditError

app = typer.Typer(
    name="equiaudit",
    help="Audit how much of a model's loss comes from imperfect learned 3D-rotation equivariance.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Switches (--force, --watch, --plot/--no-plot) take no value: show none in --help, not `<bool>`.
_typed_display = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = lambda self, ctx: "" if self.is_flag else _typed_display(self, ctx)
# Piped output (CI logs, `| tee`) gets a wide table rather than rich's 80-column default.
stdout = Console(width=None if sys.stdout.isatty() else 120)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
def _debug_from_env() -> bool:
    return os.environ.get("EQUIAUDIT_DEBUG", "") not in ("", "0")


_state = {"debug": _debug_from_env()}


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Distribute(str, Enum):
    auto = "auto"
    samples = "samples"
    checkpoints = "checkpoints"


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit. The message is escaped: user text is never markup."""
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def said_warnings():
    """Show each :class:`~equiaudit.errors.DataWarning` (e.g. an HDF5 file read from outside its
    folder) as one ``warning:`` line on stderr, every time; other warnings as Python shows them."""
    with warnings.catch_warnings():
        python_shows = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DataWarning):
                stderr.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
            else:
                python_shows(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", DataWarning)
        yield


def friendly_errors(command):
    """Map library exceptions to one actionable line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with said_warnings():
                return command(*args, **kwargs)
        except typer.Exit:
            raise
        except (ConfigError, DataError, CheckpointError) as exc:
            if _state["debug"]:
                raise
            fail(str(exc), 2)
        except EquiauditError as exc:
            if _state["debug"]:
                raise
            fail(str(exc), 1)
        except KeyboardInterrupt:
            stderr.print("interrupted: results written so far are kept")
            raise typer.Exit(130)
        except Exception as exc:  # an unexpected bug: still one line unless debugging
            if _state["debug"]:
                raise
            fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)

    return wrapper


def _version(value: bool):
    if value:
        stdout.print(f"equiaudit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    # Set on every invocation: an app run in-process (tests, notebooks) must not keep an earlier --debug.
    _state["debug"] = debug or _debug_from_env()


_AUDIT_EPILOG = """\b
Examples:
  equiaudit init runs/ff data/test.npz -o audit.yaml    # write a starter config from what is found
  equiaudit audit audit.yaml                            # checkpoints from checkpoints.path
  equiaudit audit audit.yaml runs/ff/ -o audit_ff -k 24 # a run's folder, a file or a glob
  equiaudit audit sample_configs/force_field.yaml --threads 1 --wandb my-project
\b
The config (YAML; sample_configs/ has one per task, with comments) names: task,
model.factory (+ kwargs, inputs, outputs, grad), checkpoints.path (+ weights, prefix),
data.path (+ keys, samples), heads (rep, target, loss, weight), group (name, rotations), seed.
Docs: docs/quickstart.md, docs/your-model.md, docs/cli.md."""


@app.command(epilog=_AUDIT_EPILOG)
@friendly_errors
def audit(
    config: Annotated[Path, typer.Argument(help="YAML audit config (.yaml/.yml: task, model.factory, data.path, heads, ...; see sample_configs/ or write one with `equiaudit init`), or, with no config, a checkpoint, run directory or glob of a known model family (sevennet, metatrain, orb): the family is detected from the files' contents.")],
    checkpoints: Annotated[Optional[list[str]], typer.Argument(help="Checkpoint files, run directories or globs (override checkpoints.path).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for summary.csv and run.json.")] = Path("equiaudit_out"),
    rotations: Annotated[Optional[int], typer.Option("--rotations", "-k", help="Rotations per sample (K).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", "-n", help="Number of samples from the data.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="A structure file (PDB/mmCIF) that cannot be read is an error, not skipped (data.strict).")] = False,
    device: Annotated[Device, typer.Option(help="Where to run the model.")] = Device.auto,
    seed: Annotated[Optional[int], typer.Option(help="Seed for rotations and task noise.")] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="Terminal output.")] = OutputFormat.table,
    force: Annotated[bool, typer.Option("--force", help="Recompute checkpoints already audited with these settings (OUT/cache.sqlite).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Keep auditing new checkpoints as training writes them, until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between polls with --watch.")] = 30.0,
    threshold: Annotated[float, typer.Option("--threshold", help="REE target (fraction) marked in the table and plot.")] = 0.02,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write OUT/trajectory.png.")] = True,
    local: Annotated[bool, typer.Option("--local", help="Add the local (Lie-derivative) equivariance error: local_equiv_error, rel_local_equiv_error.")] = False,
    dynamics: Annotated[bool, typer.Option("--dynamics", help="Also the gradient split of L_sym and EE per head (OUT/dynamics.csv) and test-time twirling (OUT/twirl.csv).")] = False,
    hessian: Annotated[Optional[int], typer.Option("--hessian", help="Top-K Hessian eigenvalues of L_sym and EE by Lanczos (implies --dynamics).")] = None,
    params: Annotated[Optional[str], typer.Option("--params", help="Glob(s), comma-separated, of the parameters the gradients and Hessians are taken over (default: all).")] = None,
    track_params: Annotated[Optional[str], typer.Option("--track-params", help="Glob(s), comma-separated, of parameters whose variance is recorded and correlated with REE.")] = None,
    landscape: Annotated[Optional[str], typer.Option("--landscape", help="Steps (comma-separated) at which to draw the L_sym / EE landscape along two Hessian eigendirections (OUT/landscape/).")] = None,
    landscape_grid: Annotated[Optional[int], typer.Option("--landscape-grid", help="N of the N×N landscape grid (default 20).")] = None,
    twirl_target: Annotated[Optional[float], typer.Option("--twirl-target", help="twirl.csv's smallest_k: the smallest k whose k-rotation average (equiaudit.Symmetrized) removes this share of the equivariance error (default 0.9; implies --dynamics).")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Which weights of each checkpoint: auto (EMA where present, as most trainers evaluate), raw or ema (checkpoints.weights).")] = None,
    prefix: Annotated[Optional[str], typer.Option("--prefix", help="Key prefix to strip from (or add to) the checkpoints' keys, e.g. 'model.' (checkpoints.prefix); matched automatically when unambiguous.")] = None,
    by: Annotated[Optional[str], typer.Option("--by", help="Show breakdowns of the latest checkpoint, comma-separated: element, n_atoms, angle, channel, t, sample, or a per-sample field (all go to OUT/breakdown.csv).")] = None,
    tensorboard: Annotated[Optional[Path], typer.Option("--tensorboard", help="Also write the REE trajectory as TensorBoard scalars (equiaudit/rel_equiv_error, ...) into DIR at the checkpoints' steps, e.g. the run's own log directory (needs the tensorboard package).")] = None,
    target_ci: Annotated[Optional[float], typer.Option("--target-ci", help="Add samples, in order, until the total REE's 95 % CI is at most ± W (a fraction: 0.002 = ±0.2 points), or the data run out.")] = None,
    min_skill: Annotated[Optional[float], typer.Option("--min-skill", help="Flag a checkpoint not_learned (its REE greyed, ignored by 'first ≤ threshold') when its skill 1 − L_sym/loss_null is below this (default 0.1).")] = None,
    distribute: Annotated[Distribute, typer.Option("--distribute", help="Under torchrun or --shard: split each checkpoint's samples, whole checkpoints, or choose (auto).")] = Distribute.auto,
    dist_timeout: Annotated[Optional[float], typer.Option("--dist-timeout", help="Under torchrun: seconds a rank waits for the others before failing (default 600).")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Audit part I/N into OUT/shards (array jobs, no torchrun); then `equiaudit merge OUT`.")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model's forward (worth it for long audits on a GPU).")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="Structures to audit on (data.path): required without a config, overrides the config's.")] = None,
    set_values: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE: set any config key (dotted, value read as YAML), e.g. --set group.rotations=8; applied last. Repeatable.")] = None,
    allow_torchscript: Annotated[bool, typer.Option("--allow-torchscript", help="Also audit TorchScript archives (mtt export's model.pt). A TorchScript archive is a program: loading it runs its code; only for files you trust. Off by default: archives are skipped and listed.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice, one per core; the banner says which). 1 is often fastest on a busy machine.")] = None,
    wandb: Annotated[Optional[str], typer.Option("--wandb", metavar="PROJECT", help="Also log the audit to Weights & Biases project PROJECT: one run, REE per step as a line plot and the summary table (pip install 'equiaudit[wandb]'; WANDB_MODE=offline works).")] = None,
):
    """Audit every checkpoint of a run: REE per checkpoint and head, written to OUT/summary.csv.

    Checkpoints already audited into OUT with the same settings are reused, not recomputed.
    """
    from equiaudit.cli.audit_command import run_audit_command
    from equiaudit.cli.threads import set_threads

    set_threads(threads)
    code = run_audit_command(
        config_path=config,
        checkpoint_args=checkpoints or [],
        out=out,
        overrides={"group.rotations": rotations, "data.samples": samples, "data.strict": strict or None, "seed": seed, "local": local or None, "breakdown.by": by,
                   "checkpoints.weights": weights, "checkpoints.prefix": prefix, "target_ci": target_ci,
                   "min_skill": min_skill,
                   **_dynamics_overrides(dynamics, hessian, params, track_params, landscape, landscape_grid, twirl_target)},
        device=device.value,
        output_format=output_format.value,
        stdout=stdout,
        stderr=stderr,
        force=force,
        watch=watch,
        interval=interval,
        plot=plot,
        threshold=threshold,
        debug=_state["debug"],
        tensorboard=tensorboard,
        options={"distribute": distribute.value, "dist_timeout": dist_timeout, "shard": shard,
                 "compile": compile_model},
        data=data,
        sets=set_values or [],
        allow_torchscript=allow_torchscript,
        wandb=wandb,
    )
    raise typer.Exit(code)


def _dynamics_overrides(dynamics, hessian, params, track_params, landscape, grid, twirl_target=None) -> dict:
    """The ``dynamics.*`` config keys the dynamics flags set (any of them turns the section on)."""
    keys = {"dynamics.hessian": hessian, "dynamics.params": params, "dynamics.track_params": track_params,
            "dynamics.landscape": landscape, "dynamics.grid": grid, "dynamics.twirl_target": twirl_target}
    if not dynamics and all(v is None for v in keys.values()):
        return {}
    return {"dynamics": True if dynamics else None, **keys}


@app.command()
@friendly_errors
def merge(
    out: Annotated[Path, typer.Argument(help="The OUT of `equiaudit audit --shard I/N` runs (with OUT/shards/).")],
    output_format: Annotated[OutputFormat, typer.Option("--format", help="Terminal output.")] = OutputFormat.table,
    threshold: Annotated[float, typer.Option("--threshold", help="REE target (fraction) marked in the table and plot.")] = 0.02,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write OUT/trajectory.png.")] = True,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Your YAML config: the model --dynamics builds at merge comes from it, never from OUT (the shards' model section must match it).")] = None,
):
    """Combine the shards of an array job into OUT/summary.csv, breakdown.csv, run.json and the plot, as one process writes them."""
    from equiaudit.cli.scale_command import run_merge_command

    raise typer.Exit(run_merge_command(out=out, output_format=output_format.value, plot=plot, threshold=threshold,
                                       stdout=stdout, stderr=stderr, debug=_state["debug"], config_path=config))


class XAxis(str, Enum):
    step = "step"
    epoch = "epoch"
    time = "time"


@app.command()
@friendly_errors
def compare(
    sources: Annotated[list[str], typer.Argument(help="Audit output directories (with summary.csv) or checkpoint run directories.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for compare.csv and compare.png.")] = Path("equiaudit_compare"),
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML audit config, to audit run directories first.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="REE target as a fraction (0.02 = 2 %).")] = 0.02,
    x: Annotated[XAxis, typer.Option("--x", help="x axis: training step, epoch, or hours since the first checkpoint.")] = XAxis.step,
    device: Annotated[Device, typer.Option(help="Where to run the model (run directories only).")] = Device.auto,
    force: Annotated[bool, typer.Option("--force", help="Recompute checkpoints of run directories already audited.")] = False,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write OUT/compare.png.")] = True,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="Terminal output.")] = OutputFormat.table,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice).")] = None,
):
    """Compare REE trajectories of runs: first step at or below the threshold, final and minimum REE.

    Example: equiaudit compare audit_ff audit_ff_small --threshold 0.02 -o cmp
    """
    from equiaudit.cli.compare_command import run_compare_command
    from equiaudit.cli.threads import set_threads

    set_threads(threads)

    code = run_compare_command(
        sources=sources,
        config_path=config,
        threshold=threshold,
        x=x.value,
        out=out,
        device=device.value,
        force=force,
        plot=plot,
        output_format=output_format.value,
        stdout=stdout,
        stderr=stderr,
    )
    raise typer.Exit(code)


@app.command()
@friendly_errors
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file or checkpoint-N/ folder.")],
    output_format: Annotated[OutputFormat, typer.Option("--format", help="Terminal output.")] = OutputFormat.table,
    weights: Annotated[str, typer.Option("--weights", help="Which weight set to describe: auto (EMA where present, else raw), raw or ema.")] = "auto",
):
    """Show a checkpoint's format, step (and where it came from), which weights (raw or EMA, from where), tensor and parameter counts, and key prefix."""
    from rich.table import Table
    from rich.text import Text

    from equiaudit.io.checkpoints import describe_checkpoint

    info = describe_checkpoint(checkpoint, weights=weights)
    code = 1 if "problem" in info else 0  # readable, but no usable weights: say what is in it
    if output_format is OutputFormat.json:
        print(json.dumps(info, default=str, indent=2))
        raise typer.Exit(code)
    if "problem" in info:
        rows = [("problem", info["problem"]), ("status", info["status"]), *(("contents", line) for line in info["contents"])]
    else:
        where = {"file": "stored in the file", "name": "from the file name", "epoch": "the epoch: no step stored"}
        step = "unknown" if info["step"] is None else f"{info['step']} ({where.get(info['step_source'], info['step_source'])})"
        others = [k for k in info["weight_sets"] if k != info["weights"]]
        chosen = f"{info['weights']} ({info['weights_source']})" + (f"; {', '.join(others)} weights also present" if others else "")
        rows = [("format", info["format"]), ("step", step)]
        rows += [("epoch", str(info["epoch"]))] if info["epoch"] is not None else []
        rows += [("weights", chosen)] + ([("EMA file", info["ema_file"])] if info.get("ema_file") else [])
        rows += [
            ("tensors", f"{info['n_tensors']} ({info['n_parameters']:,} floating-point values)"),
            ("prefix", info["prefix"] or "none"),
            ("dtypes", ", ".join(f"{k} ×{v}" for k, v in info["dtypes"].items())),
        ]
        if "n_ordered_params" in info:
            rows.append(("parameter list", f"{info['n_ordered_params']} tensors in model.parameters() order"))
    table = Table(show_header=False, title=Text(str(info["path"])))
    for key, value in rows:
        table.add_row(key, Text(str(value)))  # Text: names and keys from the file are never markup
    stdout.print(table)
    raise typer.Exit(code)


@app.command()
@friendly_errors
def init(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A checkpoint file or a training run's folder: its layout, and the model when it is one of equiaudit.zoo's.")] = None,
    data: Annotated[Optional[Path], typer.Argument(help="A held-out data file (.npz, .xyz, .db, .h5, ...): its fields, the task and the heads.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the config here (default: print it).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
):
    """Write a commented starter audit config from what is found in CHECKPOINT and DATA.

    Example: equiaudit init runs/ff data/test.npz -o audit.yaml && equiaudit audit audit.yaml

    Every inferred value is commented with where it came from; what cannot be inferred
    (model.factory of your own network, head weights of your training loss) is marked TODO.
    """
    from equiaudit.cli.init_command import run_init_command

    raise typer.Exit(run_init_command(checkpoint=checkpoint, data=data, out=out, force=force, console=stdout))


# The demo's tasks (equiaudit.zoo.recipes.TASKS, not imported here to keep --help fast).
_DEMO_TASKS = ("force_field", "flow_matching", "voxel_denoising")
Task = Enum("Task", {name: name for name in _DEMO_TASKS}, type=str)
DemoTask = Enum("DemoTask", {name: name for name in ("all", *_DEMO_TASKS)}, type=str)


@app.command()
@friendly_errors
def train(
    task: Annotated[Task, typer.Argument(help="Which reference task to train.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (data/, <task>/run/, config.yaml).")] = Path("demo_out"),
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps (default: the task's recipe).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, initialisation and augmentation.")] = 0,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random-rotation augmentation.")] = True,
    ema_decay: Annotated[Optional[float], typer.Option("--ema-decay", help="Weight averaging of the checkpoints (default: the recipe's, 0.999; 0 turns it off).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice).")] = None,
):
    """Train a reference non-equivariant model on locally made Lennard-Jones data, saving log-spaced checkpoints.

    Example: equiaudit train force_field --steps 300 -o demo_out  (then: equiaudit audit demo_out/force_field/config.yaml)
    """
    from equiaudit.cli.demo_command import run_train_command
    from equiaudit.cli.threads import set_threads

    set_threads(threads)

    raise typer.Exit(run_train_command(task=task.value, out=out, steps=steps, seed=seed, augment=augment,
                                       ema_decay=ema_decay, console=stdout))


@app.command()
@friendly_errors
def demo(
    task: Annotated[DemoTask, typer.Option("--task", help="Which task to run.")] = DemoTask("all"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("demo_out"),
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps per task (default: each recipe's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, training and the audit.")] = 0,
    device: Annotated[Device, typer.Option(help="Where to train and audit.")] = Device.auto,
    threshold: Annotated[float, typer.Option(help="REE threshold for 'first step below' (fraction).")] = 0.02,
    ema_decay: Annotated[Optional[float], typer.Option("--ema-decay", help="Weight averaging of the checkpoints (default: the recipe's, 0.999; 0 turns it off).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice; the banner says which).")] = None,
):
    """Make data, train the three reference models with rotation augmentation, and audit every checkpoint.

    Example: equiaudit demo --task flow_matching --steps 300 --threads 1
    """
    from equiaudit.cli.demo_command import run_demo_command
    from equiaudit.cli.threads import set_threads
    from equiaudit.zoo.recipes import TASKS

    set_threads(threads)

    tasks = list(TASKS) if task.value == "all" else [task.value]
    raise typer.Exit(run_demo_command(tasks=tasks, out=out, steps=steps, seed=seed, device=device.value,
                                      threshold=threshold, ema_decay=ema_decay, console=stdout))


def run() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

"""The ``equiaudit`` command line: thin commands that parse, call the library and render.

Errors become one line on stderr and an exit code: 2 for a bad config, data or command
line, 1 when some checkpoint failed (the rest are still written), 0 otherwise.
``--debug`` (or ``EQUIAUDIT_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from equiaudit import __version__
from equiaudit.errors import CheckpointError, ConfigError, DataError, EquiauditError

app = typer.Typer(
    name="equiaudit",
    help="Audit how much of a model's loss comes from imperfect learned 3D-rotation equivariance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, `| tee`) gets a wide table rather than rich's 80-column default.
stdout = Console(width=None if sys.stdout.isatty() else 120)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
_state = {"debug": os.environ.get("EQUIAUDIT_DEBUG", "") not in ("", "0")}


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit."""
    stderr.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly_errors(command):
    """Map library exceptions to one actionable line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
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
    if debug:
        _state["debug"] = True


@app.command()
@friendly_errors
def audit(
    config: Annotated[Path, typer.Argument(help="YAML audit config.")],
    checkpoints: Annotated[Optional[list[str]], typer.Argument(help="Checkpoint files, run directories or globs (override checkpoints.path).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for summary.csv and run.json.")] = Path("equiaudit_out"),
    rotations: Annotated[Optional[int], typer.Option("--rotations", "-k", help="Rotations per sample (K).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", "-n", help="Number of samples from the data.")] = None,
    device: Annotated[Device, typer.Option(help="Where to run the model.")] = Device.auto,
    seed: Annotated[Optional[int], typer.Option(help="Seed for rotations and task noise.")] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="Terminal output.")] = OutputFormat.table,
):
    """Audit every checkpoint of a run: REE per checkpoint and head, written to OUT/summary.csv."""
    from equiaudit.cli.audit_command import run_audit_command

    code = run_audit_command(
        config_path=config,
        checkpoint_args=checkpoints or [],
        out=out,
        overrides={"group.rotations": rotations, "data.samples": samples, "seed": seed},
        device=device.value,
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
):
    """Show a checkpoint's format, detected step, tensor and parameter counts, and key prefix."""
    from rich.table import Table

    from equiaudit.io.checkpoints import describe_checkpoint

    info = describe_checkpoint(checkpoint)
    if output_format is OutputFormat.json:
        print(json.dumps(info, default=str, indent=2))
        return
    table = Table(show_header=False, title=str(checkpoint))
    for key, value in info.items():
        table.add_row(key, str(value))
    stdout.print(table)


def run() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

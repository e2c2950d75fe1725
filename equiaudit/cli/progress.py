"""Progress for the terminal, and for a pipe or a log file.

Rich's bars are drawn only on a terminal: piped into ``tee``, a CI log or ``nohup``, the demo
printed nothing for 21 minutes. :func:`progress` gives rich's bars on a terminal and, anywhere
else, :class:`PlainProgress`: the same calls (``add_task``, ``update``, ``advance``, ``reset``,
``remove_task``, ``console``) written as one plain line per running task every
``EQUIAUDIT_PROGRESS_EVERY`` seconds (default 30; 0 writes at every update), e.g.::

    [1m30s] training transformer_force_field: 3400/10000
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress", "PlainProgress", "progress_interval"]


def progress_interval() -> float:
    """Seconds between plain progress lines (``EQUIAUDIT_PROGRESS_EVERY``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("EQUIAUDIT_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def progress(console: Console, *, transient: bool = True) -> Progress | PlainProgress:
    """Rich bars on a terminal, periodic plain lines otherwise (see the module docstring)."""
    if console.is_terminal:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=transient)
    return PlainProgress(console)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0


@dataclass
class PlainProgress:
    """The subset of :class:`rich.progress.Progress` the commands use, as periodic plain lines."""

    console: Console
    every: float = field(default_factory=progress_interval)

    def __post_init__(self) -> None:
        self._tasks: dict[int, _Task] = {}
        self._next_id = 0
        self._start = time.monotonic()
        self._last = self._start

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        self._tasks[self._next_id] = _Task(description, total)
        self._next_id += 1
        return self._next_id - 1

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, advance: float | None = None, **_) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            return
        if description is not None:
            task.description = description
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        self._maybe_write()

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def reset(self, task_id: int, *, total: float | None = None, **_) -> None:
        self.update(task_id, completed=0, total=total)

    def _maybe_write(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        elapsed = int(now - self._start)
        clock = f"{elapsed // 60}m{elapsed % 60:02d}s"
        parts = []
        for task in self._tasks.values():
            count = f"{task.completed:g}" + (f"/{task.total:g}" if task.total is not None else "")
            parts.append(f"{task.description}: {count}")
        if parts:
            # Descriptions may carry rich markup of our own ([bold]name); the line is written plain.
            text = "; ".join(parts)
            self.console.print(escape(f"[{clock}] " + _strip_markup(text)), highlight=False, soft_wrap=True)


def _strip_markup(text: str) -> str:
    from rich.text import Text

    return Text.from_markup(text).plain if "[" in text else text

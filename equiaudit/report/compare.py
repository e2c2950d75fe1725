"""Trajectories of REE over training, and the ``compare.csv`` rows drawn from them (pure).

Input rows are ``summary.csv`` rows (strings as read back, or the values just computed);
only ``ok`` rows with a known step take part. ``first_step_below`` is the first step
whose REE is at or below the threshold: the paper's "≤ 2 % within N steps";
``first_step_stays_below`` the step from which every later checkpoint is below it too
(robust to a noisy dip); ``dip_step`` the step of the lowest REE (``min_rel_equiv_error``). Checkpoints flagged
``not_learned`` (skill below ``--min-skill``) take part in none of these.

The efficiency view (:func:`efficiency_rows`): held-out ``L_aug`` against wall-clock time
(hours since each run's first checkpoint, from the checkpoints' modification times), and,
for a target loss every run reaches, the time each run needs and the speed-up the slower
ones would need to match the fastest — the "efficiency gap" between, say, a
non-equivariant model and an equivariant one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table
from rich.text import Text

from equiaudit.null import NOT_LEARNED
from equiaudit.report.table import format_interval, format_percent
from equiaudit.result import as_float
from equiaudit.schema import COMPARE_COLUMNS, EFFICIENCY_COLUMNS  # (re-exported: the column lists live in the schema)

__all__ = [
    "X_AXES", "X_LABELS", "COMPARE_COLUMNS", "EFFICIENCY_COLUMNS", "Trajectory", "epochs_only", "trajectories",
    "compare_rows", "efficiency_rows",
    "unique_names", "sparkline", "compare_table",
]

X_AXES = ("step", "epoch", "time")
X_LABELS = {"step": "training step", "epoch": "epoch", "time": "time since first checkpoint (h)"}
# Extra column naming the first point below the threshold on a non-step axis.
_FIRST_X_COLUMN = {"epoch": "first_epoch_below", "time": "first_hours_below"}
_SERIES = ("rel_equiv_error", "rel_equiv_error_ci_low", "rel_equiv_error_ci_high", "loss_aug", "loss_sym", "equiv_error")



@dataclass
class Trajectory:
    """One run's head over training, ordered by step; ``x`` is the chosen axis (NaN if unknown)."""

    run: str
    head: str
    steps: list[int] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in _SERIES})
    # False where the checkpoint's flag is not_learned (skill below --min-skill): its REE says nothing.
    learned: list[bool] = field(default_factory=list)

    @property
    def ree(self) -> list[float]:
        return self.series["rel_equiv_error"]


def epochs_only(rows: Sequence[dict]) -> bool:
    """Every ``ok`` row's step is its epoch: the checkpoints stored no step (plot against epochs)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("step") not in (None, "")]
    return bool(ok) and all(str(r.get("epoch")) == str(r.get("step")) for r in ok)


def trajectories(rows: Sequence[dict], *, x: str = "step", run: str | None = None) -> list[Trajectory]:
    """Group the ``ok`` rows with a step into one trajectory per run and head.

    ``run`` renames every run of ``rows`` (a source holding one run, shown under a unique name).
    For the same checkpoint and head seen twice (audited under two settings) the last row wins.
    ``x="time"`` is hours since the run's earliest checkpoint.
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    latest: dict[tuple, dict] = {}
    for row in rows:
        step = as_float(row.get("step"))
        if row.get("status") == "ok" and not math.isnan(step):
            latest[(row["run"], row["checkpoint"], row["head"])] = row
    starts: dict[str, float] = {}
    for (name, _, _), row in latest.items():
        starts[name] = min(starts.get(name, math.inf), as_float(row.get("checkpoint_time")))
    found: dict[tuple[str, str], Trajectory] = {}
    for (name, _, head), row in sorted(latest.items(), key=lambda kv: (kv[0][0], int(as_float(kv[1]["step"])))):
        traj = found.setdefault((name, head), Trajectory(run if run is not None else name, head))
        traj.steps.append(int(as_float(row["step"])))
        if x == "step":
            traj.x.append(float(traj.steps[-1]))
        elif x == "epoch":
            traj.x.append(as_float(row.get("epoch")))
        else:
            traj.x.append((as_float(row.get("checkpoint_time")) - starts[name]) / 3600)
        for key in _SERIES:
            traj.series[key].append(as_float(row.get(key)))
        traj.learned.append(row.get("flag") != NOT_LEARNED)
    # `total` first in each run, then the heads in the order they appear.
    return sorted(found.values(), key=lambda t: (t.run, t.head != "total"))


def compare_rows(trajs: Sequence[Trajectory], *, threshold: float, x: str = "step") -> list[dict]:
    """One ``compare.csv`` row per trajectory (columns :data:`COMPARE_COLUMNS`, plus the first
    ``epoch``/``hours`` below the threshold when ``x`` is not ``step``).

    Checkpoints flagged ``not_learned`` never count as below the threshold (a model that has
    learnt nothing reads as equivariant), nor as the dip; ``n_not_learned`` says how many there were."""
    out = []
    for t in trajs:
        learned = t.learned if len(t.learned) == len(t.ree) else [True] * len(t.ree)
        counted = [r if ok else math.nan for r, ok in zip(t.ree, learned)]
        below = [i for i, r in enumerate(counted) if r <= threshold]
        above = [i for i, r in enumerate(counted) if not r <= threshold]  # NaN (or not learned) counts as not below
        stays = (above[-1] + 1) if above else 0
        row = {
            "run": t.run,
            "head": t.head,
            "threshold": threshold,
            "first_step_below": t.steps[below[0]] if below else None,
            "final_step": t.steps[-1],
            "final_rel_equiv_error": t.ree[-1],
            "min_rel_equiv_error": min((r for r in counted if not math.isnan(r)), default=math.nan),
            "first_step_stays_below": t.steps[stays] if stays < len(t.steps) else None,
            "final_ci_low": t.series["rel_equiv_error_ci_low"][-1],
            "final_ci_high": t.series["rel_equiv_error_ci_high"][-1],
            "n_checkpoints": len(t.steps),
            "dip_step": t.steps[min(range(len(counted)), key=lambda i: counted[i] if not math.isnan(counted[i]) else math.inf)]
            if any(not math.isnan(r) for r in counted) else None,
            "n_not_learned": sum(not ok for ok in learned),
        }
        if x != "step":
            first_x = next((t.x[i] for i in below if not math.isnan(t.x[i])), None)
            row[_FIRST_X_COLUMN[x]] = int(first_x) if x == "epoch" and first_x is not None else first_x
        out.append(row)
    return out


def _time_to(hours: Sequence[float], losses: Sequence[float], target: float) -> float:
    """First time the loss is at or below ``target``, interpolated linearly in log loss
    between the checkpoints around the crossing; NaN if never."""
    previous = None
    for h, loss in zip(hours, losses):
        if math.isnan(h) or not loss > 0:
            continue
        if loss <= target:
            if previous is None or previous[1] <= target:
                return h
            (h0, l0), (h1, l1) = previous, (h, loss)
            f = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(l1))
            return h0 + f * (h1 - h0)
        previous = (h, loss)
    return math.nan


def efficiency_rows(trajs: Sequence[Trajectory]) -> list[dict]:
    """Per run (``total`` head; ``trajs`` on the ``time`` axis): hours to reach the lowest held-out
    ``L_aug`` that every run reaches, and the speed-up each would need to match the fastest."""
    shown = [t for t in trajs if t.head == "total" and any(not math.isnan(x) for x in t.x)]
    if not shown:
        return []
    best = {t.run: min((v for v in t.series["loss_aug"] if v > 0), default=math.nan) for t in shown}
    target = max(best.values())  # the lowest loss that every run reaches
    hours = {t.run: _time_to(t.x, t.series["loss_aug"], target) for t in shown}
    fastest = min((h for h in hours.values() if not math.isnan(h)), default=math.nan)
    rows = []
    for t in shown:
        h = hours[t.run]
        rows.append({"run": t.run, "head": t.head, "loss_target": target, "hours_to_target": h,
                     "speedup_needed": h / fastest if fastest > 0 and not math.isnan(h) else (1.0 if h == fastest else math.nan),
                     "final_loss_aug": t.series["loss_aug"][-1], "final_hours": t.x[-1]})
    return rows


def unique_names(runs: Sequence[tuple[str, Path]]) -> list[str]:
    """Run names made unique by prefixing just enough of each run's location.

    ``runs`` holds ``(name, origin)``: origin is the run directory itself (named ``name``) or
    the audit output that holds the run. ``exp_a/ckpts`` and ``exp_b/ckpts`` become
    ``exp_a/ckpts`` and ``exp_b/ckpts``; the same location given twice gets ``#2``.
    """
    names = [name for name, _ in runs]
    for depth in range(1, 6):
        clashes = {n for n, count in Counter(names).items() if count > 1}
        if not clashes:
            return names
        for i, (name, origin) in enumerate(runs):
            if names[i] in clashes:
                base = Path(origin).parent if Path(origin).name == name else Path(origin)
                prefix = "/".join(base.parts[-depth:]).lstrip("/")
                names[i] = f"{prefix}/{name}" if prefix else name
    seen: Counter = Counter()
    for i, name in enumerate(names):
        seen[name] += 1
        if seen[name] > 1:
            names[i] = f"{name}#{seen[name]}"
    return names


_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], low: float, high: float) -> str:
    """One block character per value on a log scale from ``low`` to ``high`` (``·`` if missing)."""
    span = math.log10(high) - math.log10(low) if high > low > 0 else 0.0
    chars = []
    for v in values:
        if not v > 0:
            chars.append("·" if math.isnan(v) else _BLOCKS[0])
            continue
        level = (math.log10(v) - math.log10(low)) / span if span else 0.5
        chars.append(_BLOCKS[min(len(_BLOCKS) - 1, max(0, round(level * (len(_BLOCKS) - 1))))])
    return "".join(chars)


def _coloured_curve(values: Sequence[float], low: float, high: float, threshold: float,
                    learned: Sequence[bool] = ()) -> Text:
    """The sparkline, green where REE is at or below the threshold, grey where not learned."""
    curve = Text()
    learned = list(learned) if len(learned) == len(values) else [True] * len(values)
    for char, value, ok in zip(sparkline(values, low, high), values, learned):
        curve.append(char, style="dim" if not ok else ("green" if value <= threshold else "red"))
    return curve


def compare_table(rows: Sequence[dict], trajs: Sequence[Trajectory], *, title: str | None = None) -> Table:
    """The compare rows as a rich table, each with its REE curve as a sparkline (log scale)."""
    positive = [r for t in trajs for r in t.ree if r > 0]
    low, high = (min(positive), max(positive)) if positive else (1.0, 1.0)
    curves = {(t.run, t.head): (t.ree, t.learned) for t in trajs}
    caption = f"REE curve per checkpoint, log scale {format_percent(low)} ▁ … █ {format_percent(high)}"
    ignored = sum(int(as_float(r.get("n_not_learned")) or 0) for r in rows if r.get("head") == "total"
                  and not math.isnan(as_float(r.get("n_not_learned"))))
    if ignored:
        caption += (f"\n{ignored} not_learned checkpoint(s) (skill below --min-skill; grey in the curve) ignored by "
                    "'≤ threshold', 'stays ≤' and 'min REE': a model that has learnt nothing reads as equivariant")
    table = Table(title=None if title is None else Text(title), header_style="bold", caption=caption)
    for name, justify in (("run", "left"), ("head", "left"), ("≤ threshold at step", "right"), ("stays ≤ from", "right"),
                          ("final REE @ step", "right"), ("95 % CI", "right"), ("min REE @ step", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("REE curve", no_wrap=True, overflow="crop")  # the first to give way on a narrow terminal
    previous = None
    for row in rows:
        if previous is not None and row["run"] != previous:
            table.add_section()
        first = row["run"] != previous
        previous = row["run"]
        threshold = as_float(row["threshold"])
        reached = row["first_step_below"] not in (None, "")
        stays = row.get("first_step_stays_below") not in (None, "")
        final = as_float(row["final_rel_equiv_error"])
        ree, learned = curves.get((row["run"], row["head"]), ([], []))
        final_learned = not learned or learned[-1]
        table.add_row(
            Text(str(row["run"])) if first else "",  # Text: user names are never markup
            Text(str(row["head"])),
            Text(str(row["first_step_below"]), style="green") if reached else Text(f"never (≤ {format_percent(threshold)})", style="red"),
            Text(str(row["first_step_stays_below"]), style="green") if stays else Text("never", style="red"),
            Text(format_percent(final) + ("" if final_learned else " †") + f" @ {row['final_step']}",
                 style="dim" if not final_learned else ("green" if final <= threshold else "red")),
            format_interval(row.get("final_ci_low"), row.get("final_ci_high")),
            format_percent(row["min_rel_equiv_error"]) + (f" @ {row['dip_step']}" if row.get("dip_step") not in (None, "") else ""),
            _coloured_curve(ree, low, high, threshold, learned),
        )
    return table

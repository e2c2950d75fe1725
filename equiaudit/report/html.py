"""``OUT/report.html``: everything an audit (or a compare) wrote, on one self-contained page.

The page is meant to be mailed, attached to a ticket or opened from a cluster's scratch
folder: it makes no request at all — every image is embedded as a ``data:image/png;base64``
URI, the CSS is inline, there are no scripts and no fonts beyond the reader's own. It is
rebuilt from the files in ``OUT``, so it shows whatever is there; a section whose file is
absent (or cannot be parsed) is left out, never drawn empty or as a broken image:

* header: tool version, generation time, and the settings of ``run.json`` (task, group,
  K rotations, N samples, seed, device, torch version, settings hash);
* **summary** (``summary.csv``): per run, the latest row per checkpoint × head (the last
  one written wins, as in :func:`~equiaudit.report.compare.trajectories`), with losses,
  REE in % coloured against the threshold as in the terminal table (green ≤ threshold,
  yellow ≤ 5×, red above), its 95 % CI, the floors and the local metric when measured,
  and each checkpoint's status — failed checkpoints are listed with their message;
* **trajectory** (``trajectory.png``, or drawn from ``summary.csv`` when absent);
* **breakdown** (``breakdown.csv``): each split of each run's latest checkpoint, with the
  share of the error as a bar; **REE per t** for flow matching's fixed-time bins;
* **training dynamics** (``dynamics.csv``, ``correlations.csv``): the gradient figure, the
  per-checkpoint gradient/curvature table and the correlations;
* **landscapes** (``landscape/*.csv`` + ``.json``): per checkpoint the two surfaces, the
  quadratic fit's R², the eigen-directions and their eigenvalues;
* **test-time twirling** (``twirl.csv``): the curve and the smallest k removing ``twirl_target`` (90 %) of EE;
* **compare** (``compare.csv``, ``compare.png``): steps to the threshold per run.

All text that comes from users or files (run and checkpoint names, messages, settings) is
HTML-escaped (:func:`html.escape`, quotes included) after :func:`printable` has turned
undecodable bytes into visible ``\\xff`` escapes. Numbers use the terminal table's
formatters (:mod:`equiaudit.report.table`), so the page and the terminal agree digit for
digit. The file is written atomically (:mod:`equiaudit.io.atomic`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from equiaudit.floor import AT_FLOOR
from equiaudit.null import NOT_LEARNED
from equiaudit.io.atomic import atomic_write_text
from equiaudit.io.layout import OutputFolder
from equiaudit.io.tables import DamagedCSV, read_csv, step_key
from equiaudit.result import as_float
from equiaudit.schema import CORRELATION_COLUMNS, LANDSCAPE_COLUMNS
from equiaudit.report.figures import latest_rows, printable
from equiaudit.report.table import NOT_LEARNED_NOTE, _ree_style, format_interval, format_number, format_percent, format_skill, ree_mark
from equiaudit.tasks import SampleVariable, sample_variables

__all__ = ["write_report", "render_report", "printable"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Header columns each new file must have for its section to be drawn.
_REQUIRED = {
    "dynamics": ("run", "checkpoint", "step", "head", "grad_norm_ratio", "grad_cosine"),
    "correlations": CORRELATION_COLUMNS,
    "twirl": ("run", "checkpoint", "step", "head", "k", "loss_twirled"),
    "landscape": LANDSCAPE_COLUMNS,
    "compare": ("run", "head", "threshold", "first_step_below", "final_step", "final_rel_equiv_error"),
}


def _esc(text) -> str:
    return html.escape(printable(text), quote=True)


# ----------------------------------------------------------------------------- building blocks


def _cell(text: str, cls: str = "", *, raw: bool = False, title: str | None = None) -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' title="{_esc(title)}"' if title else "")
    return f"<td{attrs}>{text if raw else _esc(text)}</td>"


def _num(value, formatter: Callable = format_number) -> str:
    return _cell(formatter(value), "num")


def _ree(value, threshold: float, *, flag: str | None = None, skill=None) -> str:
    if flag == NOT_LEARNED:  # greyed, with the reason on hover and in the caption
        reason = f"not learned: skill {format_skill(skill)} below --min-skill; this REE says nothing about learned symmetry"
        return _cell(format_percent(value) + ree_mark(flag), "num ree ree-dim", title=reason)
    style = _ree_style(value, threshold)  # the terminal table's colours: green, yellow, red, dim
    return _cell(format_percent(value) + ree_mark(flag), f"num ree ree-{style}")


def _table(headers: Sequence[tuple[str, str]], rows: Iterable[tuple[str, Sequence[str]]], *, caption: str = "", table_id: str = "") -> str:
    """An HTML table; ``headers`` are ``(name, css class)``, ``rows`` ``(row class, cells)``
    with cells already rendered by :func:`_cell` (escaped)."""
    head = "".join(f'<th class="{cls}">{_esc(name)}</th>' if cls else f"<th>{_esc(name)}</th>" for name, cls in headers)
    body = "".join((f'<tr class="{cls}">' if cls else "<tr>") + "".join(cells) + "</tr>" for cls, cells in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    ident = f' id="{_esc(table_id)}"' if table_id else ""
    return f'<div class="table-wrap"><table{ident}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _image(data: bytes, alt: str, caption: str = "") -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{_esc(alt)}">{cap}</figure>'


def _figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (kept in memory: embedded, not written)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _png_file(path: Path) -> bytes | None:
    """The bytes of an existing, real PNG (a torn or foreign file is not embedded)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(PNG_MAGIC) and len(data) > 64 else None


def _step_text(row: Mapping) -> str:
    step = row.get("step")
    return "" if step in (None, "") else str(step)


def _latest(rows: Sequence[Mapping], key: Sequence[str]) -> list[Mapping]:
    """The last row per ``key``, sorted by run and step, unknown steps last (:func:`~equiaudit.report.figures.latest_rows`)."""
    return latest_rows(rows, key)


def _by_run(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    out: dict[str, list[Mapping]] = {}
    for row in rows:
        out.setdefault(str(row.get("run", "")), []).append(row)
    return out


def _run_heading(run: str, runs: int) -> str:
    """``run <name>`` above a run's table, when the section has several runs."""
    return f'<h3>run <span class="name">{_esc(run)}</span></h3>' if runs > 1 else ""


class _Page:
    """Collects sections and notes while the files of ``OUT`` are read."""

    def __init__(self, folder: OutputFolder):
        self.folder = folder
        self.sections: list[tuple[str, str, str]] = []  # (anchor, heading, body)
        self.notes: list[str] = []

    def csv(self, path: Path, required: Sequence[str] = ()) -> list[dict]:
        try:
            return read_csv(path, required)
        except DamagedCSV as exc:
            self.notes.append(f"{exc.path.name} could not be read ({exc.reason}): its section is left out.")
            return []

    def add(self, anchor: str, heading: str, body: str) -> None:
        if body:
            self.sections.append((anchor, heading, body))


# ----------------------------------------------------------------------------- sections


def _summary_section(rows: Sequence[Mapping], threshold: float) -> str:
    """Per run: the latest row per checkpoint × head, ``total`` first within a checkpoint."""
    latest = _latest(rows, ("run", "checkpoint", "head"))
    latest.sort(key=lambda r: (str(r.get("run", "")), step_key(r), str(r.get("checkpoint", "")), r.get("head") != "total"))
    extra = [(c, name) for c, name in (("interp_floor", "interp floor"), ("float_floor", "float floor"), ("rel_local_equiv_error", "local (rel)"),
                                       ("skill", "skill"))
             if any(r.get(c) not in (None, "") for r in latest)]
    parts = []
    for run, run_rows in _by_run(latest).items():
        totals = [r for r in run_rows if r.get("head") == "total"]
        failed = [r for r in totals if r.get("status") != "ok"]
        failed_any = bool(failed)
        headers = [("step", "num"), ("checkpoint", ""), ("head", ""), ("L_aug", "num"), ("L_sym", "num"), ("EE", "num"),
                   ("REE", "num"), ("95 % CI (%)", "num"), *[(name, "num") for _, name in extra], ("status", "")]
        if failed_any:
            headers.append(("message", ""))
        lines, previous = [], None
        for row in run_rows:
            key = (row.get("checkpoint"), _step_text(row))
            first = key != previous
            previous = key
            ok = row.get("status") == "ok"
            is_total = row.get("head") == "total"
            cells = [
                _cell(_step_text(row) if first else "", "num"),
                _cell(row.get("checkpoint", "") if first else "", "name"),
                _cell(row.get("head", "")),
                _num(row.get("loss_aug")),
                _num(row.get("loss_sym")),
                _num(row.get("equiv_error")),
                _ree(row.get("rel_equiv_error"), threshold, flag=row.get("flag"), skill=row.get("skill")),
                _cell(format_interval(row.get("rel_equiv_error_ci_low"), row.get("rel_equiv_error_ci_high")), "num"),
                *[_num(row.get(c), format_skill if c == "skill" else format_percent) for c, _ in extra],
                _cell(str(row.get("status", "")) if is_total else "", "status-ok" if ok else "status-failed"),
            ]
            if failed_any:
                cells.append(_cell(row.get("message", "") if is_total and not ok else "", "message"))
            lines.append((" ".join(c for c in ("group-start" if first else "", "" if ok else "failed") if c), cells))
        counts = f"{len(totals)} checkpoint(s), {len(totals) - len(failed)} audited"
        if failed:
            counts += f', <span class="bad">{len(failed)} failed</span>'
        caption = "REE = equivariance error / L_aug; 95 % CI: bootstrap over samples"
        if any(r.get("flag") == AT_FLOOR for r in run_rows):
            caption += "; * within 10× of the float floor: indistinguishable from exact equivariance at the model's precision"
        if any(r.get("flag") == NOT_LEARNED for r in run_rows):
            caption += "; " + NOT_LEARNED_NOTE
        parts.append(f'<h3>run <span class="name">{_esc(run)}</span></h3><p class="meta">{counts}</p>'
                     + _table(headers, lines, caption=_esc(caption), table_id=f"summary-{len(parts)}"))
    return "".join(parts)


def _trajectory_section(folder: OutputFolder, rows: Sequence[Mapping], threshold: float) -> str:
    data = _png_file(folder.plot)
    if data is None:
        from equiaudit.report.compare import trajectories

        trajs = trajectories(rows)
        if not trajs:
            return ""
        from equiaudit.report.plot import trajectory_figure

        data = _figure_png(trajectory_figure(trajs, threshold=threshold))
    return _image(data, "REE and losses against training step",
                  f"Left: REE against step with its 95 % CI, threshold {100 * threshold:g} % dashed. Right: L_aug, L_sym and EE.")


def _share_cell(value) -> str:
    share = as_float(value)
    width = 0.0 if not math.isfinite(share) else max(0.0, min(100.0, 100 * share))
    return _cell(f'<span class="bar" style="width:{width:.1f}%"></span><span class="bar-text">{_esc(format_percent(value))}</span>',
                 "num share", raw=True)


def _breakdown_section(rows: Sequence[Mapping], threshold: float) -> str:
    """Each split of each run's latest checkpoint (highest step), as ``audit --by`` prints them."""
    latest = _latest(rows, ("run", "checkpoint", "head", "by", "bin"))
    parts = []
    for run, run_rows in _by_run(latest).items():
        last = max(run_rows, key=lambda r: (step_key(r), str(r.get("checkpoint", ""))))
        chosen = [r for r in rows if (r.get("run"), r.get("checkpoint")) == (last.get("run"), last.get("checkpoint"))]
        chosen = _latest(chosen, ("head", "by", "bin"))
        where = f"step {last['step']}" if last.get("step") else str(last.get("checkpoint", ""))
        parts.append(f'<h3>run <span class="name">{_esc(run)}</span> · {_esc(where)} · <span class="name">{_esc(last.get("checkpoint", ""))}</span></h3>')
        for by in dict.fromkeys(str(r.get("by", "")) for r in chosen):
            lines, previous = [], None
            for row in (r for r in chosen if str(r.get("by", "")) == by):
                head = str(row.get("head", ""))
                lines.append(("group-start" if previous is not None and head != previous else "", [
                    _cell(head if head != previous else ""),
                    _cell(row.get("bin", ""), "name"),
                    _num(row.get("loss_aug")),
                    _num(row.get("equiv_error")),
                    _ree(row.get("rel_equiv_error"), threshold),
                    _share_cell(row.get("share")),
                    _cell(str(row.get("n", "")), "num"),
                ]))
                previous = head
            parts.append(f"<h4>by {_esc(by)}</h4>" + _table(
                [("head", ""), (by, ""), ("L_aug", "num"), ("EE", "num"), ("REE", "num"), ("share of EE", "num"), ("n", "num")],
                lines, caption="share: part of the checkpoint's total equivariance error", table_id=f"breakdown-{len(parts)}"))
    return "".join(parts)


def _per_variable_section(rows: Sequence[Mapping], variable: SampleVariable, threshold: float) -> str:
    """The per-variable panel: REE against step at each fixed value of a task's per-sample variable."""
    by = variable.name
    v_rows = [r for r in rows if r.get("by") == by]
    if not v_rows:
        return ""
    from equiaudit.report.plot_dynamics import per_t_figure

    return _image(_figure_png(per_t_figure(v_rows, threshold=threshold, by=by)), f"REE against step at each fixed {by}",
                  f"One line per fixed {variable.description} (breakdown by {by}); threshold dashed.")


def _with_ree(dynamics: Sequence[Mapping], summary: Sequence[Mapping]) -> list[dict]:
    """Dynamics rows with ``rel_equiv_error`` taken from ``summary.csv`` where they lack it."""
    ree = {(r.get("run"), r.get("checkpoint"), r.get("head")): r.get("rel_equiv_error") for r in summary if r.get("status") == "ok"}
    out = []
    for row in dynamics:
        row = dict(row)
        if row.get("rel_equiv_error") in (None, ""):
            row["rel_equiv_error"] = ree.get((row.get("run"), row.get("checkpoint"), row.get("head")), "")
        out.append(row)
    return out


_DYNAMICS_COLUMNS = (
    ("grad_norm_sym", "‖∇L_sym‖"), ("grad_norm_equiv", "‖∇EE‖"), ("grad_norm_ratio", "ratio"), ("grad_cosine", "cosine"),
    ("hessian_top_sym", "λmax(L_sym)"), ("hessian_top_equiv", "λmax(EE)"),
)


def _dynamics_section(rows: Sequence[Mapping], correlations: Sequence[Mapping], threshold: float) -> str:
    parts = []
    if rows:
        from equiaudit.report.plot_dynamics import dynamics_figure

        parts.append(_image(_figure_png(dynamics_figure(rows)), "gradient ratio, gradient cosine and REE against the gradient ratio",
                            "Left: ‖∇EE‖/‖∇L_sym‖ over training. Middle: cosine of the two gradients. "
                            "Right: REE against the ratio, coloured by step; r: Pearson, ρ: Spearman of the logs."))
        latest = _latest(rows, ("run", "checkpoint", "head"))
        heads = {str(r.get("head")) for r in latest}
        shown = [r for r in latest if r.get("head") == "total"] if "total" in heads else latest
        columns = [(c, name) for c, name in _DYNAMICS_COLUMNS if any(r.get(c) not in (None, "") for r in shown)]
        weights = sorted({c.split("/", 1)[0] for r in shown for c in r if "/" in c and c.split("/", 1)[0] in ("var", "normvar")})
        caption = "ratio = ‖∇EE‖ / ‖∇L_sym‖; λmax: top Hessian eigenvalue (Lanczos)"
        if weights:
            caption += f"; weight statistics ({', '.join(w + '/…' for w in weights)}) are in dynamics.csv"
        by_run = _by_run(shown)
        for i, (run, run_rows) in enumerate(by_run.items()):
            lines = [("", [_cell(_step_text(r), "num"), _cell(r.get("checkpoint", ""), "name"), _cell(r.get("head", "")),
                           _ree(r.get("rel_equiv_error"), threshold), *[_num(r.get(c)) for c, _ in columns]]) for r in run_rows]
            parts.append(_run_heading(run, len(by_run)) + _table(
                [("step", "num"), ("checkpoint", ""), ("head", ""), ("REE", "num"), *[(n, "num") for _, n in columns]],
                lines, caption=_esc(caption), table_id=f"dynamics-{i}"))
    if correlations:
        lines = [("", [_cell(r.get("run", ""), "name"), _cell(r.get("head", "")), _cell(r.get("x", "")), _cell(r.get("y", "")),
                       _cell(_corr_text(r.get("pearson")), "num"), _cell(_corr_text(r.get("spearman")), "num"), _cell(str(r.get("n", "")), "num")])
                 for r in correlations]
        parts.append("<h3>correlations over training</h3>" + _table(
            [("run", ""), ("head", ""), ("x", ""), ("y", ""), ("Pearson r", "num"), ("Spearman ρ", "num"), ("n", "num")], lines,
            caption="across the run's checkpoints", table_id="correlations"))
    return "".join(parts)


def _corr_text(value) -> str:
    x = as_float(value)
    return "—" if math.isnan(x) else f"{x:.3f}"


def _eigen_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(format_number(v) for v in value)
    if isinstance(value, Mapping):
        return "; ".join(f"{printable(k)}: {_eigen_text(v)}" for k, v in value.items())
    return format_number(value)


def _landscape_items(page: _Page) -> list[tuple[str, list[dict], dict]]:
    """``(name, rows, meta)`` per ``landscape/<checkpoint>.csv``, ordered by step then name."""
    folder = page.folder / OutputFolder.LANDSCAPE
    if not folder.is_dir():
        return []
    items = []
    for path in sorted(folder.glob("*.csv")):
        rows = page.csv(path, _REQUIRED["landscape"])
        if not rows:
            continue
        meta: dict = {}
        try:
            loaded = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass
        items.append((str(meta.get("checkpoint", path.stem)), rows, meta))
    return sorted(items, key=lambda item: (as_float(item[2].get("step")) if math.isfinite(as_float(item[2].get("step"))) else math.inf, item[0]))


def _landscape_section(items: Sequence[tuple[str, list[dict], dict]]) -> str:
    if not items:
        return ""
    from equiaudit.report.plot_dynamics import landscape_figure

    lines = [("", [_cell(_step_text(meta), "num"), _cell(name, "name"), _num(meta.get("r2_sym")), _num(meta.get("r2_equiv")),
                   _cell(", ".join(map(printable, meta.get("directions") or [])) or "—")]) for name, _, meta in items]
    parts = [_table([("step", "num"), ("checkpoint", ""), ("R² L_sym", "num"), ("R² EE", "num"), ("directions", "")], lines,
                    caption="R² of the least-squares quadratic fit of each surface (1 = a perfect bowl)", table_id="landscapes")]
    for name, rows, meta in items:
        where = f" · step {meta['step']}" if meta.get("step") not in (None, "") else ""
        facts = [("R² of the quadratic fit", f"L_sym {format_number(meta.get('r2_sym'))}, EE {format_number(meta.get('r2_equiv'))}")]
        eigen = meta.get("eigenvalues")
        if isinstance(eigen, Mapping):
            facts += [(f"eigenvalue {printable(k)}", _eigen_text(v)) for k, v in eigen.items()]
        if meta.get("span") not in (None, ""):
            facts.append(("span", f"±{_eigen_text(meta['span'])}" if not isinstance(meta["span"], (list, tuple)) else _eigen_text(meta["span"])))
        if meta.get("n") not in (None, ""):
            facts.append(("grid", f"{printable(meta['n'])} × {printable(meta['n'])}"))
        dl = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts)
        parts.append(f'<h3><span class="name">{_esc(name)}</span>{_esc(where)}</h3>'
                     + _image(_figure_png(landscape_figure(rows, meta)), f"loss landscape of {printable(name)}")
                     + f'<dl class="facts">{dl}</dl>')
    return "".join(parts)


def _twirl_section(rows: Sequence[Mapping]) -> str:
    if not rows:
        return ""
    from equiaudit.report.plot_dynamics import smallest_k, twirl_figure, twirl_target

    latest = _latest(rows, ("run", "checkpoint", "head", "k"))
    curves: dict[tuple, list[Mapping]] = {}
    for row in latest:
        curves.setdefault((str(row.get("run", "")), str(row.get("checkpoint", "")), str(row.get("head", ""))), []).append(row)
    tables: dict[str, list] = {}
    for (run, checkpoint, head), curve in curves.items():
        curve = sorted(curve, key=lambda r: as_float(r.get("k")))
        last = curve[-1]
        k90 = str(smallest_k(curve[0]) or "")
        k_max = format_number(last.get("k"))
        tables.setdefault(run, []).append(("", [
            _cell(_step_text(curve[0]), "num"), _cell(checkpoint, "name"), _cell(head),
            _num(curve[0].get("loss_aug")), _num(curve[0].get("loss_sym")), _num(curve[0].get("equiv_error")),
            _cell(k_max, "num"), _num(last.get("share_of_equiv_error_removed"), format_percent),
            _cell(k90 if k90 else f"none ≤ {k_max}", "num" if k90 else "num bad")]))
    target = f"{100 * twirl_target(rows):g} %"
    parts = [_image(_figure_png(twirl_figure(rows)), "held-out loss against the number of rotations averaged",
                    f"Left: loss of the k-rotation average (dotted: L_aug, dashed: L_sym; ★ smallest k removing {target} of EE). "
                    "Right: share of EE removed.")]
    for i, (run, lines) in enumerate(tables.items()):
        parts.append(_run_heading(run, len(tables)) + _table(
            [("step", "num"), ("checkpoint", ""), ("head", ""), ("L_aug", "num"), ("L_sym", "num"), ("EE", "num"), ("largest k", "num"),
             ("EE removed at largest k", "num"), (f"smallest k removing {target}", "num")],
            lines, caption="averaging the model over k rotations at test time", table_id=f"twirl-{i}"))
    return "".join(parts)


def _compare_caption(rows: Sequence[Mapping]) -> str:
    ignored = sum(int(as_float(r.get("n_not_learned"))) for r in rows
                  if r.get("head") == "total" and math.isfinite(as_float(r.get("n_not_learned"))))
    caption = "steps to the REE threshold per run"
    if ignored:
        caption += (f"; {ignored} not_learned checkpoint(s) (skill below --min-skill) ignored by the threshold steps and "
                    "the min REE: a model that has learnt nothing reads as equivariant")
    return caption


def _compare_section(folder: OutputFolder, rows: Sequence[Mapping]) -> str:
    parts = []
    if rows:
        extra = [(c, name) for c, name in (("dip_step", "dip at step"), ("dip_rel_equiv_error", "dip REE")) if any(r.get(c) not in (None, "") for r in rows)]
        lines = []
        for row in rows:
            threshold = as_float(row.get("threshold"))
            reached = row.get("first_step_below") not in (None, "")
            stays = row.get("first_step_stays_below") not in (None, "")
            cells = [
                _cell(row.get("run", ""), "name"), _cell(row.get("head", "")), _num(row.get("threshold"), format_percent),
                _cell(str(row["first_step_below"]) if reached else "never", "num good" if reached else "num bad"),
                _cell(str(row["first_step_stays_below"]) if stays else "never", "num good" if stays else "num bad"),
                _cell(str(row.get("final_step", "")), "num"),
                _ree(row.get("final_rel_equiv_error"), threshold if math.isfinite(threshold) else 0.02),
                _cell(format_interval(row.get("final_ci_low"), row.get("final_ci_high")), "num"),
                _num(row.get("min_rel_equiv_error"), format_percent),
                _cell(str(row.get("n_checkpoints", "")), "num"),
            ]
            for c, _ in extra:
                cells.append(_num(row.get(c), format_percent) if c == "dip_rel_equiv_error" else _cell(str(row.get(c, "")), "num"))
            lines.append(("", cells))
        parts.append(_table([("run", ""), ("head", ""), ("threshold", "num"), ("≤ threshold at step", "num"), ("stays ≤ from step", "num"),
                             ("final step", "num"), ("final REE", "num"), ("95 % CI (%)", "num"), ("min REE", "num"), ("checkpoints", "num"),
                             *[(n, "num") for _, n in extra]], lines, caption=_esc(_compare_caption(rows)), table_id="compare"))
    data = _png_file(folder / folder.COMPARE_PLOT)
    if data is not None:
        parts.append(_image(data, "REE trajectories of the compared runs"))
    return "".join(parts)


def _settings(meta: Mapping) -> list[tuple[str, str]]:
    device = meta.get("device")
    if device and meta.get("device_name"):
        device = f"{device} ({meta['device_name']})"
    config_hash = meta.get("config_hash")
    pairs = [
        ("task", meta.get("task")), ("group", meta.get("group_label") or meta.get("group")),
        ("K rotations", meta.get("n_rotations")), ("N samples", meta.get("n_samples")), ("seed", meta.get("seed")),
        ("device", device), ("torch", meta.get("torch_version")), ("audited by", f"equiaudit {meta['equiaudit_version']}" if meta.get("equiaudit_version") else None),
        ("started", meta.get("started")), ("config", meta.get("config_path")),
        ("settings hash", str(config_hash)[:12] if config_hash else None),
    ]
    return [(k, printable(v)) for k, v in pairs if v not in (None, "")]


# ----------------------------------------------------------------------------- the page


def render_report(out: OutputFolder | str | Path, *, title: str | None = None, threshold: float = 0.02,
                  generated: float | None = None) -> str:
    """The page's HTML for the files now in ``out`` (see the module docstring); ``threshold``
    colours REE (a compare folder's own threshold colours its table); ``generated``: the
    time stamp shown (default now)."""
    from equiaudit import __version__

    folder = out if isinstance(out, OutputFolder) else OutputFolder(out)
    page = _Page(folder)
    meta = folder.read_run_json()
    summary = page.csv(folder.summary, ("run", "checkpoint", "step", "head", "rel_equiv_error", "status"))
    breakdown = page.csv(folder.breakdown, ("run", "checkpoint", "step", "head", "by", "bin", "rel_equiv_error"))
    dynamics = page.csv(folder / folder.DYNAMICS, _REQUIRED["dynamics"])
    correlations = page.csv(folder / folder.CORRELATIONS, _REQUIRED["correlations"])
    twirl = page.csv(folder / folder.TWIRL, _REQUIRED["twirl"])
    compare = page.csv(folder / folder.COMPARE, _REQUIRED["compare"])

    page.add("summary", "summary", _summary_section(summary, threshold) if summary else "")
    page.add("trajectory", "REE over training", _trajectory_section(folder, summary, threshold) if summary or folder.plot.is_file() else "")
    page.add("breakdown", "breakdown of the latest checkpoint", _breakdown_section(breakdown, threshold) if breakdown else "")
    for variable in sample_variables().values():
        if variable.drawn:
            page.add(f"per-{variable.name}", f"REE per {variable.label}", _per_variable_section(breakdown, variable, threshold))
    page.add("dynamics", "training dynamics", _dynamics_section(_with_ree(dynamics, summary), correlations, threshold))
    page.add("landscape", "loss landscapes", _landscape_section(_landscape_items(page)))
    page.add("twirl", "test-time twirling", _twirl_section(twirl))
    page.add("compare", "compare", _compare_section(folder, compare))

    task, group = meta.get("task"), meta.get("group_label") or meta.get("group")
    if title is None:
        if compare and not summary:
            title = f"equiaudit compare · {len({r.get('run') for r in compare})} run(s)"
        else:
            title = " · ".join(printable(p) for p in ("equiaudit report", task, group) if p)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(generated if generated is not None else time.time()))
    settings = "".join(f"<div><dt>{_esc(k)}</dt><dd>{_esc(v)}</dd></div>" for k, v in _settings(meta))
    notes = "".join(f'<p class="note">{_esc(n)}</p>' for n in page.notes)
    if not page.sections:
        notes += '<p class="note">Nothing to report yet: this folder has no audit or compare output.</p>'
    nav = "".join(f'<a href="#{a}">{_esc(h)}</a>' for a, h, _ in page.sections)
    sections = "".join(f'<section id="{a}"><h2>{_esc(h)}</h2>{body}</section>' for a, h, body in page.sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="equiaudit {_esc(__version__)}">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_esc(title)}</h1>
<p class="meta">equiaudit {_esc(__version__)} · generated {_esc(stamp)} · <span class="name">{_esc(folder.path)}</span></p>
{f'<dl class="settings">{settings}</dl>' if settings else ''}
<p class="legend">REE = (L_aug − L_sym) / L_aug: the share of the held-out loss due to imperfect rotation equivariance.
<span class="ree ree-green">≤ {threshold * 100:g} %</span> <span class="ree ree-yellow">≤ {threshold * 500:g} %</span>
<span class="ree ree-red">above</span></p>
{notes}
{f'<nav>{nav}</nav>' if nav else ''}
</header>
<main>
{sections}
</main>
</body>
</html>
"""


def write_report(out: OutputFolder | str | Path, *, title: str | None = None, threshold: float = 0.02) -> Path:
    """Write ``OUT/report.html`` (atomically) from the files now in ``out``; returns its path.

    Call it after the CSVs and PNGs of an audit or compare are written (it reads them back;
    nothing is recomputed except the figures drawn from the CSVs).
    """
    folder = out if isinstance(out, OutputFolder) else OutputFolder(out)
    return atomic_write_text(folder / folder.REPORT, render_report(folder, title=title, threshold=threshold))


_CSS = """
:root { --ink: #1f2328; --muted: #59636e; --rule: #d1d9e0; --band: #f6f8fa; --accent: #0969da;
  --green: #116329; --green-bg: #dafbe1; --yellow: #7d4e00; --yellow-bg: #fff8c5; --red: #a40e26; --red-bg: #ffebe9; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0 auto; max-width: 1180px; padding: 24px 28px 48px; color: var(--ink); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.6rem; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 1.25rem; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--rule); }
h3 { font-size: 1.05rem; margin: 22px 0 6px; }
h4 { font-size: 0.95rem; margin: 16px 0 4px; color: var(--muted); }
.meta { color: var(--muted); margin: 0 0 10px; font-size: 0.9rem; }
.name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; overflow-wrap: anywhere; }
td.name { white-space: normal; min-width: 10em; max-width: 24em; }
dl.settings { display: flex; flex-wrap: wrap; gap: 6px 22px; margin: 10px 0; padding: 10px 14px; background: var(--band);
  border: 1px solid var(--rule); border-radius: 6px; }
dl.settings div { display: flex; gap: 6px; }
dl.settings dt { color: var(--muted); }
dl.settings dd { margin: 0; font-weight: 600; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 4px 0 12px; font-size: 0.9rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; font-variant-numeric: tabular-nums; }
.legend { font-size: 0.88rem; color: var(--muted); }
.note { background: var(--yellow-bg); color: var(--yellow); border: 1px solid #d4a72c; border-radius: 6px; padding: 6px 10px; }
nav { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 12px 0 0; font-size: 0.9rem; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
.table-wrap { overflow-x: auto; margin: 6px 0 14px; }
table { border-collapse: collapse; font-size: 0.86rem; font-variant-numeric: tabular-nums; min-width: 40%; }
caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: 0.8rem; padding-top: 4px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eaeef2; text-align: left; vertical-align: top; white-space: nowrap; }
th { background: var(--band); border-bottom: 1px solid var(--rule); font-weight: 600; }
th.num, td.num { text-align: right; }
td.message { white-space: normal; min-width: 16em; color: var(--red); }
tbody tr:hover { background: #f6f8fa80; }
tr.group-start td { border-top: 1px solid var(--rule); }
tr.failed td { background: #fff5f5; }
.ree { font-weight: 600; border-radius: 3px; }
span.ree { padding: 0 6px; }
.ree-green { color: var(--green); background: var(--green-bg); }
.ree-yellow { color: var(--yellow); background: var(--yellow-bg); }
.ree-red { color: var(--red); background: var(--red-bg); }
.ree-dim { color: var(--muted); font-weight: normal; }
.status-ok, .good { color: var(--green); }
.status-failed, .bad { color: var(--red); font-weight: 600; }
td.share { position: relative; min-width: 8em; }
td.share .bar { position: absolute; left: 0; top: 3px; bottom: 3px; background: #54aeff40; border-right: 2px solid #54aeff; }
td.share .bar-text { position: relative; }
figure { margin: 10px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eaeef2; border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.85rem; margin-top: 4px; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav { display: none; }
  h2 { break-after: avoid; page-break-after: avoid; }
  h3, h4 { break-after: avoid; }
  figure, tr, dl { break-inside: avoid; page-break-inside: avoid; }
  .table-wrap { overflow: visible; }
  tbody tr:hover { background: none; }
}
"""

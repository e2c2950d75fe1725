"""An audit output folder with every file kind, written by hand from known values.

Used by the HTML report and dynamics-plot tests. Run and checkpoint names are hostile on
purpose (markup, quotes, ``&``, non-ASCII, an undecodable-byte escape): the report must
show them as text.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from equiaudit.report.compare import trajectories
from equiaudit.report.plot import save_figure, trajectory_figure
from equiaudit.report.summary import write_rows

RUN = '<script>alert("run")</script> & ü'
RUN_B = "run\\xff 'quoted'"
CKPT = '<b>step</b>&"{step}".pt'  # .format(step=...)
FAILED_MESSAGE = "<img src=x onerror=alert(1)> could not be unpickled"
STEPS = (0, 10, 100, 1000)
# REE per (run, step) of the total: green, yellow and red against 2 %.
REE = {RUN: {0: 0.5, 10: 0.08, 100: 0.03, 1000: 0.012}, RUN_B: {10: 0.3, 100: 0.04, 1000: 0.019}}
HEAD_FACTOR = {"total": 1.0, "forces": 0.9, "energy": 1.6}
LOSS_AUG = {0: 2.0, 10: 1.2, 100: 0.9, 1000: 0.7}
FAILED_STEP = 3000  # RUN_B's last checkpoint failed
AT_FLOOR_ROW = (RUN, 1000, "energy")  # flagged as within 10× of its float floor (shown with a *)
T_BINS = ("0", "0.2", "0.5", "0.99")
KS = (1, 2, 4, 8, 16)


def ckpt(step: int) -> str:
    return CKPT.format(step=step)


def summary_rows() -> list[dict]:
    rows = []
    for run, trajectory in REE.items():
        for step, ree in trajectory.items():
            for head, factor in HEAD_FACTOR.items():
                r = ree * factor
                aug = LOSS_AUG[step] * (0.1 if head == "energy" else 1.0)
                rows.append({
                    "run": run, "checkpoint": ckpt(step), "step": step, "head": head, "loss_aug": aug, "loss_sym": aug * (1 - r),
                    "equiv_error": aug * r, "rel_equiv_error": r, "rel_equiv_error_ci_low": 0.9 * r, "rel_equiv_error_ci_high": 1.1 * r,
                    "n_samples": 64, "n_rotations": 16, "group": "so3", "status": "ok", "median_rel_equiv_error": r,
                    "config_hash": "abc123", "seconds": 1.5, "epoch": step // 10, "checkpoint_time": 1.7e9 + step,
                    "weights": "ema", "float_floor": 1e-9, "flag": "at_float_floor" if (run, step, head) == AT_FLOOR_ROW else "",
                })
    rows.append({"run": RUN_B, "checkpoint": ckpt(FAILED_STEP), "step": FAILED_STEP, "head": "total", "status": "load_error",
                 "message": FAILED_MESSAGE, "config_hash": "abc123"})
    return rows


# An older audit of RUN's step-1000 checkpoint under other settings, written first: the later row wins.
STALE_ROW = {"run": RUN, "checkpoint": ckpt(1000), "step": 1000, "head": "total", "loss_aug": 9.0, "loss_sym": 1.0, "equiv_error": 8.0,
             "rel_equiv_error": 0.888, "status": "ok", "config_hash": "old"}


def expected_summary(run: str) -> list[tuple[str, str, float | None, str]]:
    """(checkpoint, head, REE, status) in the order the report lists them."""
    out = []
    for step, ree in REE[run].items():
        for head, factor in HEAD_FACTOR.items():
            out.append((ckpt(step), head, ree * factor, "ok"))
    if run == RUN_B:
        out.append((ckpt(FAILED_STEP), "total", None, "load_error"))
    return out


def breakdown_rows() -> list[dict]:
    rows = []
    for run, trajectory in REE.items():
        for step, ree in trajectory.items():
            for i, t in enumerate(T_BINS):
                r = ree * (1 + i)  # later t, larger REE
                rows.append({"run": run, "checkpoint": ckpt(step), "step": step, "head": "total", "by": "t", "bin": t,
                             "loss_aug": 1.0, "loss_sym": 1 - r, "equiv_error": r, "rel_equiv_error": r, "n": 16,
                             "weight": 0.25, "share": (1 + i) / 10, "config_hash": "abc123"})
            for z, share in (("1", 0.25), ("6", 0.75)):
                rows.append({"run": run, "checkpoint": ckpt(step), "step": step, "head": "forces", "by": "element", "bin": z,
                             "loss_aug": 0.5, "loss_sym": 0.5 - share * ree, "equiv_error": share * ree,
                             "rel_equiv_error": share * ree / 0.5, "n": 100, "weight": 0.5, "share": share, "config_hash": "abc123"})
    return rows


def dynamics_rows() -> list[dict]:
    rows = []
    for run, trajectory in REE.items():
        for step, ree in trajectory.items():
            for head, factor in HEAD_FACTOR.items():
                ratio = 0.5 * math.sqrt(ree * factor)  # falls with REE: a perfect rank correlation
                cosine = 0.8 - 0.1 * math.log10(step + 1)
                row = {"run": run, "checkpoint": ckpt(step), "step": step, "head": head, "grad_norm_sym": 2.0,
                       "grad_norm_equiv": 2.0 * ratio, "grad_norm_ratio": ratio, "grad_cosine": cosine,
                       "grad_norm_aug": 2.5, "hessian_top_sym": 40.0 / (step + 1), "hessian_top_equiv": 4.0 / (step + 1),
                       "var/layers.*.weight": 0.01 * (step + 1), "normvar/layers.*.weight": 0.9, "config_hash": "abc123"}
                if run == RUN:  # RUN_B's rows lack REE: the report takes it from summary.csv
                    row["rel_equiv_error"] = ree * factor
                rows.append(row)
    return rows


CORRELATIONS = [
    {"run": RUN, "head": "total", "x": "log rel_equiv_error", "y": "log grad_norm_ratio", "pearson": 1.0, "spearman": 1.0, "n": 4},
    {"run": RUN, "head": "total", "x": "log rel_equiv_error", "y": "log var/layers.*.weight", "pearson": -0.8765, "spearman": -0.8, "n": 4},
    {"run": RUN_B, "head": "forces", "x": "log rel_equiv_error", "y": "log grad_norm_ratio", "pearson": 0.9321, "spearman": 1.0, "n": 3},
]


def twirl_rows() -> list[dict]:
    """MSE: ``L(k) = L_sym + EE/k``, share ``1 − 1/k``, so 90 % is first reached at k = 16."""
    rows = []
    for step, ree in REE[RUN].items():
        for head in ("total", "forces"):
            aug = LOSS_AUG[step]
            ee = aug * ree * HEAD_FACTOR[head]
            for k in KS:
                rows.append({"run": RUN, "checkpoint": ckpt(step), "step": step, "head": head, "k": k,
                             "loss_twirled": aug - ee + ee / k, "share_of_equiv_error_removed": 1 - 1 / k,
                             "loss_aug": aug, "loss_sym": aug - ee, "equiv_error": ee, "smallest_k": 16, "twirl_target": 0.9, "config_hash": "abc123"})
    return rows


GRID = [-1.0, -0.5, 0.0, 0.5, 1.0]
LANDSCAPES = {  # checkpoint step → (λ_top, λ_small, R² sym, R² EE)
    100: (12.5, 0.25, 0.9987, 0.9123),
    1000: (30.0, 1.5, 0.9991, 0.97),
}


def landscape_rows(step: int) -> list[dict]:
    top, small, _, _ = LANDSCAPES[step]
    return [{"alpha": a, "beta": b, "loss_sym": 1 + 0.5 * (top * a * a + small * b * b), "equiv_error": 0.01 * (1 + a * a + 2 * b * b + a * b)}
            for a in GRID for b in GRID]


def landscape_meta(step: int) -> dict:
    top, small, r2_sym, r2_equiv = LANDSCAPES[step]
    return {"checkpoint": ckpt(step), "step": step, "directions": ["hessian_top", "hessian_smallest_positive"],
            "eigenvalues": {"hessian_top": top, "hessian_smallest_positive": small}, "r2_sym": r2_sym, "r2_equiv": r2_equiv,
            "span": 1.0, "n": len(GRID)}


COMPARE = [
    {"run": RUN, "head": "total", "threshold": 0.02, "first_step_below": 1000, "final_step": 1000, "final_rel_equiv_error": 0.012,
     "min_rel_equiv_error": 0.012, "first_step_stays_below": 1000, "final_ci_low": 0.0108, "final_ci_high": 0.0132, "n_checkpoints": 4},
    {"run": RUN_B, "head": "total", "threshold": 0.02, "first_step_below": 1000, "final_step": 1000, "final_rel_equiv_error": 0.019,
     "min_rel_equiv_error": 0.019, "first_step_stays_below": None, "final_ci_low": 0.0171, "final_ci_high": 0.0209, "n_checkpoints": 3},
]

RUN_JSON = {"equiaudit_version": "0.2.0", "task": "force_field", "seed": 7, "group": "so3", "group_label": "SO(3) <Haar>",
            "n_rotations": 16, "n_samples": 64, "device": "cpu", "device_name": "x86_64", "torch_version": "2.13.0+cpu",
            "config_hash": "abc123def4567890", "started": "2026-11-27T10:00:00+0000", "config_path": "cfg/<ff>.yaml"}


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in header})
    return path


def make_out(root: Path, *, compare: bool = True) -> Path:
    """``root/out`` with summary, breakdown, trajectory.png, run.json, dynamics, correlations,
    twirl, two landscapes (and compare.csv + compare.png when ``compare``)."""
    out = root / "out"
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows()
    write_rows(out / "summary.csv", [STALE_ROW, *rows])
    write_csv(out / "breakdown.csv", breakdown_rows())
    save_figure(trajectory_figure(trajectories(rows)), out / "trajectory.png", dpi=60)
    (out / "run.json").write_text(json.dumps(RUN_JSON), encoding="utf-8")
    write_csv(out / "dynamics.csv", dynamics_rows())
    write_csv(out / "correlations.csv", CORRELATIONS)
    write_csv(out / "twirl.csv", twirl_rows())
    for step in LANDSCAPES:
        name = f"ckpt_{step}"
        write_csv(out / "landscape" / f"{name}.csv", landscape_rows(step))
        (out / "landscape" / f"{name}.json").write_text(json.dumps(landscape_meta(step)), encoding="utf-8")
    if compare:
        write_csv(out / "compare.csv", COMPARE)
        save_figure(trajectory_figure(trajectories(rows)), out / "compare.png", dpi=50)
    return out

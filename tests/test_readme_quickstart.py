"""The README's quick start, followed literally: its code blocks are extracted from README.md,
the files it shows are written (a block whose first line is `# file: NAME`), its commands run
(`equiaudit` as `python -m equiaudit`, this checkout's), and the first number must come out.
The docs' quick-start page holds the same blocks (checked), so it cannot go stale either."""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def quick_start_blocks(text: str) -> list[tuple[str, str]]:
    section = text.split("## Quick start on your own model", 1)[1].split("\n## ", 1)[0]
    return FENCE.findall(section)


def test_readme_is_short_and_its_quick_start_matches_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    docs = (ROOT / "docs" / "quickstart.md").read_text()
    docs_blocks = FENCE.findall(docs.split("## The built-in demo", 1)[0])
    assert quick_start_blocks(readme) == docs_blocks


def test_readme_quick_start_literally(tmp_path):
    blocks = quick_start_blocks((ROOT / "README.md").read_text())
    assert [lang for lang, _ in blocks].count("bash") >= 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outputs = []
    for lang, code in blocks:
        first = code.splitlines()[0]
        match = re.match(r"#\s*file:\s*(\S+)", first)
        if match:
            (tmp_path / match.group(1)).write_text(code)
            continue
        assert lang == "bash", f"a {lang} block without '# file:' cannot be run"
        for line in code.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            args = shlex.split(line)
            if args[0] == "equiaudit":
                args = [sys.executable, "-m", "equiaudit", *args[1:]]
            elif args[0] == "python":
                args = [sys.executable, *args[1:]]
            proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
            outputs.append(proc.stdout)
    with open(tmp_path / "audit_mine" / "summary.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["head"] == "total"]
    assert [int(r["step"]) for r in rows] == [0, 50, 100] and all(r["status"] == "ok" for r in rows)
    assert all(0 <= float(r["rel_equiv_error"]) < 1 for r in rows)
    assert "REE" in outputs[1]  # the CLI's table
    printed = [line for line in outputs[-1].splitlines() if "AuditResult(REE" in line]
    assert len(printed) == 3 and "total = 0.1·energy + 1·forces" in printed[0]
    # The Python API gives the CLI's numbers (same runner, same seed).
    first = float(printed[0].split("AuditResult(REE ")[1].split(" %")[0])
    assert abs(first - 100 * float(rows[0]["rel_equiv_error"])) <= 0.01 * first

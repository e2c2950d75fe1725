"""The README's pytest example (section "Make it equivariant, and keep it so"), run literally:
its `# file: test_*.py` block is written out and run by pytest in a fresh process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def test_readme_pytest_example_runs(tmp_path):
    section = (ROOT / "README.md").read_text().split("## Make it equivariant, and keep it so", 1)[1].split("\n## ", 1)[0]
    files = [code for lang, code in FENCE.findall(section) if re.match(r"#\s*file:\s*test_\S+\.py", code)]
    assert len(files) == 1, "the section shows one pytest file"
    name = re.match(r"#\s*file:\s*(\S+)", files[0]).group(1)
    (tmp_path / name).write_text(files[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b2 passed\b", proc.stdout), proc.stdout

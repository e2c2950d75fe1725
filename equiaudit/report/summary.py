"""``summary.csv``: tidy long format, one row per checkpoint × head (the columns:
:mod:`equiaudit.schema`; reading, writing and the merge rule of every output CSV:
:mod:`equiaudit.io.tables`, re-exported here for existing callers).
"""

from __future__ import annotations

from equiaudit.io.tables import merge_rows, read_rows, step_key, write_rows
from equiaudit.schema import SUMMARY_COLUMNS
from equiaudit.schema import SUMMARY_EXTRA_COLUMNS as EXTRA_COLUMNS

__all__ = ["SUMMARY_COLUMNS", "EXTRA_COLUMNS", "read_rows", "write_rows", "merge_rows", "step_key"]

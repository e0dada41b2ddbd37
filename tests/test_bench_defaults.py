"""Smoke test of benchmarks/bench_defaults.py: it runs and writes its table and CSV (never timing)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_defaults.py"


def test_quick_sweep_writes_its_section_and_csv(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    output.write_text("# Kept\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    command = [sys.executable, str(SCRIPT), "--size", "quick", "--seeds", "0,1", "--jobs", "1"]
    command += ["--arms", "sparsity_curve=cube", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    text = output.read_text()
    assert text.startswith("# Kept\n\n<!-- other:start -->\nkept\n<!-- other:end -->")
    section = text[text.index("<!-- bench_defaults:start -->") : text.index("<!-- bench_defaults:end -->")]
    rows = [line for line in section.splitlines() if line.startswith("| curve |")]
    # One row per pattern swept (1x1, 4x1), each with both seeds' changes.
    assert [row.split("`")[1] for row in rows] == [
        "ours/magnitude/1x1[sparsity_curve=cube,end_step=0.75]",
        "ours/magnitude/4x1[sparsity_curve=cube,end_step=0.75]",
    ]
    assert all(row.count("%") == 4 for row in rows)  # sparsity, median, and two seeds
    with (tmp_path / "defaults_results.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert sorted((r["seed"], r["arm"]) for r in records) == sorted(
        (seed, arm) for seed in ("0", "1") for arm in ["dense", *[row.split("`")[1] for row in rows]]
    )

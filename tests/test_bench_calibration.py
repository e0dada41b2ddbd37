"""Smoke test of benchmarks/bench_calibration.py: it runs and writes its section (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench_calibration:start -->", "<!-- bench_calibration:end -->"


def test_bench_calibration_quick_writes_only_its_section(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    other = "<!-- bench_export:start -->\nexport rows\n<!-- bench_export:end -->"
    output.write_text(f"# Results\n\n{START}\nstale\n{END}\n\n{other}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_calibration.py"), "--quick", "--threads", "1"]
    subprocess.run(
        [*command, "--output", str(output)], check=True, capture_output=True, text=True, env=env, cwd=ROOT
    )
    text = output.read_text()
    assert text.startswith("# Results\n\n") and other in text and "stale" not in text
    section = text[text.index(START) : text.index(END)]
    assert "Command: `python benchmarks/bench_calibration.py --quick --threads 1" in section
    assert "Machine:" in section and "torch threads 1" in section
    assert "| dense | - | - | - | 0% |" in section
    for pattern in ("50% unstructured", "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            assert f"| {pattern} | {method} |" in section
    assert "| 50% unstructured | wanda | each output row |" in section
    assert "| 50% unstructured | wanda | each layer |" in section
    assert section.count("| 50.0% |") >= 6, "every arm pruned exactly half"
    assert "- 2:4: SparseGPT" in section
    assert "its median (median over the 7 layers" in section, "the input-norm spread Wanda relies on"
    assert "torchao" in section  # peer rows, or the reason there are none
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"], "no temporary file left behind"

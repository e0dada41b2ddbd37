"""Smoke test of benchmarks/bench_export.py: it runs and writes its section (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench_export:start -->", "<!-- bench_export:end -->"


def test_bench_export_quick_writes_only_its_section(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    other = "<!-- bench_quality:start -->\nquality rows\n<!-- bench_quality:end -->"
    output.write_text(f"# Results\n\n{START}\nstale\n{END}\n\n{other}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_export.py"), "--quick", "--threads", "1"]
    subprocess.run(
        [*command, "--output", str(output)], check=True, capture_output=True, text=True, env=env, cwd=ROOT
    )
    text = output.read_text()
    assert text.startswith("# Results\n\n") and other in text and "stale" not in text
    assert text.count(START) == 1 and text.count(END) == 1
    section = text[text.index(START) : text.index(END)]
    assert "Command: `python benchmarks/bench_export.py --quick --threads 1" in section
    assert "Machine:" in section and "torch threads 1" in section
    for variant in ("dense", "slim 25% removed", "slim 50% removed", "slim 75% removed"):
        assert f"| FFN | {variant} |" in section
    assert "| CNN | slim 50% removed |" in section
    assert "| FFN | slim 50% removed | 64->128->64 |" in section, "slim really halved the hidden layer"
    assert "2:4 semi-structured" in section
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"], "no temporary file left behind"

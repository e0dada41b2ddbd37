"""Smoke test of benchmarks/bench_structures.py: it runs and writes its section (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench_structures:start -->", "<!-- bench_structures:end -->"


def test_bench_structures_quick_writes_only_its_section(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    output = tmp_path / "RESULTS.md"
    other = "<!-- bench_export:start -->\nexport rows\n<!-- bench_export:end -->"
    output.write_text(f"# Results\n\n{START}\nstale\n{END}\n\n{other}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_structures.py"), "--quick", "--threads", "1"]
    subprocess.run(
        [*command, "--output", str(output)], check=True, capture_output=True, text=True, env=env, cwd=ROOT
    )
    text = output.read_text()
    assert text.startswith("# Results\n\n") and other in text and "stale" not in text
    assert text.count(START) == 1 and text.count(END) == 1
    section = text[text.index(START) : text.index(END)]
    assert "Command: `python benchmarks/bench_structures.py --quick --threads 1" in section
    assert "torch threads 1" in section
    # The slim models really lost a quarter and a half of their heads and FFN units.
    assert "| dense | 2 x (4 / 4 / 128) |" in section
    assert "| 25% removed | 2 x (3 / 3 / 96) |" in section and "| 50% removed | 2 x (2 / 2 / 64) |" in section
    for level, kept in (("25%", "2h/96"), ("50%", "1h/64")):
        assert f"| {level} | ours: head+ffn, local, magnitude |" in section
        assert f"| {kept} |" in section
    torch_pruning = [
        line for line in section.splitlines() if "Torch-Pruning" in line and line.startswith("|")
    ]
    assert len(torch_pruning) == 2  # run, or a row that says why not
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"], "no temporary file left behind"

"""Smoke test of benchmarks/bench_sharded.py: FSDP2 runs on 1 and 2 ranks, its section written (no timing asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench_sharded:start -->", "<!-- bench_sharded:end -->"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_bench_sharded_quick_writes_only_its_section(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    other = "<!-- bench_event:start -->\nevent rows\n<!-- bench_event:end -->"
    output.write_text(f"# Results\n\n{START}\nstale\n{END}\n\n{other}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_sharded.py"),
        "--quick",
        "--output",
        str(output),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    text = output.read_text()
    assert other in text and "stale" not in text and text.count(START) == 1
    section = text[text.index(START) : text.index(END)]
    assert "Command: `python benchmarks/bench_sharded.py --quick --output" in section
    for ranks in (1, 2):
        row = next(line for line in section.splitlines() if line.startswith(f"| {ranks} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 6 and float(cells[3]) > 0 and float(cells[5]) > 0, row
    assert "events at steps 5 and 10" in section
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]

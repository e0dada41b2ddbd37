"""Smoke test of benchmarks/bench_event.py: it runs and writes its table (no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import bench_event


def test_bench_event_quick_writes_its_section(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    output.write_text("# Results\n\nkept text\n")
    bench_event.main(["--quick", "--sizes", "2e4", "--output", str(output)])
    text = output.read_text()
    assert "kept text" in text
    assert text.count(bench_event.START) == 1 and text.count(bench_event.END) == 1
    rows = [line for line in text.splitlines() if line.startswith("| ") and "weights" not in line]
    assert {row.split("|")[2].strip() for row in rows} == set(bench_event.PATTERNS)
    assert all(float(row.split("|")[3]) > 0.5 for row in rows), "the events must reach their sparsity"


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    output.write_text(f"head\n{bench_event.START}\nold\n{bench_event.END}\ntail\n")
    bench_event.write_section(output, "new")
    assert output.read_text() == f"head\n{bench_event.START}\nnew\n{bench_event.END}\ntail\n"
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"], "no temporary file left behind"

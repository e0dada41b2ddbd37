"""Smoke test of benchmarks/bench_event.py: it runs, prints its table, and writes files only when asked
(no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import bench_event
import torch

ROOT = Path(__file__).parent.parent


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and "weights" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def tracked_benchmark_files() -> dict[str, bytes]:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "benchmarks"], check=True, capture_output=True, text=True
    ).stdout.split()
    return {name: (ROOT / name).read_bytes() for name in listed if (ROOT / name).is_file()}


@pytest.mark.bench
def test_without_write_results_it_prints_and_leaves_tracked_files_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = tracked_benchmark_files()
    bench_event.main(
        ["--quick", "--sizes", "2e4", "--patterns", "1x1", "2:4", "--dists", "distinct", "zeros60"]
    )
    assert tracked_benchmark_files() == before
    rows = table_rows(capsys.readouterr().out)
    # Printed twice: as each size finishes and in the final table.
    pairs = {(row[1], row[2]) for row in rows}
    assert pairs == {("1x1", "distinct"), ("1x1", "zeros60"), ("2:4", "distinct"), ("2:4", "zeros60")}
    assert all(float(row[3]) > 0.4 for row in rows), "the events must reach their sparsity"


@pytest.mark.bench
def test_write_results_writes_its_section(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    output.write_text("# Results\n\nkept text\n")
    bench_event.main(
        ["--quick", "--sizes", "2e4", "--dists", "distinct", "--write-results", "--output", str(output)]
    )
    text = output.read_text()
    assert "kept text" in text
    assert text.count(bench_event.START) == 1 and text.count(bench_event.END) == 1
    rows = table_rows(text)
    assert {row[1] for row in rows} == set(bench_event.PATTERNS)
    assert all(float(row[3]) > 0.4 for row in rows), "the events must reach their sparsity"
    assert all(float(row[5]) > 0 for row in rows), "each event in memory passes"
    assert "worst *vs distinct*" in text and "worst *vs 1x1*" in text  # the per-size summary


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    output.write_text(f"head\n{bench_event.START}\nold\n{bench_event.END}\ntail\n")
    bench_event.write_section(output, "new")
    assert output.read_text() == f"head\n{bench_event.START}\nnew\n{bench_event.END}\ntail\n"
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"], "no temporary file left behind"


@pytest.mark.parametrize("kind", bench_event.DISTRIBUTIONS)
def test_distributions_hold_what_their_names_say(kind: str) -> None:
    weights = torch.randn(64, 64)
    out = bench_event.distribute(weights, kind, seed=1)
    finite = out[out.isfinite()]
    if kind == "distinct":
        assert torch.equal(out, weights)
    elif kind.startswith("zeros"):
        share = int(kind[-2:]) / 100
        assert share - 0.1 < float((out == 0).float().mean()) < share + 0.1
    elif kind == "equal":
        assert out.unique().numel() == 1
    elif kind == "bf16x64":
        assert torch.equal(out, out.bfloat16().float())
        assert out.abs().unique().numel() <= 64
    else:
        assert out.isnan().any() and out.isposinf().any() and out.isneginf().any()
        assert finite.numel() > 0.99 * out.numel()


def test_baseline_swaps_in_the_old_code_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # The current revision as its own baseline: the swap must install other function objects, then
    # restore the originals exactly.
    select = bench_event.selection_module.select_groups
    methods = dict(vars(bench_event.NMPattern))
    swap = bench_event.load_baseline("HEAD")
    with swap():
        assert bench_event.selection_module.select_groups is not select
        assert vars(bench_event.NMPattern)["group_costs"] is not methods["group_costs"]
    assert bench_event.selection_module.select_groups is select
    assert dict(vars(bench_event.NMPattern)) == methods

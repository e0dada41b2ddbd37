"""Smoke tests of the benchmark scripts: they run and write their results; no timing is asserted."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    if str(BENCHMARKS) not in sys.path:  # as when run as a script: its siblings are importable
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.bench
def test_bench_overhead_quick_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # its trainers write the pruning report to the working folder
    bench = load_script("bench_overhead")
    output = tmp_path / "RESULTS.md"
    output.write_text("# Kept header\n\nother text\n")

    bench.main(["--quick", "--output", str(output)])
    bench.main(["--quick", "--output", str(output)])  # a second run replaces its section only

    text = output.read_text()
    assert text.startswith("# Kept header\n\nother text\n")
    assert text.count(bench.START_MARKER) == 1
    assert text.count(bench.END_MARKER) == 1
    section = text[text.index(bench.START_MARKER) : text.index(bench.END_MARKER)]
    for model in bench.QUICK_MODELS:
        for arm in bench.ARMS:
            assert f"| {model} | {arm} |" in section
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary file


def test_output_path_is_scratch_unless_write_results_or_output() -> None:
    results_file = load_script("results_file")
    parser = argparse.ArgumentParser()
    results_file.add_output_arguments(parser, "bench_x")
    scratch = BENCHMARKS.parent / "runs" / "benchmarks" / "bench_x" / "RESULTS.md"
    assert results_file.output_path(parser.parse_args([]), "bench_x") == scratch
    assert (
        results_file.output_path(parser.parse_args(["--write-results"]), "bench_x")
        == BENCHMARKS / "RESULTS.md"
    )
    chosen = parser.parse_args(["--write-results", "--output", "elsewhere.md"])
    assert results_file.output_path(chosen, "bench_x") == Path("elsewhere.md")


@pytest.mark.bench
def test_tracked_results_change_only_with_write_results(tmp_path: Path) -> None:
    """In a copy of benchmarks/: a plain run prints its section and writes the scratch copy only."""
    shutil.copytree(
        BENCHMARKS, tmp_path / "benchmarks", ignore=shutil.ignore_patterns(".venv*", "__pycache__")
    )
    results = tmp_path / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    command = [sys.executable, str(tmp_path / "benchmarks" / "bench_export.py"), "--quick", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    plain = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=True)
    scratch = tmp_path / "runs" / "benchmarks" / "bench_export" / "RESULTS.md"
    assert results.read_bytes() == before
    assert (
        "| FFN | slim 50% removed |" in plain.stdout and "| FFN | slim 50% removed |" in scratch.read_text()
    )

    subprocess.run(
        [*command, "--write-results"], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    text = results.read_text()
    assert (
        text != before.decode()
        and "Command: `python benchmarks/bench_export.py --quick --threads 1 --write-results" in text
    )

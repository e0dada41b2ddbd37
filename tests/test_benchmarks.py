"""Smoke tests of the benchmark scripts: they run and write their results; no timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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


def test_bench_overhead_quick_runs(tmp_path: Path) -> None:
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

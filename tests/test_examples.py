"""examples/digits.py (make demo): a line per arm as it finishes; the README figure only on request."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parent.parent
FIGURE = Path("docs") / "images" / "digits_mlp_4x1_curve.png"


def _digits(copy: Path, *args: str) -> list[str]:
    """Run a copy of the script, whose ROOT (its folder's parent) is then ``copy``."""
    done = subprocess.run(
        [sys.executable, str(copy / "examples" / "digits.py"), "--epochs", "1", "--models", "mlp", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Tip:" not in done.stdout + done.stderr
    return done.stdout.splitlines()


def test_progress_line_per_arm_before_the_table_and_no_figure_without_write_results(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    lines = _digits(tmp_path)
    arms = [
        re.match(r"\[(\d)/3\] mlp (\S+): sparsity ([\d.]+)%, val_acc ([\d.]+) \(", line) for line in lines
    ]
    found = [(m.group(1), m.group(2)) for m in arms if m]
    assert found == [("1", "dense"), ("2", "4x1"), ("3", "1x1")]
    table = next(i for i, line in enumerate(lines) if "digits, 1 epochs" in line)
    assert max(i for i, m in enumerate(arms) if m) < table, "progress comes before the table"
    assert not (tmp_path / FIGURE).exists()
    assert (tmp_path / "runs" / "digits" / "mlp-4x1-seed0" / "pruning" / "curve.png").is_file()


def test_write_results_draws_the_readme_figure(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    lines = _digits(tmp_path, "--write-results")
    assert f"figure: {FIGURE}" in lines
    image = imread(tmp_path / FIGURE)
    assert image.ndim == 3 and image.shape[1] > 500

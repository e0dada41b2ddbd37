"""The diagnostic behind the README's 1x1 note: our first global magnitude event picks exactly the
weights that ``torch.nn.utils.prune.global_unstructured`` (Lightning's ModelPruning) picks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_masks_modelpruning.py"


def test_first_event_keeps_the_same_weights_as_modelpruning() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "45"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line[:1].isdigit()]
    assert len(rows) >= 5
    _, kept_ours, kept_theirs, only_one = rows[0]
    assert kept_ours == kept_theirs and only_one == "0"  # same count and the very same weights
    assert all(r[1] == r[2] or abs(int(r[1]) - int(r[2])) <= 1 for r in rows)  # same counts throughout


def test_too_few_steps_is_refused() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "12"], capture_output=True, text=True)
    assert done.returncode == 2 and "--steps=12: needs >= 45" in done.stderr

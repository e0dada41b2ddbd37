"""A user's own LightningCLI script adds the callback the usual ways: YAML class_path and --trainer.callbacks+=."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

SCRIPT = str(Path(__file__).parent / "user_cli_script.py")
TRAINER = [
    "--trainer.max_epochs",
    "1",
    "--trainer.logger",
    "false",
    "--trainer.enable_checkpointing",
    "false",
]
TRAINER += ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]


def _report(args: list[str], cwd: Path) -> dict[str, object]:
    # Without a logger the report goes to the working folder (Lightning's default_root_dir): tmp_path.
    command = [sys.executable, SCRIPT, "fit", *TRAINER, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(line.removeprefix("REPORT "))


def test_callbacks_append_flag_with_init_args(tmp_path: Path) -> None:
    report = _report(
        [
            "--trainer.callbacks+=lightning_prune.PruningCallback",
            "--trainer.callbacks.target_sparsity=0.5",
            "--trainer.callbacks.pattern=2:4",
        ],
        tmp_path,
    )
    assert report["zeros"] == 0.5 and report["two_of_four"] is True


def test_yaml_class_path_with_a_criterion_object(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning_prune.PruningCallback
      init_args:
        target_sparsity: 0.5
        pattern: "2:4"
        criterion:
          class_path: lightning_prune.SnipMomentumCriterion
          init_args: {alpha: 0.9, beta: 1.0}
"""
    )
    report = _report(["--config", str(config)], tmp_path)
    assert report["zeros"] == 0.5 and report["two_of_four"] is True
    assert "SnipMomentumCriterion(alpha=0.9, beta=1.0" in str(report["criterion"])

"""The lightning-prune command: flags reach the callback, the config round-trips, help shows the docs;
the installed console script exits 0 and each run keeps its own report."""

from __future__ import annotations

import inspect
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lightning_prune import PruningCallback
from lightning_prune.cli import main, run

CONFIG = str(Path(__file__).parent.parent / "conf" / "cli" / "digits.yaml")
QUICK = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.enable_model_summary",
    "false",
]


def _pruning(cli: object) -> PruningCallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, PruningCallback)]  # type: ignore[attr-defined]
    return callback


@pytest.mark.slow
def test_fit_with_flags_prunes_to_the_asked_pattern(tmp_path: Path) -> None:
    flags = [
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--pruning.target_sparsity",
        "0.5",
        "--pruning.pattern",
        "2:4",
    ]
    cli = run(["fit", "--config", CONFIG, *QUICK, *flags])
    run_folder = tmp_path / "digits" / "version_0"
    assert (run_folder / "config.yaml").exists(), "LightningCLI saves the config in the run's folder"
    assert (run_folder / "pruning" / "curve.csv").exists(), "so does the callback its report"
    callback = _pruning(cli)
    assert str(callback.options.pattern) == "2:4" and callback.options.target_sparsity == 0.5
    for target in callback.pruner.targets:
        weight = target.param.detach()
        groups = (weight.view(weight.shape[0], -1, 4) == 0).sum(-1)
        assert (groups == 2).all(), target.name


@pytest.mark.subprocess
def test_print_config_feeds_back_unchanged(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "lightning_prune",
        "fit",
        "--config",
        CONFIG,
        "--pruning.pattern",
        "1xchannel",
    ]
    first = subprocess.run([*command, "--print_config"], capture_output=True, text=True, check=True).stdout
    saved = tmp_path / "config.yaml"
    saved.write_text(first)
    again = subprocess.run(
        [sys.executable, "-m", "lightning_prune", "fit", "--config", str(saved), "--print_config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert again == first
    assert "pattern: 1xchannel" in first and "target_sparsity: 0.9" in first


@pytest.mark.subprocess
def test_help_shows_every_pruning_argument_with_its_docstring() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_prune", "fit", "--help"], capture_output=True, text=True, check=True
    )
    for name in inspect.signature(PruningCallback).parameters:
        assert f"--pruning.{name}" in result.stdout, name
    text = " ".join(result.stdout.split())
    for phrase in (
        "final fraction of zeros among the targeted weights",
        "steps between events",
        "zero newly pruned groups gradually",
    ):
        assert phrase in text, phrase


def test_bad_flag_value_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((SystemExit, ValueError)) as error:
        run(
            [
                "fit",
                "--config",
                CONFIG,
                *QUICK,
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
                "--pruning.pattern",
                "5y3",
            ]
        )
    message = str(error.value) + capsys.readouterr().err
    assert "5y3" in message and "pattern" in message


def test_console_script_is_registered() -> None:
    import importlib.metadata

    (entry,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "lightning-prune"
    ]
    assert entry.load() is main


@pytest.mark.slow
def test_main_returns_nothing_for_the_console_script(tmp_path: Path) -> None:
    """The generated script does ``sys.exit(main())``: anything but None would be exit status 1."""
    assert (
        main(["fit", "--config", CONFIG, *QUICK, "--trainer.logger.init_args.save_dir", str(tmp_path)])
        is None
    )


@pytest.mark.subprocess
def test_installed_console_script_and_module_exit_0_with_a_report_per_run(tmp_path: Path) -> None:
    script = Path(sysconfig.get_path("scripts")) / "lightning-prune"
    assert script.is_file(), f"{script} is missing: `pip install -e .` (make install) creates it"
    quick = ["fit", "--config", CONFIG, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2"]
    for command in ([str(script)], [sys.executable, "-m", "lightning_prune"]):
        done = subprocess.run([*command, *quick], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr[-3000:]}"
        output = done.stdout + done.stderr
        assert "PruningCLI object" not in output, "main() returned the CLI object to sys.exit"
        assert "Sparsity by layer" in output, "the per-layer table of the run"
        assert "Tip:" not in output and "LeafSpec" not in output, "Lightning's adverts and warning are muted"
    # Each run has its own folder with its resolved config and report; nothing lands in the cwd itself.
    runs = sorted((tmp_path / "runs" / "cli" / "digits").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    for folder in runs:
        for name in ("config.yaml", "pruning/curve.csv", "pruning/curve.png", "pruning/layers.csv"):
            assert (folder / name).is_file(), folder / name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]

"""OmegaConf structured configs and the Hydra app: every preset composes, runs and reaches its sparsity."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_prune import PruningCallback, PruningConfig

ROOT = Path(__file__).parent.parent
APP = str(ROOT / "examples" / "hydra_train.py")
hydra = pytest.importorskip("hydra")


def test_structured_config_mirrors_the_callback_signature() -> None:
    signature = inspect.signature(PruningCallback)
    config_fields = {f.name: f for f in dataclasses.fields(PruningConfig)}
    assert list(config_fields) == list(signature.parameters)
    defaults = PruningConfig()
    for name, parameter in signature.parameters.items():
        value = getattr(defaults, name)
        assert value == parameter.default or (
            isinstance(value, list) and tuple(value) == parameter.default
        ), name


def test_from_config_accepts_dataclass_dict_and_dictconfig() -> None:
    for config in (
        PruningConfig(target_sparsity=0.5, pattern="2:4"),
        {"target_sparsity": 0.5, "pattern": "2:4"},
        OmegaConf.create({"target_sparsity": 0.5, "pattern": "2:4"}),
    ):
        callback = PruningCallback.from_config(config)
        assert str(callback.options.pattern) == "2:4" and callback.options.target_sparsity == 0.5


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown pruning config key\(s\) \['foo', 'patern'\]"):
        PruningCallback.from_config({"patern": "2:4", "foo": 1})


def test_wrong_types_are_named_by_omegaconf() -> None:
    with pytest.raises(ValueError, match=r"frequency='often'"):
        PruningCallback.from_config({"frequency": "often"})
    with pytest.raises(ValueError, match=r"start_step='x'"):
        PruningCallback.from_config({"start_step": "x"})


@pytest.mark.parametrize(
    ("preset", "pattern"),
    [
        ("magnitude_unstructured", "1x1"),
        ("snip_momentum_4x1", "4x1"),
        ("snip_momentum_2of4", "2:4"),
        ("channel_group_lasso", "channelx1"),
    ],
)
def test_every_preset_composes_into_a_callback(preset: str, pattern: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"pruning={preset}", "model=digits_cnn"])
    callback = PruningCallback.from_config(cfg.pruning)
    assert str(callback.options.pattern) == pattern
    assert cfg.model.arch == "cnn" and cfg.trainer.max_epochs > 0


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, APP, *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.subprocess
def test_single_run_reaches_the_asked_sparsity_and_pattern(tmp_path: Path) -> None:
    done = _run(
        [
            "pruning=snip_momentum_2of4",
            "pruning.target_sparsity=0.5",
            "trainer.max_epochs=3",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    (row,) = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    assert (row["pattern"], row["criterion"], float(row["sparsity"])) == ("2:4", "snip_momentum", 0.5)
    assert (tmp_path / "run" / "pruning" / "curve.csv").is_file(), "the report is in the run's folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing in the working directory"
    assert "Tip:" not in done.stdout + done.stderr, "Lightning's adverts are muted"


@pytest.mark.subprocess
def test_multirun_sweep_leaves_one_row_and_one_report_per_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _run(
        ["-m", "pruning.target_sparsity=0.5,0.8", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert sorted(float(r["target_sparsity"]) for r in rows) == [0.5, 0.8]
    for row in rows:
        assert float(row["sparsity"]) == pytest.approx(float(row["target_sparsity"]), abs=0.01)
    # Each job keeps its own report: the last no longer overwrites the others in ./pruning/.
    targets = {}
    for job in ("0", "1"):
        with (sweep / job / "pruning" / "curve.csv").open() as handle:
            targets[job] = max(float(r["target_sparsity"]) for r in csv.DictReader(handle))
    assert targets == {"0": 0.5, "1": 0.8}
    assert not (tmp_path / "pruning").exists()

"""Reporting: the history in the callback state, the files and figure at the end of fit, TensorBoard,
``sparsity_report`` and progress messages for long events."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import TinyModule, make_trainer, tiny_loader, zero_fraction
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.image import imread
from torch import nn
from torch.nn.utils import prune as torch_prune

import lightning_prune.pruner as pruner_module
from lightning_prune import PruningCallback, sparsity_report
from lightning_prune.demo import DigitsClassifier, DigitsDataModule

# A short digits run: 4 epochs of 6 batches, pruning 4x1 to 60% in steps 4..12, validating each epoch.
RUN = {"max_epochs": 4, "limit_train_batches": 6, "limit_val_batches": 2, "num_sanity_val_steps": 1}
PRUNING = {"target_sparsity": 0.6, "pattern": "4x1", "start_step": 2, "end_step": 12, "frequency": 2}


def digits_run(
    tmp_path: Path, loggers: list[Any] | bool = False, **pruning: Any
) -> tuple[PruningCallback, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    callback = PruningCallback(**{**PRUNING, **pruning})
    trainer = make_trainer([callback], logger=loggers, default_root_dir=tmp_path, **RUN)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    return callback, trainer


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow
def test_curve_csv_pairs_each_validation_with_the_sparsity_then(tmp_path: Path) -> None:
    callback, trainer = digits_run(tmp_path)
    columns, rows = read_csv(tmp_path / "pruning" / "curve.csv")
    # Default monitor: every metric logged in validation (val_loss, val_acc), not train_loss.
    assert columns[:5] == ["step", "epoch", "source", "sparsity", "target_sparsity"]
    assert sorted(columns[5:]) == ["val_acc", "val_loss"]
    assert callback.pruner is not None
    events = [r for r in rows if r["source"] == "event"]
    validations = [r for r in rows if r["source"] == "validation"]
    # The first event comes one frequency after start_step, where sparsity starts rising.
    assert [int(r["step"]) for r in events] == [e.step for e in callback.pruner.events] == [4, 6, 8, 10, 12]
    assert [float(r["target_sparsity"]) for r in events] == pytest.approx(
        [e.target_sparsity for e in callback.pruner.events]
    )
    # One row per epoch's validation (not the sanity check), at the step it ran.
    assert [int(r["step"]) for r in validations] == [6, 12, 18, 24]
    assert [int(r["epoch"]) for r in validations] == [0, 1, 2, 3]
    assert all(r["val_acc"] and r["val_loss"] for r in validations)
    assert not any(r["val_acc"] for r in events)
    # The last validation saw the final weights: its sparsity is what the weights hold.
    weights = [t.param.detach() for t in callback.pruner.targets]
    assert float(validations[-1]["sparsity"]) == pytest.approx(zero_fraction(weights))
    assert float(validations[-1]["val_acc"]) == pytest.approx(float(trainer.callback_metrics["val_acc"]))
    sparsities = [float(r["sparsity"]) for r in events]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.6, abs=0.02)


@pytest.mark.slow
def test_layers_csv_counts_zeros_of_every_layer(tmp_path: Path) -> None:
    _, trainer = digits_run(tmp_path)
    columns, rows = read_csv(tmp_path / "pruning" / "layers.csv")
    assert {"name", "shape", "pattern", "sparsity", "zeros", "numel"} <= set(columns)
    modules = trainer.lightning_module.named_modules()
    model_layers = {n: m for n, m in modules if isinstance(m, nn.Linear)}
    assert [r["name"] for r in rows] == list(model_layers)
    for row in rows:
        weight = model_layers[row["name"]].weight
        assert int(row["zeros"]) == int((weight == 0).sum())
        assert row["shape"] == "x".join(map(str, weight.shape))
    assert [r["pattern"] for r in rows] == ["4x1", "4x1", "dense: the head (skip_last_layer)"]


@pytest.mark.slow
def test_curve_png_is_a_real_image_of_the_documented_size(tmp_path: Path) -> None:
    digits_run(tmp_path)
    image = imread(tmp_path / "pruning" / "curve.png")
    height, width = image.shape[:2]
    # 11 x 3.5 inches per monitored metric (val_loss, val_acc) at 100 dpi.
    assert (width, height) == (1100, 700)
    pixels = image[..., :3].reshape(-1, 3)
    assert pixels.std() > 0.05  # not blank
    assert len(np.unique((pixels * 255).astype(np.uint8), axis=0)) > 50  # lines, text, colour map


@pytest.mark.slow
def test_monitor_selects_metrics_and_save_report_false_writes_nothing(tmp_path: Path) -> None:
    callback, _ = digits_run(tmp_path, monitor=["val_acc", "train_loss"], save_report=False)
    assert not (tmp_path / "pruning").exists()
    validations = [r for r in callback.history.rows if r["source"] == "validation"]
    assert validations and all(set(r["metrics"]) == {"val_acc", "train_loss"} for r in validations)


def test_unknown_monitor_warns_at_the_sanity_check_and_fails_at_the_first_validation() -> None:
    model = TinyModule()
    trainer = make_trainer(
        [PruningCallback(monitor="val_accuracy")], max_epochs=2, limit_val_batches=1, num_sanity_val_steps=1
    )
    match = r"monitor=\['val_accuracy'\].*not among the logged metrics.*val_acc"
    warning = r"\['val_accuracy'\] not logged in the sanity check"
    with pytest.warns(UserWarning, match=warning), pytest.raises(ValueError, match=match):
        trainer.fit(model, tiny_loader(), tiny_loader(seed=1))
    assert trainer.current_epoch == 0  # the first validation, not the end of fit


@pytest.mark.parametrize("monitor", [3, ["val_acc", 2], [""], {"a": 1}])
def test_bad_monitor_is_refused_at_construction(monitor: object) -> None:
    with pytest.raises(ValueError, match=r"monitor=.*must be a metric name"):
        PruningCallback(monitor=monitor)  # type: ignore[arg-type]


@pytest.mark.slow
def test_tensorboard_holds_the_scalars_and_the_figure(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    digits_run(tmp_path, loggers=[logger])
    files = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(files[0]), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = events.Tags()["scalars"]
    assert {"pruning/sparsity", "pruning/target_sparsity", "val_acc", "pruning/sparsity/net.1"} <= set(
        scalars
    )
    assert "pruning/curve" in events.Tags()["images"]
    (image,) = events.Images("pruning/curve")
    assert (image.width, image.height) == (1100, 700)
    sparsity = events.Scalars("pruning/sparsity")
    assert max(s.value for s in sparsity) == pytest.approx(0.6, abs=0.02)
    # Files go to the logger's own folder.
    assert (Path(logger.log_dir) / "pruning" / "curve.png").is_file()


@pytest.mark.slow
def test_csv_logger_gets_sparsity_at_events_and_validations(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    digits_run(tmp_path, loggers=[logger])
    _, rows = read_csv(Path(logger.log_dir) / "metrics.csv")
    steps = {int(r["step"]) for r in rows if r.get("pruning/sparsity")}
    assert {4, 6, 8, 10, 12, 18, 24} <= steps  # events and later validations


@pytest.mark.slow
def test_resume_keeps_the_earlier_history(tmp_path: Path) -> None:
    first = PruningCallback(**PRUNING)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(
        [first, checkpoint],
        enable_checkpointing=True,
        default_root_dir=tmp_path / "a",
        **{**RUN, "max_epochs": 2},
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    earlier = [dict(r) for r in first.history.rows]
    assert [r["source"] for r in earlier].count("validation") == 2

    second = PruningCallback(**PRUNING)
    resumed = make_trainer([second], default_root_dir=tmp_path / "b", **RUN)
    resumed.fit(DigitsClassifier(), DigitsDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.history.rows[: len(earlier)] == earlier
    later = second.history.rows[len(earlier) :]
    assert [r["step"] for r in later if r["source"] == "validation"] == [18, 24]
    _, rows = read_csv(tmp_path / "b" / "pruning" / "curve.csv")
    assert len(rows) == len(second.history.rows)


@pytest.mark.slow
def test_a_second_fit_without_a_checkpoint_starts_a_new_history(tmp_path: Path) -> None:
    callback = PruningCallback(**PRUNING)
    for _ in range(2):
        pl.seed_everything(0, verbose=False)
        trainer = make_trainer([callback], default_root_dir=tmp_path, **{**RUN, "max_epochs": 2})
        trainer.fit(DigitsClassifier(), DigitsDataModule())
    assert [r["step"] for r in callback.history.rows if r["source"] == "validation"] == [6, 12]


# --------------------------------------------------------------------------- sparsity_report
def test_sparsity_report_counts_zeros_of_a_model_pruned_elsewhere() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.25)  # weight = weight_orig * weight_mask
    report = sparsity_report(model)
    assert [layer.name for layer in report.layers] == ["0", "2"]
    assert report["0"].zeros == 32 and report["0"].sparsity == 0.25
    assert report["2"].zeros == 0
    assert report.numel == 8 * 16 + 16 * 4 and report.zeros == 32
    assert report.sparsity == pytest.approx(32 / 192)


def test_sparsity_report_finds_the_structure_of_the_zeros() -> None:
    conv = nn.Conv2d(8, 6, 3)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[1] = 0  # one whole filter
        conv.weight[:, 2] = 0  # one whole input channel
        conv.weight[:, 5] = 0
    linear = nn.Linear(8, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1, 0, 2, 0, 0, 0, 3, 4]] * 3, dtype=torch.float))
    report = sparsity_report(nn.ModuleDict({"conv": conv, "fc": linear}))
    assert report["conv"].zero_rows == 1 and report["conv"].zero_channels == 2
    assert report["conv"].zeros == 6 * 2 * 9 + 1 * 6 * 9
    assert report["fc"].is_2of4 and not report["conv"].is_2of4
    with torch.no_grad():
        linear.weight[0, 5] = 1.0  # three non-zeros in the second group of 4
    assert not sparsity_report(linear).layers[0].is_2of4
    assert not sparsity_report(nn.Linear(6, 2)).layers[0].is_2of4  # 6 inputs: no 2:4 tiling


def test_sparsity_report_counts_tied_weights_once_and_filters_op_types(tmp_path: Path) -> None:
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embed": embedding, "head": head, "conv": nn.Conv1d(4, 4, 1)})
    assert [layer.name for layer in sparsity_report(model).layers] == ["embed", "conv"]
    assert [layer.name for layer in sparsity_report(model, op_types=["Linear"]).layers] == ["head"]
    with pytest.raises(ValueError, match=r"op_types='Linear' must be a list"):
        sparsity_report(model, op_types="Linear")
    with pytest.raises(KeyError, match="no layer 'nope'"):
        sparsity_report(model)["nope"]
    report = sparsity_report(model)
    assert "embed" in str(report) and "total" in str(report)
    report.to_csv(str(tmp_path / "layers.csv"))
    columns, rows = read_csv(tmp_path / "layers.csv")
    assert [r["name"] for r in rows] == ["embed", "conv"] and "is_2of4" in columns
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_sparsity_report_of_an_empty_model_is_zero() -> None:
    report = sparsity_report(nn.ReLU())
    assert report.layers == () and report.sparsity == 0.0


# --------------------------------------------------------------------------- progress messages
@pytest.mark.slow
def test_long_events_report_progress_through_rank_zero_info(
    monkeypatch: pytest.MonkeyPatch, messages: list[str]
) -> None:
    pruning = PruningCallback(target_sparsity=0.5, pattern="1x1", start_step=1, end_step=1, verbose=False)
    make_trainer([pruning], max_steps=2).fit(TinyModule(), tiny_loader())
    assert not [m for m in messages if "event at step" in m]  # a small model says nothing
    monkeypatch.setattr(pruner_module, "PROGRESS_MIN_WEIGHTS", 1)
    pruning = PruningCallback(target_sparsity=0.5, pattern="1x1", start_step=1, end_step=1, verbose=False)
    make_trainer([pruning], max_steps=2).fit(TinyModule(), tiny_loader())
    progress = [m.split("event at step 1")[1] for m in messages if "event at step 1" in m]
    assert [p.lstrip(": ").split()[0] for p in progress] == ["scoring", "selecting", "building", "done"]


def test_verbose_prints_the_layer_table_at_the_end(messages: list[str]) -> None:
    pruning = PruningCallback(target_sparsity=0.5, pattern="1x1", start_step=1, end_step=1)
    make_trainer([pruning], max_steps=2).fit(TinyModule(), tiny_loader())
    table = next(m for m in messages if "Sparsity by layer" in m)
    assert "net.0" in table and "net.4" in table and "dense: the head" in table
    assert any("wrote curve.csv, curve.png and layers.csv" in m for m in messages)

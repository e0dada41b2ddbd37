"""The private Lightning API lightning_prune relies on (lightning_internals.py), checked against the
installed Lightning: a release that changes it fails here, by name."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
from helpers import TinyModule, make_trainer, tiny_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_prune.lightning_internals import logging_muted, train_dataloader, validation_metric_names


class LogsDuringTraining(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("train_only", 1.0)
        return super().training_step(batch, batch_idx)


def test_validation_metric_names_are_those_logged_in_validation() -> None:
    seen: list[list[str]] = []

    class Spy(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                seen.append(validation_metric_names(trainer))

    trainer = make_trainer([Spy()], max_epochs=1, limit_val_batches=1)
    trainer.fit(LogsDuringTraining(), tiny_loader(), tiny_loader(seed=1))
    assert "train_only" in trainer.callback_metrics
    assert seen == [["val_acc"]]


def test_logging_is_muted_inside_and_restored_after() -> None:
    module = TinyModule()
    module.trainer = make_trainer([], max_steps=1)
    with pytest.raises(MisconfigurationException):
        module.log("x", 1.0)  # a trainer, but outside its loops: Lightning refuses
    with logging_muted(module):
        module.log("x", 1.0)
        module.log_dict({"x": 1.0})
    with pytest.raises(MisconfigurationException):
        module.log("x", 1.0)


def test_train_dataloader_is_set_up_on_demand() -> None:
    trainer = make_trainer([], max_steps=1)
    module = TinyModule()
    loader = tiny_loader()
    trainer.strategy.connect(module)
    trainer._data_connector.attach_data(module, train_dataloaders=loader)
    assert trainer.train_dataloader is None
    assert train_dataloader(trainer) is not None

"""Code shared by the tests: a small deterministic model and data for Lightning runs on CPU."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruningCallback


class Messages(logging.Handler):
    """Collects what Lightning's own loggers emit (they do not propagate to the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


class TinyModule(pl.LightningModule):
    """An MLP 16 -> 32 -> 32 -> 4 on fixed random data, Adam, no dropout: runs are reproducible."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def tiny_loader(batches: int = 10, batch_size: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 16, generator=generator)
    y = torch.randint(0, 4, (batches * batch_size,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_trainer(callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "deterministic": True,
        # The callback writes its report under log_dir at the end of fit: keep it out of the checkout.
        "default_root_dir": tempfile.mkdtemp(prefix="lightning-prune-test-"),
    }
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


def zero_fraction(weights: list[Tensor]) -> float:
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def pruned_weights(callback: PruningCallback) -> list[Tensor]:
    assert callback.pruner is not None
    return [t.param.detach() for t in callback.pruner.targets]

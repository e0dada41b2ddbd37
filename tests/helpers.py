"""Code shared by the tests: a small deterministic model and data for Lightning runs on CPU."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
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


#: Where trainers write (the end-of-fit report), set by conftest.py: the running test's ``tmp_path``,
#: or a folder of the session's for module- and session-scoped fixtures.
TRAINER_ROOT: Path | None = None


def trainer_root() -> str:
    """A new folder of its own under TRAINER_ROOT, for one trainer's output."""
    assert TRAINER_ROOT is not None, "set by the autouse fixtures in conftest.py"
    return tempfile.mkdtemp(prefix="trainer-", dir=TRAINER_ROOT)


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
        # The callback writes its report under log_dir at the end of fit: in the test's tmp_path.
        "default_root_dir": trainer_root(),
    }
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


def zero_fraction(weights: list[Tensor]) -> float:
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def pruned_weights(callback: PruningCallback) -> list[Tensor]:
    assert callback.pruner is not None
    return [t.param.detach() for t in callback.pruner.targets]


#: The resume tests' schedule: with 10 batches an epoch, events at steps 5, 10, ..., 30.
SCHEDULE: dict[str, Any] = {
    "target_sparsity": 0.8,
    "pattern": "4x1",
    "start_step": 0,
    "end_step": 30,
    "frequency": 5,
}


def fit_resumable(
    folder: Path,
    max_epochs: int,
    ckpt_path: str | Path | None = None,
    callbacks: list[Any] | None = None,
    model: pl.LightningModule | None = None,
    **settings: Any,
) -> tuple[pl.LightningModule, PruningCallback | None, pl.Trainer]:
    """One seeded fit of TinyModule (or ``model``) on 10 batches per epoch, resumed from ``ckpt_path``.

    The PruningCallback takes SCHEDULE updated by ``settings`` (none with ``dense=True``); a checkpoint
    after every epoch is saved as ``folder/epoch=N.ckpt``. Runs with the same arguments are identical.
    """
    pl.seed_everything(0)
    model = model or TinyModule()
    pruning = None if settings.get("dense") else PruningCallback(**{**SCHEDULE, **settings}, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = make_trainer(
        [c for c in (pruning, checkpoints, *(callbacks or [])) if c is not None],
        max_epochs=max_epochs,
        enable_checkpointing=True,
    )
    trainer.fit(model, tiny_loader(batches=10), ckpt_path=ckpt_path)
    return model, pruning, trainer


def pruning_state(checkpoint: Path) -> dict[str, Any]:
    """The PruningCallback's state saved in a Lightning checkpoint."""
    saved = torch.load(checkpoint, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("PruningCallback")]
    return state

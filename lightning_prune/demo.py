"""A model and data on scikit-learn's bundled digits, so examples, tests and the CLI need no download.

Like ``lightning.pytorch.demos``: import it, not part of the pruning API. Needs ``scikit-learn``
(``pip install -e ".[demo]"`` in the clone; lightning_prune is not on PyPI).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ARCHITECTURES = ("mlp", "cnn")


class DigitsDataModule(pl.LightningDataModule):
    """The 1,797 8x8 digit images of ``sklearn.datasets.load_digits``, split 80/20 with a fixed seed.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the images held out for validation.
        seed: seed of the split.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(labels) * self.val_fraction)
        val, train = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        assert self.train_set is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=256)


def build_network(arch: str = "mlp", width: int = 256) -> nn.Module:
    """An MLP (64 -> width -> width -> 10) or a small CNN for 1x8x8 digit images."""
    if arch == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    raise ValueError(f"arch={arch!r} is not one of {list(ARCHITECTURES)}")


class DigitsClassifier(pl.LightningModule):
    """Classifies digits; logs ``train_loss``, ``val_loss`` and ``val_acc``.

    Args:
        arch: ``"mlp"`` or ``"cnn"``.
        width: hidden width of the MLP.
        lr: Adam learning rate.
    """

    def __init__(self, arch: str = "mlp", width: int = 256, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(arch, width)
        self.lr = lr
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

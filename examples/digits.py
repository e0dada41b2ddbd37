"""Dense vs pruned on scikit-learn's bundled digits: an MLP and a small CNN at 90% sparsity.

Run ``make demo`` (or ``python examples/digits.py``). Every arm uses the same seed, data order,
optimizer and number of steps; the pruned arms prune during the first 9/10 of training with the
callback's defaults and fine-tune in the last tenth.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table

from lightning_prune import PruningCallback
from lightning_prune.demo import DigitsClassifier, DigitsDataModule
from lightning_prune.files import write_atomically

ARMS: list[tuple[str, str | None]] = [("dense", None), ("4x1", "4x1"), ("1x1", "1x1")]
ROOT = Path(__file__).resolve().parent.parent
#: Each arm's trainer folder; the callback writes its report under ``<run>/pruning/``.
RUNS = ROOT / "runs" / "digits"
#: The README's figure: the curve of the MLP's 4x1 arm, copied here by ``make demo``.
README_FIGURE = ROOT / "docs" / "images" / "digits_mlp_4x1_curve.png"


def run_arm(arch: str, pruning: dict[str, Any] | None, epochs: int, seed: int) -> dict[str, Any]:
    """Train one arm and return its row: sparsity over the pruned layers and validation accuracy.

    The pruned arms leave ``curve.csv``, ``curve.png`` and ``layers.csv`` in
    ``runs/digits/<model>-<pattern>-seed<seed>/pruning/``.

    Args:
        arch: ``"mlp"`` or ``"cnn"``.
        pruning: ``PruningCallback`` arguments, or ``None`` for the dense arm.
        epochs: training epochs.
        seed: seed of the initialisation, the split and the data order.
    """
    pl.seed_everything(seed, verbose=False)
    model = DigitsClassifier(arch=arch)
    callbacks = [] if pruning is None else [PruningCallback(**pruning, verbose=False)]
    pattern = "dense" if pruning is None else str(pruning.get("pattern", "4x1"))
    trainer = pl.Trainer(
        default_root_dir=RUNS / f"{arch}-{pattern.replace(':', 'of')}-seed{seed}",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    started = time.perf_counter()
    trainer.fit(model, DigitsDataModule(seed=seed))
    seconds = time.perf_counter() - started
    if pruning is None:
        achieved = 0.0
    else:
        pruner = callbacks[0].pruner
        weights = [t.param for t in pruner.targets]
        achieved = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {
        "model": arch,
        "pattern": pattern,
        "sparsity": achieved,
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "seconds": seconds,
    }


def quiet_lightning() -> None:
    """Keep tables readable: Lightning's info lines and an internal deprecation warning off."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument(
        "--figure",
        default=str(README_FIGURE.relative_to(ROOT)),
        help="where to copy the MLP 4x1 arm's curve.png (relative to the repository); '' for nowhere",
    )
    args = parser.parse_args()

    quiet_lightning()
    rows = [
        run_arm(
            arch,
            None if pattern is None else {"target_sparsity": args.sparsity, "pattern": pattern},
            args.epochs,
            args.seed,
        )
        for arch in args.models
        for _, pattern in ARMS
    ]
    table = Table(title=f"digits, {args.epochs} epochs, target sparsity {args.sparsity:.0%}")
    for column in ("model", "pattern", "sparsity", "val_acc", "of dense", "fit s"):
        table.add_column(column, justify="left" if column in ("model", "pattern") else "right")
    dense = {row["model"]: row["val_acc"] for row in rows if row["pattern"] == "dense"}
    for row in rows:
        table.add_row(
            str(row["model"]),
            str(row["pattern"]),
            f"{row['sparsity']:.1%}",
            f"{row['val_acc']:.4f}",
            f"{row['val_acc'] / dense[row['model']]:.1%}",
            f"{row['seconds']:.1f}",
        )
    Console().print(table)
    curve = RUNS / f"mlp-4x1-seed{args.seed}" / "pruning" / "curve.png"
    if args.figure and "mlp" in args.models and curve.is_file():
        write_atomically(ROOT / args.figure, curve.read_bytes())
        print(f"figure: {args.figure} (from {curve.relative_to(ROOT)})")


if __name__ == "__main__":
    main()

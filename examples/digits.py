"""Dense vs pruned on scikit-learn's bundled digits: an MLP and a small CNN at 90% sparsity.

Run ``make demo`` (or ``python examples/digits.py``). Every arm uses the same seed, data order,
optimizer and number of steps; the pruned arms prune during the first 9/10 of training with the
callback's defaults and fine-tune in the last tenth. A line per arm is printed as it finishes, then
the table. Each arm's report lands in ``runs/digits/<model>-<pattern>-seed<seed>/pruning/``; the
README's figure (``docs/images/``) is redrawn only with ``--write-results``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table

from lightning_prune import PruningCallback
from lightning_prune.demo import DigitsClassifier, DigitsDataModule
from lightning_prune.files import write_atomically
from lightning_prune.plots import curve_figure, figure_png
from lightning_prune.quiet import mute_lightning_noise

ARMS: list[tuple[str, str | None]] = [("dense", None), ("4x1", "4x1"), ("1x1", "1x1")]
ROOT = Path(__file__).resolve().parent.parent
#: Each arm's trainer folder; the callback writes its report under ``<run>/pruning/``.
RUNS = ROOT / "runs" / "digits"
#: The README's figure: the curve of the MLP's 4x1 arm, drawn here with ``--write-results``.
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
        "history": None if pruning is None else callbacks[0].history,
    }


def quiet_lightning() -> None:
    """Keep tables readable: Lightning's info lines, its adverts and an internal deprecation warning off."""
    mute_lightning_noise()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def arm_line(index: int, total: int, row: dict[str, Any]) -> str:
    """The progress line printed when an arm finishes."""
    return (
        f"[{index}/{total}] {row['model']} {row['pattern']}: sparsity {row['sparsity']:.1%}, "
        f"val_acc {row['val_acc']:.4f} ({row['seconds']:.1f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument(
        "--write-results",
        action="store_true",
        help=f"redraw the README's figure, {README_FIGURE.relative_to(ROOT)}, from the MLP 4x1 arm",
    )
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs={args.epochs} must be >= 1")
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity={args.sparsity} must be in (0, 1)")
    if args.write_results and "mlp" not in args.models:
        parser.error(f"--write-results draws the MLP's figure: --models {' '.join(args.models)} has no mlp")

    quiet_lightning()
    plan = [(arch, pattern) for arch in args.models for _, pattern in ARMS]
    print(
        f"digits: {len(plan)} arms ({', '.join(args.models)} x dense/4x1/1x1), {args.epochs} epochs each; "
        "a line per arm as it finishes",
        flush=True,
    )
    rows = []
    for index, (arch, pattern) in enumerate(plan, start=1):
        pruning = None if pattern is None else {"target_sparsity": args.sparsity, "pattern": pattern}
        rows.append(run_arm(arch, pruning, args.epochs, args.seed))
        print(arm_line(index, len(plan), rows[-1]), flush=True)
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
    print(
        f"reports (curve.csv, curve.png, layers.csv): {RUNS.relative_to(ROOT)}/<model>-<pattern>-seed{args.seed}/pruning/"
    )
    if args.write_results:
        (mlp_4x1,) = [r for r in rows if (r["model"], r["pattern"]) == ("mlp", "4x1")]
        title = f"digits MLP (64-256-256-10), {args.sparsity:.0%} in 4x1 blocks, magnitude, seed {args.seed}"
        write_atomically(README_FIGURE, figure_png(curve_figure(mlp_4x1["history"], title=title)))
        print(f"figure: {README_FIGURE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

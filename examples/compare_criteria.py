"""Every criterion at 90% ``4x1`` and at ``2:4`` on scikit-learn's digits, medians over seeds.

Run ``python examples/compare_criteria.py`` (about 5 minutes on 2 CPU cores with the defaults; a
line per arm as it finishes, then the table).
All arms share the seed, the split, the data order, the optimizer and the number of steps; each
prunes with the callback's default window (first 9/10 of training) and curve.
"""

from __future__ import annotations

import argparse
import statistics

from digits import arm_line, quiet_lightning, run_arm
from rich.console import Console
from rich.table import Table

from lightning_prune.criteria import CRITERIA

SETTINGS = {
    "4x1": {"pattern": "4x1", "target_sparsity": 0.9},
    "2:4": {"pattern": "2:4", "target_sparsity": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    # Wanda and SparseGPT prune a trained model once from calibration data: benchmarks/bench_calibration.py.
    trained_while_pruning = [name for name in sorted(CRITERIA) if not CRITERIA[name].calibrates]
    parser.add_argument("--criteria", nargs="+", default=trained_while_pruning, choices=trained_while_pruning)
    args = parser.parse_args()
    quiet_lightning()

    table = Table(title=f"digits, {args.epochs} epochs, median val_acc over seeds {args.seeds}")
    for column in (
        "model",
        "criterion",
        *(f"{name} acc" for name in SETTINGS),
        *(f"{n} of dense" for n in SETTINGS),
    ):
        table.add_column(column, justify="left" if column in ("model", "criterion") else "right")
    total = len(args.models) * len(args.seeds) * (1 + len(args.criteria) * len(SETTINGS))
    done = 0

    def val_acc(arch: str, pruning: dict[str, object] | None, seed: int) -> float:
        nonlocal done
        row = run_arm(arch, pruning, args.epochs, seed)
        done += 1
        criterion = "" if pruning is None else f" {pruning['criterion']}"
        print(arm_line(done, total, row) + f"{criterion} seed {seed}", flush=True)
        return float(row["val_acc"])

    print(f"compare_criteria: {total} arms, {args.epochs} epochs each", flush=True)
    for arch in args.models:
        dense = statistics.median(val_acc(arch, None, seed) for seed in args.seeds)
        table.add_row(arch, "dense", *[f"{dense:.4f}"] * len(SETTINGS), *["100.0%"] * len(SETTINGS))
        for criterion in args.criteria:
            accs = [
                statistics.median(
                    val_acc(arch, {**setting, "criterion": criterion}, seed) for seed in args.seeds
                )
                for setting in SETTINGS.values()
            ]
            table.add_row(arch, criterion, *(f"{a:.4f}" for a in accs), *(f"{a / dense:.1%}" for a in accs))
    Console().print(table)


if __name__ == "__main__":
    main()

"""Prune the digits model from a Hydra config tree (``conf/``); each run appends one row to results.csv.

    python examples/hydra_train.py pruning=snip_momentum_2of4 pruning.target_sparsity=0.5 trainer.max_epochs=3
    python examples/hydra_train.py -m pruning.target_sparsity=0.5,0.8,0.9

A single run writes ``results.csv`` in its output directory; a multirun sweep writes one row per run
to ``results.csv`` in the sweep directory. Each run's pruning report (``pruning/curve.csv``,
``curve.png``, ``layers.csv``) lands in that run's own output directory (``trainer.default_root_dir``
in ``conf/trainer/default.yaml``). Needs hydra-core: ``pip install -e ".[hydra]"`` in the clone.
"""

from __future__ import annotations

import csv
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lightning_prune import PruningCallback
from lightning_prune.demo import DigitsClassifier, DigitsDataModule
from lightning_prune.quiet import mute_lightning_noise

FIELDS = ["pattern", "criterion", "target_sparsity", "sparsity", "val_acc", "overrides"]


def results_file() -> Path:
    hydra_config = HydraConfig.get()
    folder = (
        hydra_config.sweep.dir if hydra_config.mode == RunMode.MULTIRUN else hydra_config.runtime.output_dir
    )
    return Path(folder) / "results.csv"


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train, prune and append this run's row; returns the validation accuracy (for sweepers)."""
    mute_lightning_noise()
    pl.seed_everything(cfg.seed, verbose=False)
    pruning = PruningCallback.from_config(cfg.pruning)
    # resolve=True: default_root_dir interpolates the run's Hydra output directory.
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = pl.Trainer(callbacks=[pruning], **trainer_args)  # type: ignore[arg-type]
    trainer.fit(DigitsClassifier(**cfg.model), DigitsDataModule(seed=cfg.seed, **cfg.data))
    assert pruning.pruner is not None
    weights = [t.param.detach() for t in pruning.pruner.targets]
    row = {
        "pattern": str(pruning.options.pattern),
        "criterion": pruning.options.criterion.name,
        "target_sparsity": pruning.options.target_sparsity,
        "sparsity": round(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights), 4),
        "val_acc": round(float(trainer.callback_metrics["val_acc"]), 4),
        "overrides": " ".join(HydraConfig.get().overrides.task),
    }
    path = results_file()
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(row)
    return row["val_acc"]


if __name__ == "__main__":
    main()

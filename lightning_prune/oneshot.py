"""One-shot pruning from calibration data with Lightning: the callback's event before the first
step, and :func:`prune_lightning_module` for a trained LightningModule without any training.

Both run the calibration batches through the module's own ``training_step`` (``self.log`` muted,
no gradients, eval mode) and hand over to :func:`lightning_prune.calibration.calibrate_and_prune`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from lightning_prune.calibration import calibrate_and_prune, calibration_count, prune_once, take_batches
from lightning_prune.criteria import Criterion
from lightning_prune.lightning_internals import logging_muted, train_dataloader
from lightning_prune.options import PruningOptions
from lightning_prune.pruner import Pruner


def check_one_shot(criterion: Criterion, start_step: object, end_step: object) -> None:
    """Refuse a criterion that prunes from calibration data (Wanda, SparseGPT) on a schedule other
    than one-shot at step 0: the callback calibrates only before the first step.

    Raises:
        ValueError: naming the criterion, the steps given and the ones accepted.
    """
    calibrates = criterion.calibrates
    if calibrates and (start_step not in (None, 0) or end_step != 0):
        raise ValueError(
            f"criterion {criterion.name!r} prunes once, before training, from calibration batches: set "
            f"start_step=0 and end_step=0 (got start_step={start_step!r}, end_step={end_step!r}); "
            "fine-tuning follows with the masks held"
        )


def prune_from_calibration(
    trainer: pl.Trainer, pl_module: pl.LightningModule, pruner: Pruner, count: int | None, data: Any
) -> None:
    """The callback's event due before the fit's first step, for a criterion that calibrates.

    Takes ``count`` batches (``None``: the criterion's ``init_batches``) from ``data``, or from the
    fit's training loader when ``data`` is ``None``, runs them through
    ``trainer.strategy.training_step`` (so precision and DDP apply as in training) and prunes.
    Under DDP each rank calibrates on its own batches; the statistics are summed over the ranks.

    Raises:
        ValueError: under manual optimization, whose ``training_step`` steps optimizers itself.
    """
    criterion = pruner.options.criterion
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"criterion {criterion.name!r} with an event due at step {pruner.step}, before this fit's first "
            "step, calibrates through training_step, which needs automatic optimization; with manual "
            "optimization prune the trained model with prune_lightning_module(...) before fit instead"
        )
    loader = train_dataloader(trainer) if data is None else data
    batches = [
        batch for batch, _, _ in take_batches(CombinedLoader(loader), calibration_count(pruner, count))
    ]
    strategy = trainer.strategy

    def run(index: int, batch: Any) -> Any:
        return strategy.training_step(strategy.batch_to_device(batch), index)

    with logging_muted(pl_module):
        calibrate_and_prune(pruner, batches, run, model=pl_module)


def prune_lightning_module(
    pl_module: pl.LightningModule,
    data: pl.LightningDataModule | Iterable[Any] | None,
    options: PruningOptions | None = None,
    *,
    calibration_batches: int | None = None,
    **kwargs: Any,
) -> Pruner:
    """Prune a trained LightningModule once, now, from calibration batches: no Trainer, no training.

    The batches go through the module's ``training_step`` on its device (``self.log`` muted, no
    gradients, eval mode). Under DDP (``torch.distributed`` initialized, every rank calling this
    on its own batches) the statistics are summed over the ranks and rank 0's masks kept.

    Args:
        pl_module: the trained module; pruned in place.
        data: a LightningDataModule (its ``train_dataloader()``, after ``setup("fit")``), a
            DataLoader or any iterable of batches; ``None`` for a criterion that needs none.
        options: what to prune and how; or :class:`PruningOptions`' arguments as keywords.
        calibration_batches: how many batches to use (``None``: the criterion's ``init_batches``).
        **kwargs: :class:`PruningOptions` arguments, when ``options`` is not given.

    Returns:
        The :class:`Pruner` with the masks. To fine-tune with them held, pass
        ``PruningCallback(criterion=..., start_step=0, end_step=0, ...)`` to a Trainer instead, or
        attach this Pruner to your optimizer in a plain loop.
    """
    batches: Iterable[Any] | None
    if isinstance(data, pl.LightningDataModule):
        data.setup("fit")
        batches = data.train_dataloader()
    else:
        batches = data

    def forward(module: Any, batch: Any) -> Any:
        return pl_module.training_step(pl_module.transfer_batch_to_device(batch, pl_module.device, 0), 0)

    with logging_muted(pl_module):
        return prune_once(
            pl_module, batches, options, calibration_batches=calibration_batches, forward=forward, **kwargs
        )

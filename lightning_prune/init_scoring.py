"""Scoring before a fit's first step, for a gradient criterion with an event due there.

That is an event at step 0 (SNIP at initialization), or the catch-up event of a run resumed from a
checkpoint without pruning state past the schedule's start.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from lightning_prune.lightning_internals import logging_muted, train_dataloader
from lightning_prune.pruner import Pruner


def score_at_init(trainer: pl.Trainer, pl_module: pl.LightningModule, pruner: Pruner) -> None:
    """Feed the criterion its ``init_batches`` first training batches before the fit's first step.

    A gradient criterion gets their gradients (forward and backward, no optimizer step); an activation
    criterion sees the layer inputs of a forward pass inside :meth:`Pruner.calibrating`, without
    gradients. The batches go through ``trainer.strategy.training_step``, so precision and DDP apply as
    in training, and gradients are zeroed afterwards.

    Raises:
        ValueError: under manual optimization, whose ``training_step`` steps optimizers itself.
    """
    criterion = pruner.options.criterion
    batches = int(getattr(criterion, "init_batches", 1))
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"criterion {criterion.name!r} with an event due at step {pruner.step}, before this fit's first "
            "step, scores on training batches first, which needs automatic optimization; with manual "
            "optimization start pruning after the fit's first step (start_step >= 1, or resume from a "
            "checkpoint with pruning state)"
        )
    iterator = iter(CombinedLoader(train_dataloader(trainer), mode="max_size_cycle"))
    backward = criterion.needs_gradients
    pl_module.zero_grad(set_to_none=True)
    with logging_muted(pl_module), pruner.calibrating(), torch.set_grad_enabled(backward):
        for index in range(batches):
            try:
                batch, _, _ = next(iterator)
            except StopIteration:
                raise ValueError(
                    f"init_batches={batches} is more than the {index} training batches there are"
                ) from None
            batch = trainer.strategy.batch_to_device(batch)
            output = trainer.strategy.training_step(batch, index)
            loss = output["loss"] if isinstance(output, Mapping) else output
            if not backward or not isinstance(loss, torch.Tensor):
                continue
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward has no annotations
            pruner.accumulate_scores()
            pl_module.zero_grad(set_to_none=True)

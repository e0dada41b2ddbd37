"""Every use of Lightning's private API, in one place, each with why no public one serves.

``tests/test_lightning_internals.py`` exercises each against the installed Lightning, so a Lightning
release that changes them fails that test by name instead of failing a user's run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl


def validation_metric_names(trainer: pl.Trainer) -> list[str]:
    """Names the model logged in the validation run that just ended, as ``callback_metrics`` keys.

    Lightning keeps no public list of which metrics came from validation; the running loop's result
    collection (``trainer._results``) has it.
    """
    results = trainer._results
    names = dict.fromkeys(result.meta.name for result in (results.values() if results is not None else []))
    return [name for name in names if name in trainer.callback_metrics]


@contextmanager
def logging_muted(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside: Lightning refuses them outside its loops,
    and a ``training_step`` run to score batches before training (SNIP at init) calls them."""

    def muted(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log, pl_module.log_dict = muted, muted  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def train_dataloader(trainer: pl.Trainer) -> Any:
    """The fit's training data loader, set up now if Lightning has not yet (it does so lazily; its own
    ``estimated_stepping_batches`` calls the same private ``fit_loop.setup_data``)."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    return trainer.train_dataloader

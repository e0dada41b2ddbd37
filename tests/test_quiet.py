"""mute_lightning_noise drops Lightning's adverts and the LeafSpec warning, and nothing else."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core import rank_zero
from torch.utils._pytree import LeafSpec

from lightning_prune.quiet import mute_lightning_noise


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_tips_are_dropped_other_info_is_kept() -> None:
    mute_lightning_noise()
    mute_lightning_noise()  # idempotent: one filter, not two
    logger = rank_zero.log  # the logger rank_zero_info writes through (Lightning rebinds it at import)
    collect, level = _Collect(), logger.level
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)  # the suite's conftest raises Lightning's loggers to WARNING
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        rank_zero_info("GPU available: False, used: False")
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    assert collect.messages == ["GPU available: False, used: False"]


def test_leafspec_deprecation_is_muted_other_warnings_are_not() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mute_lightning_noise()  # its filter goes in front of "always"
        LeafSpec()
        warnings.warn("kept", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["kept"]

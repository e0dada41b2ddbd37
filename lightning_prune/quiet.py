"""Mute two messages that every Lightning run prints and that say nothing about the run.

Used by the command line, the examples and the benchmarks; a user's own script calls
:func:`mute_lightning_noise` if it wants the same. Everything else Lightning says is kept.
"""

from __future__ import annotations

import logging
import warnings

#: Lightning's adverts for its cloud products ("💡 Tip: ... try installing [litlogger] ...").
TIP_PREFIX = "💡 Tip:"
#: torch's FutureWarning about ``LeafSpec``, raised from Lightning's own ``_pytree`` helper.
LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
#: Loggers that Lightning's ``rank_zero_info`` writes through (it rebinds one of them at import).
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


_FILTER = _DropTips()


def mute_lightning_noise() -> None:
    """Drop Lightning's "Tip" adverts and the ``LeafSpec`` deprecation warning; idempotent.

    A filter on the emitting loggers (not on handlers) also holds when Hydra or the user configures
    the root logger.
    """
    loggers = [logging.getLogger(name) for name in RANK_ZERO_LOGGERS]
    try:  # the logger rank_zero_info really uses, whatever name it was given
        from lightning_utilities.core import rank_zero

        loggers.append(rank_zero.log)
    except ImportError:  # pragma: no cover - lightning always brings lightning_utilities
        pass
    for logger in loggers:
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=LEAFSPEC_MESSAGE, category=FutureWarning)

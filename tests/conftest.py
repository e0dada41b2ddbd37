"""Fixtures shared by the tests; shared code (models, data, trainers) is in helpers.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from helpers import Messages


@pytest.fixture(autouse=True)
def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture
def messages() -> Any:
    """The texts of every ``rank_zero_info``/``rank_zero_warn`` message while the test runs."""
    handler = Messages()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler.texts
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)

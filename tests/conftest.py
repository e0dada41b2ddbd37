"""Fixtures shared by the tests; shared code (models, data, trainers) is in helpers.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import helpers
import pytest
from helpers import Messages
from torch._inductor import config as inductor_config


@pytest.fixture(autouse=True)
def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture(scope="session", autouse=True)
def _session_folders(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Under the session's temporary folder: what trainers in module-scoped fixtures write, and
    torch.compile's cache, which is otherwise kept in /tmp/torchinductor_<user> (150 MB of it a
    precompiled header that ignores the cache setting: not made, here or in child processes)."""
    with pytest.MonkeyPatch.context() as patch, inductor_config.patch(cpp_cache_precompile_headers=False):
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torchinductor")))
        patch.setenv("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")
        patch.setattr(helpers, "TRAINER_ROOT", tmp_path_factory.mktemp("trainers"))
        yield


@pytest.fixture(autouse=True)
def _trainer_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainers made by helpers.make_trainer write under this test's tmp_path, removed once it passes."""
    monkeypatch.setattr(helpers, "TRAINER_ROOT", tmp_path)


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

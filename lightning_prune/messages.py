"""Messages from the engine: said once, by the process of rank 0.

The one place the engine reaches for Lightning: its rank-zero helpers, so that messages appear where
Lightning users already look (its logger's handler, ``warnings``) and a DDP run says each thing once.
"""

from __future__ import annotations

from lightning.fabric.utilities import rank_zero_info, rank_zero_warn


def info(message: str) -> None:
    """Log ``message`` at INFO level on rank 0."""
    rank_zero_info(message)


def warn(message: str) -> None:
    """Issue ``message`` as a ``UserWarning`` on rank 0."""
    rank_zero_warn(message)

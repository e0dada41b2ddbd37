"""lightning_prune: prune a network while it trains, with a PyTorch Lightning callback."""

from lightning_prune.callback import PruningCallback
from lightning_prune.criteria import Criterion, MagnitudeCriterion, register_criterion
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import BlockPattern, ChannelPattern, NMPattern, Pattern, UnstructuredPattern
from lightning_prune.pruner import Pruner, PruningEvent
from lightning_prune.schedules import Schedule

__all__ = [
    "BlockPattern",
    "ChannelPattern",
    "Criterion",
    "MagnitudeCriterion",
    "NMPattern",
    "Pattern",
    "Pruner",
    "PruningCallback",
    "PruningEvent",
    "PruningOptions",
    "Schedule",
    "UnstructuredPattern",
    "register_criterion",
]

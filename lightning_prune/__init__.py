"""lightning_prune: prune a network while it trains, with a PyTorch Lightning callback."""

from lightning_prune import export
from lightning_prune.calibration import calibrate_and_prune, prune_once
from lightning_prune.callback import PruningCallback
from lightning_prune.config import PruningConfig
from lightning_prune.coupled import CoupledPattern
from lightning_prune.criteria import (
    AccumulatingCriterion,
    Criterion,
    GradientCriterion,
    MagnitudeCriterion,
    MovementCriterion,
    SnipCriterion,
    SnipMomentumCriterion,
    WandaCriterion,
    register_criterion,
)
from lightning_prune.history import PruningHistory
from lightning_prune.oneshot import prune_lightning_module
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import BlockPattern, ChannelPattern, NMPattern, Pattern, UnstructuredPattern
from lightning_prune.progressive import Progressive
from lightning_prune.pruner import Pruner, PruningEvent
from lightning_prune.regularizers import GroupLasso, Regularizer
from lightning_prune.report import LayerSparsity, SparsityReport, sparsity_report
from lightning_prune.schedules import Schedule
from lightning_prune.sparsegpt import SparseGPTCriterion

__all__ = [
    "AccumulatingCriterion",
    "BlockPattern",
    "ChannelPattern",
    "CoupledPattern",
    "Criterion",
    "GradientCriterion",
    "GroupLasso",
    "LayerSparsity",
    "MagnitudeCriterion",
    "MovementCriterion",
    "NMPattern",
    "Pattern",
    "Progressive",
    "Pruner",
    "PruningCallback",
    "PruningConfig",
    "PruningEvent",
    "PruningHistory",
    "PruningOptions",
    "Regularizer",
    "Schedule",
    "SnipCriterion",
    "SnipMomentumCriterion",
    "SparseGPTCriterion",
    "SparsityReport",
    "UnstructuredPattern",
    "WandaCriterion",
    "calibrate_and_prune",
    "export",
    "prune_lightning_module",
    "prune_once",
    "register_criterion",
    "sparsity_report",
]

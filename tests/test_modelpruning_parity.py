"""ModelPruning's pruning functions have equivalents here that choose the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lightning_prune import ChannelPattern, MagnitudeCriterion, Pruner, PruningOptions, Schedule


@pytest.mark.parametrize(("norm", "dim", "pattern"), [(1, 0, "output"), (2, 0, "output"), (2, 1, "input")])
def test_ln_structured_and_channel_patterns_prune_the_same_channels(
    norm: int, dim: int, pattern: str
) -> None:
    torch.manual_seed(0)
    ours, theirs = (
        nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 2)),
        nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 2)),
    )
    theirs.load_state_dict(ours.state_dict())
    prune.ln_structured(theirs[0], "weight", amount=0.5, n=norm, dim=dim)
    options = PruningOptions(
        target_sparsity=0.5,
        pattern=ChannelPattern(pattern, reduce="sum"),
        criterion=MagnitudeCriterion(power=norm),
        scope="local",
    )
    Pruner(ours, Schedule(1, 1), options).prune(0.5)
    assert torch.equal(ours[0].weight == 0, theirs[0].weight == 0)


def test_magnitude_power_must_be_positive() -> None:
    with pytest.raises(ValueError, match="power=0"):
        MagnitudeCriterion(power=0)

"""One-shot pruning from calibration data: the criterion seams (check_options, reconstructs),
Wanda's statistics and comparison groups, and the calibration entry points."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_prune import Pruner, PruningOptions, Schedule
from lightning_prune.criteria import Criterion


class RefusesBlocks(Criterion):
    """A user's criterion that serves only unstructured pruning."""

    name = "refuses_blocks_test"

    def check_options(self, options: PruningOptions) -> None:
        if str(options.pattern) != "1x1":
            raise ValueError(f"{self.name} pattern={str(options.pattern)!r}: only '1x1' is accepted")

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        return param.detach().abs().float()


def test_a_criterion_refuses_options_it_cannot_serve_when_they_are_built() -> None:
    with pytest.raises(ValueError, match=r"refuses_blocks_test pattern='4x1': only '1x1'"):
        PruningOptions(criterion=RefusesBlocks(), pattern="4x1")
    assert PruningOptions(criterion=RefusesBlocks(), pattern="1x1").pattern.group_size((4, 4)) == 1


# ---------------------------------------------------------------------------- the Pruner's hooks
def test_calibration_sessions_add_up_to_the_statistics_of_all_their_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = Pruner(model, Schedule(0, 0), PruningOptions(criterion="wanda", pattern="1x1"))
    batches = [torch.randn(5, 8) for _ in range(4)]
    for session in (batches[:1], batches[1:]):  # two sessions: the second adds to the first
        with pruner.calibrating(), torch.no_grad():
            for x in session:
                model(x)
    (state,) = pruner.buffers
    expected = torch.cat(batches).square().sum(dim=0)  # sum of squares per input channel
    torch.testing.assert_close(state.view(-1), expected)
    assert pruner.calibration_calls == 4


def test_committed_masks_only_grow_and_are_recorded_as_an_event() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    pruner = Pruner(model, Schedule(0, 0), PruningOptions(pattern="1x1", target_sparsity=0.5))
    pruner.masks[0][0, 0] = False  # pruned earlier
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1] = False  # a whole row now
    event = pruner.commit_masks([keep], 0.5)
    assert (~pruner.masks[0]).sum() == 5 and not pruner.masks[0][0, 0]
    assert torch.equal(model[0].weight == 0, ~pruner.masks[0])
    assert (event.step, event.target_sparsity, event.sparsity) == (0, 0.5, 5 / 16)
    assert event.layer_sparsity == {"0": 5 / 16} and pruner.events == [event]

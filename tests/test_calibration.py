"""One-shot pruning from calibration data: the criterion seams (check_options, reconstructs),
Wanda's statistics and comparison groups, and the calibration entry points."""

from __future__ import annotations

import pytest
from torch import Tensor

from lightning_prune import PruningOptions
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

"""Masks between events: exact zeros after every real optimizer step, for the price of one multiply.

A float multiply by a 0/1 mask leaves ``NaN * 0 = NaN`` (and ``inf * 0 = NaN``) in a pruned weight
that a diverging update wrote. Multiplying the weight's *bits*, seen as integers of the same width,
by 0 or 1 gives exactly ``+0.0`` where the mask is 0 and leaves every kept weight untouched bit for
bit, at the same speed as the float multiply (``benchmarks/bench_overhead.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

#: The integer type of each float width, for multiplying a weight's bits by its 0/1 mask.
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def step_mask(param: Tensor, mask: Tensor) -> Tensor:
    """What the per-step multiply uses for ``param``.

    On CPU, kernels that mix dtypes run unvectorised (about 20x slower than one dtype), so CPU weights
    get a 0/1 copy of their mask in the integer type of their width; elsewhere the bool mask is used.
    """
    if param.device.type != "cpu":
        return mask
    return torch.zeros_like(param, dtype=INT_OF_WIDTH[param.element_size()]).copy_(mask)


@torch.no_grad()
def zero_pruned(params: list[Tensor], masks: list[Tensor]) -> None:
    """Multiply the bits of each weight by its 0/1 mask in place (pruned: ``+0.0``; kept: unchanged)."""
    if params:
        torch._foreach_mul_([p.view(INT_OF_WIDTH[p.element_size()]) for p in params], masks)


class OptimizerTargets:
    """The targets one optimizer updates, with their param groups, re-read when its groups change.

    A fine-tuning callback may add a layer to the optimizer mid-run (Lightning's ``BaseFinetuning``)
    and ``optimizer.load_state_dict`` replaces the group dicts; both change the signature, which
    costs one small tuple per step to compare.

    Args:
        optimizer: the optimizer.
        index: ``id(parameter) -> target index`` of every target.
    """

    def __init__(self, optimizer: Optimizer, index: dict[int, int]) -> None:
        self.optimizer = optimizer
        self.index = index
        self._signature: tuple[tuple[int, int, int], ...] = ()
        self._owned: list[tuple[int, dict[str, Any]]] = []

    def current(self) -> list[tuple[int, dict[str, Any]]]:
        """``(target index, param group)`` of every target this optimizer steps, in group order."""
        groups = self.optimizer.param_groups
        signature = tuple((id(g), id(g["params"]), len(g["params"])) for g in groups)
        if signature != self._signature:
            self._signature = signature
            self._owned = [
                (self.index[id(p)], group) for group in groups for p in group["params"] if id(p) in self.index
            ]
        return self._owned

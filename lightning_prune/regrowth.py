"""Regrowth inside the pruning window: an event may also revive pruned groups the gradient asks for.

With ``regrow=f`` every event before the schedule's last, after the selection has chosen the
groups that reach the event's sparsity, swaps a share of each layer's groups (GraNet, Liu et al.
2021; RigL, Evci et al. 2020):

1. **grow**: the ``k`` pruned groups of the layer with the largest gradient (the pattern's cost of
   ``|G|``, the gradient of the step the event follows) come back, at zero, as RigL starts them;
2. **drop**: the ``k`` lowest-scoring live groups of the layer go, so each layer keeps exactly the
   sparsity the selection gave it, and the schedule's sparsity holds.

``k`` is ``f`` times the layer's live groups, decayed along the window by a half cosine
(``f * (1 + cos(pi * progress)) / 2``, progress from the schedule) as RigL decays its drop
fraction, and never more than the pruned groups whose gradient is above zero. The schedule's last
event does not regrow, so from then on masks only grow, as without regrowth.

Everything a swap reads is the same on every DDP rank (synchronised gradients, identical weights),
and the masks it makes are broadcast from rank 0 like every event's. It keeps no state: an event
needs only the gradient of its own step, so an exact resume stays exact. An event with no gradient
at hand (a one-shot before the first step, the catch-up of a run resumed without pruning state, a
frozen layer) prunes without regrowth in the layers that lack one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_prune.checks import check_fraction
from lightning_prune.coupled import CoupledPattern
from lightning_prune.patterns import NMPattern, Pattern
from lightning_prune.thresholds import LayerGroups, lowest

if TYPE_CHECKING:
    from lightning_prune.options import PruningOptions
    from lightning_prune.schedules import Schedule
    from lightning_prune.targets import Target


def check_regrow(regrow: object, *, pattern: Pattern, scope: str, progressive: object) -> float:
    """Return ``regrow`` as a float in ``[0, 1)`` if it can be served with these options, else raise.

    Raises:
        ValueError: naming ``regrow``, its value and what is accepted: a fraction in ``[0, 1)``;
            not with N:M or coupled patterns (their groups are not independent units), the
            ``"row"`` scope (every row keeps its own count) or progressive pruning (a fade assumes
            masks only grow).
    """
    value = check_fraction("regrow", regrow, upper_inclusive=False)
    if value == 0.0:
        return value
    if isinstance(pattern, NMPattern | CoupledPattern):
        raise ValueError(
            f"regrow={value} swaps whole groups inside a layer, but pattern {str(pattern)!r} does not prune "
            "independent groups; use regrow=0 with it (regrowth takes '1x1', 'NxM', 'channelx1', '1xchannel')"
        )
    if scope == "row":
        raise ValueError(
            f"regrow={value} does not work with scope='row' (each row keeps its count); use regrow=0"
        )
    if progressive is not None:
        raise ValueError(
            f"regrow={value} revives pruned groups, but a progressive fade needs masks that only grow; "
            "use regrow=0 or progressive=False"
        )
    return value


def share_at(regrow: float, progress: float) -> float:
    """The share of live groups swapped at an event ``progress`` (``k / T``) into the window."""
    if regrow <= 0.0 or progress >= 1.0:
        return 0.0
    return regrow * (1.0 + math.cos(math.pi * max(0.0, progress))) / 2.0


@torch.no_grad()
def regrow_groups(
    layers: Sequence[LayerGroups],
    selected: Sequence[Tensor],
    gradients: Sequence[Tensor | None],
    share: float,
) -> tuple[list[Tensor], int]:
    """Swap, in each layer, ``share`` of its live groups for the pruned groups with the largest gradient.

    Args:
        layers: each layer's groups and their costs (the scores; ``-inf`` for groups pruned earlier).
        selected: each layer's groups to prune, as the selection chose them (1-D bool).
        gradients: each layer's gradient cost per group (1-D, like ``costs``), or ``None`` for a
            layer without a gradient (left as selected).
        share: fraction of each layer's live groups to swap.

    Returns:
        The new selections (each layer prunes as many groups as before) and the groups revived.
    """
    result: list[Tensor] = []
    revived = 0
    for layer, pruned, gradient in zip(layers, selected, gradients, strict=True):
        if gradient is None or share <= 0.0:
            result.append(pruned)
            continue
        live = int(pruned.numel() - torch.count_nonzero(pruned))
        growable = pruned & (gradient.nan_to_num(0.0) > 0)
        k = min(math.floor(share * live), int(torch.count_nonzero(growable)))
        if k <= 0:
            result.append(pruned)
            continue
        # grow: the k growable groups of largest gradient (ties: lower index)
        grow_costs = torch.where(
            growable, -gradient.float(), torch.full_like(gradient, float("inf"), dtype=torch.float)
        )
        grow = lowest(grow_costs, k) & growable
        # drop: the k live groups of lowest cost (ties: lower index)
        drop_costs = layer.costs.float().masked_fill(pruned, float("inf")).nan_to_num(nan=float("inf"))
        drop = lowest(drop_costs, k) & ~pruned
        result.append((pruned & ~grow) | drop)
        revived += k
    return result, revived


def gradient_costs(pattern: Pattern, gradients: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Each layer's gradient cost per group: the pattern's cost of ``|G|`` in the standard layout.

    Args:
        pattern: the run's :class:`~lightning_prune.patterns.Pattern`.
        gradients: each target's gradient in the standard layout, or ``None``.
    """
    return [None if g is None else pattern.group_costs(g.abs()).flatten() for g in gradients]


def regrow_at_event(
    options: PruningOptions,
    schedule: Schedule,
    step: int,
    targets: Sequence[Target],
    layers: Sequence[LayerGroups],
    selected: Sequence[Tensor],
) -> list[Tensor]:
    """The event's selection with regrowth applied (unchanged at and after the schedule's last event).

    Args:
        options: the run's options (``regrow`` and ``pattern`` are read).
        schedule: the run's schedule (its progress decays the share; its end stops regrowth).
        step: the event's optimizer step.
        targets: the targets, whose ``param.grad`` (this step's gradient) ranks the pruned groups.
        layers: each target's groups, as the selection saw them.
        selected: the selection's groups to prune, one 1-D bool tensor per target.
    """
    share = 0.0 if step >= schedule.end_step else share_at(options.regrow, schedule.progress_at(step))
    if share <= 0.0:
        return list(selected)
    gradients = [None if t.param.grad is None else t.layout.to_standard(t.param.grad) for t in targets]
    return regrow_groups(layers, selected, gradient_costs(options.pattern, gradients), share)[0]

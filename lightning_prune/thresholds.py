"""Which groups to prune: one ranking over all layers (global) or one per layer (local).

Both honour per-layer sparsity bounds. Global selection is exact: it prunes the lowest-cost groups
subject to every layer staying within ``[min, max]``. Each layer's ``lo`` cheapest groups are
mandatory, its next ``hi - lo`` cheapest are candidates, and the cheapest candidates over all layers
fill the rest of the budget, taking the prefix (in cost order; ties by layer, then position) whose
size is closest to it. The same choice is made on every rank.

Nothing is sorted at full size, so an event scales to 1e8-1e9 scores: a histogram narrows the range
that holds the crossing cost (``torch.histc``, one pass per round), exact counts confirm it, and only
the few values left in the final range are sorted. Each layer's mask is then one comparison against
a threshold plus an index-ordered pick among ties. Extra memory is a few byte-masks of one layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_EPS = 1e-9
#: Histogram bins per narrowing round.
BINS = 4096
#: Values left in the range when narrowing stops and an exact sort takes over.
EXACT_BELOW = 1 << 18


@dataclass(frozen=True)
class LayerGroups:
    """The groups of one layer as the selection sees them.

    Args:
        costs: 1-D costs, one per group (lower is pruned first; ``-inf`` for groups already pruned).
        group_size: weights zeroed when one group is pruned.
        numel: weights in the layer (the denominator of its sparsity).
    """

    costs: Tensor
    group_size: int
    numel: int

    def bounds(self, min_sparsity: float, max_sparsity: float) -> tuple[int, int]:
        """Fewest and most groups that keep the layer's sparsity within the bounds."""
        groups = self.costs.numel()
        lo = math.ceil(min_sparsity * self.numel / self.group_size - _EPS)
        hi = math.floor(max_sparsity * self.numel / self.group_size + _EPS)
        hi = min(hi, groups)
        return min(lo, hi), hi


def select_groups(
    layers: list[LayerGroups],
    sparsity: float,
    scope: str,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
) -> list[Tensor]:
    """Choose the groups to prune so that the targets reach ``sparsity``.

    Args:
        layers: the groups of each targeted layer.
        sparsity: fraction of all targeted weights to zero (global) or of each layer's (local).
        scope: ``"global"`` or ``"local"``.
        min_sparsity: least sparsity per layer; capped at ``sparsity`` so that a schedule's early,
            low targets are not overridden.
        max_sparsity: most sparsity per layer.

    Returns:
        One 1-D bool tensor per layer, ``True`` for each group to prune.
    """
    min_sparsity = min(min_sparsity, sparsity)
    bounds = [layer.bounds(min_sparsity, max_sparsity) for layer in layers]
    if scope == "local":
        counts = [
            max(lo, min(hi, round(sparsity * layer.numel / layer.group_size)))
            for layer, (lo, hi) in zip(layers, bounds, strict=True)
        ]
        return [lowest(layer.costs, count) for layer, count in zip(layers, counts, strict=True)]
    if scope != "global":
        raise ValueError(f"scope={scope!r} is not one of ['global', 'local']")
    counts, value, below, at_most = _global_counts(layers, bounds, sparsity)
    selected = []
    for i, (layer, count) in enumerate(zip(layers, counts, strict=True)):
        # Layers not held by a bound cut at the global crossing value; the others at their own.
        if value is not None and below[i] <= count <= at_most[i]:
            selected.append(_below_plus_ties(layer.costs, value, count))
        else:
            selected.append(lowest(layer.costs, count))
    return selected


def _count(mask: Tensor) -> int:
    return int(torch.count_nonzero(mask))


def lowest(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` lowest of 1-D ``values``; ties go to the lower index."""
    k = max(0, min(k, values.numel()))
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = _crossing([values], [0], [values.numel()], [1], k)
    return _below_plus_ties(values, threshold, k)


def _below_plus_ties(values: Tensor, threshold: float, k: int) -> Tensor:
    """Everything below ``threshold`` plus the first ties at it, ``k`` in all."""
    chosen = values < threshold
    missing = k - _count(chosen)
    if missing > 0:
        chosen[(values == threshold).nonzero().flatten()[:missing]] = True
    return chosen


def _global_counts(
    layers: list[LayerGroups], bounds: list[tuple[int, int]], sparsity: float
) -> tuple[list[int], float | None, list[int], list[int]]:
    """Groups to prune per layer, the crossing cost (``None`` when none is needed), and per layer
    the number of costs below it and at most it."""
    total = sum(layer.numel for layer in layers)
    budget = round(sparsity * total) - sum(
        lo * layer.group_size for layer, (lo, _) in zip(layers, bounds, strict=True)
    )
    lows, highs = [lo for lo, _ in bounds], [hi for _, hi in bounds]
    if budget <= 0:
        return lows, None, [], []
    costs = [layer.costs for layer in layers]
    sizes = [layer.group_size for layer in layers]
    if _weight(costs, lows, highs, sizes, [c.numel() for c in costs]) <= budget:
        return highs, None, [], []  # every candidate fits
    value = _crossing(costs, lows, highs, sizes, budget)
    # All candidates below the crossing value are in; ties at it go in layer order, then position,
    # until the prefix is closest to the budget.
    raw_below = _counts(costs, value, strict=True)
    below = [_clamped(n, lo, hi) for n, lo, hi in zip(raw_below, lows, highs, strict=True)]
    at_most = _counts(costs, value, strict=False)
    remaining = budget - sum((n - lo) * g for n, lo, g in zip(below, lows, sizes, strict=True))
    counts = list(below)
    for i, (hi, g) in enumerate(zip(highs, sizes, strict=True)):
        if remaining <= 0:
            break
        ties = _clamped(at_most[i], lows[i], hi) - below[i]
        take = min(ties, remaining // g)
        counts[i] += take
        remaining -= take * g
        if take < ties and remaining > 0:
            if g - remaining < remaining:  # one more overshoots by less than stopping undershoots
                counts[i] += 1
            break
    return counts, value, raw_below, at_most


def _clamped(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def _counts(costs: Sequence[Tensor], value: float, strict: bool) -> list[int]:
    """Per layer, how many costs are ``< value`` (``strict``) or ``<= value``."""
    return [_count(c < value) if strict else _count(c <= value) for c in costs]


def _weight(
    costs: Sequence[Tensor],
    lows: Sequence[int],
    highs: Sequence[int],
    sizes: Sequence[int],
    counts: Sequence[int],
) -> int:
    """Weight of the candidates among the first ``counts`` groups of each layer."""
    return sum(
        (_clamped(n, lo, hi) - lo) * g for n, lo, hi, g in zip(counts, lows, highs, sizes, strict=True)
    )


def _crossing(
    costs: Sequence[Tensor], lows: Sequence[int], highs: Sequence[int], sizes: Sequence[int], budget: int
) -> float:
    """The smallest cost ``v`` whose candidates ``<= v`` weigh at least ``budget`` (which must be reachable)."""
    # Only already-pruned groups hold -inf; a cheap min() tells whether a layer has any.
    has_pruned = [float(c.min()) == -math.inf for c in costs]
    if (
        any(has_pruned)
        and _weight(costs, lows, highs, sizes, _counts(costs, -math.inf, strict=False)) >= budget
    ):
        return -math.inf
    finite = [c[c > -math.inf] if pruned else c for c, pruned in zip(costs, has_pruned, strict=True)]
    lo_value = min(float(c.min()) for c in finite if c.numel())
    hi_value = max(float(c.max()) for c in finite if c.numel())
    below = _counts(costs, lo_value, strict=True)
    inside = sum(c.numel() for c in finite)
    # Invariant: weight(< lo_value) < budget <= weight(<= hi_value); `below` counts < lo_value.
    while lo_value != hi_value and inside > EXACT_BELOW:
        # Bin edges are approximate (float binning); exact counts at the new ends check them.
        hist = torch.stack([torch.histc(c.float(), BINS, lo_value, hi_value).cpu() for c in finite]).double()
        cumulative = torch.tensor(below, dtype=torch.float64)[:, None] + hist.cumsum(1)
        lows_t = torch.tensor(lows, dtype=torch.float64)[:, None]
        highs_t = torch.tensor(highs, dtype=torch.float64)[:, None]
        sizes_t = torch.tensor(sizes, dtype=torch.float64)[:, None]
        weights = ((torch.minimum(torch.maximum(cumulative, lows_t), highs_t) - lows_t) * sizes_t).sum(0)
        j = int(torch.searchsorted(weights, float(budget)).clamp_max(BINS - 1))
        width = (hi_value - lo_value) / BINS
        new_lo = max(lo_value, lo_value + (j - 1) * width)
        new_hi = min(hi_value, lo_value + (j + 2) * width)
        new_below = _counts(costs, new_lo, strict=True)
        if _weight(costs, lows, highs, sizes, new_below) >= budget:
            new_lo, new_below = lo_value, below
        if _weight(costs, lows, highs, sizes, _counts(costs, new_hi, strict=False)) < budget:
            new_hi = hi_value
        if (new_lo, new_hi) == (lo_value, hi_value):
            break  # no progress (float rounding): finish exactly
        lo_value, hi_value, below = new_lo, new_hi, new_below
        inside = int(hist[:, max(j - 1, 0) : j + 2].sum()) + 1  # about what is left in range
    if lo_value == hi_value:  # by the invariant, the crossing is this value
        return lo_value
    return _exact_crossing(costs, lows, highs, sizes, budget, lo_value, hi_value, below)


def _exact_crossing(
    costs: Sequence[Tensor],
    lows: Sequence[int],
    highs: Sequence[int],
    sizes: Sequence[int],
    budget: int,
    lo_value: float,
    hi_value: float,
    below: Sequence[int],
) -> float:
    """Sort the values in ``[lo_value, hi_value]`` and walk the candidates to the crossing."""
    values, weights = [], []
    reached = _weight(costs, lows, highs, sizes, below)
    for c, lo, hi, g, n in zip(costs, lows, highs, sizes, below, strict=True):
        inside = c[(c >= lo_value) & (c <= hi_value)].sort().values
        ranks = n + torch.arange(inside.numel(), device=c.device)
        keep = (ranks >= lo) & (ranks < hi)
        values.append(inside[keep].double().cpu())
        weights.append(torch.full((_count(keep),), g, dtype=torch.int64))
    merged = torch.cat(values)
    order = merged.argsort(stable=True)
    filled = reached + torch.cat(weights)[order].cumsum(0)
    index = int(torch.searchsorted(filled, budget))
    return float(merged[order[min(index, merged.numel() - 1)]])

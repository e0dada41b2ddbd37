"""Reference selection for tests: the first, sort-based implementation of lightning_prune.thresholds.

Simple and exact, O(N log N); the library's sort-free version must choose exactly the same groups.
The order is torch's stable sort: ascending by value with NaN after +inf, ``-0.0`` equal to ``0.0``,
equal costs by layer, then by position.

Both honour per-layer sparsity bounds. Global selection is exact: it prunes the lowest-cost groups
subject to every layer staying within ``[min, max]``, which is the same as one threshold ``tau`` with
each layer's count clamped to its bounds. It is computed as: each layer's ``lo`` cheapest groups
are mandatory, its next ``hi - lo`` cheapest are candidates, and the cheapest candidates over all
layers fill the rest of the budget. Ties break by layer order then position, the same on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_prune.thresholds import LayerGroups


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
    orders = [layer.costs.argsort(stable=True) for layer in layers]
    bounds = [layer.bounds(min_sparsity, max_sparsity) for layer in layers]
    if scope == "local":
        counts = [
            max(lo, min(hi, round(sparsity * layer.numel / layer.group_size)))
            for layer, (lo, hi) in zip(layers, bounds, strict=True)
        ]
    elif scope == "global":
        counts = _global_counts(layers, orders, bounds, sparsity)
    else:
        raise ValueError(f"scope={scope!r} is not one of ['global', 'local']")
    selected = []
    for layer, order, count in zip(layers, orders, counts, strict=True):
        pruned = torch.zeros_like(layer.costs, dtype=torch.bool)
        pruned[order[:count]] = True
        selected.append(pruned)
    return selected


def _global_counts(
    layers: list[LayerGroups], orders: list[Tensor], bounds: list[tuple[int, int]], sparsity: float
) -> list[int]:
    total = sum(layer.numel for layer in layers)
    budget = round(sparsity * total) - sum(
        lo * layer.group_size for layer, (lo, _) in zip(layers, bounds, strict=True)
    )
    counts = [lo for lo, _ in bounds]
    if budget <= 0:
        return counts
    device = layers[0].costs.device
    cand_costs, cand_sizes, cand_layers = [], [], []
    for index, (layer, order, (lo, hi)) in enumerate(zip(layers, orders, bounds, strict=True)):
        cand_costs.append(layer.costs[order[lo:hi]])
        cand_sizes.append(torch.full((hi - lo,), layer.group_size, dtype=torch.int64, device=device))
        cand_layers.append(torch.full((hi - lo,), index, dtype=torch.int64, device=device))
    costs = torch.cat(cand_costs)  # promotes mixed dtypes, as the library compares them
    if costs.numel() == 0:
        return counts
    rank = costs.argsort(stable=True)
    filled = torch.cumsum(torch.cat(cand_sizes)[rank], dim=0)
    # Take the prefix whose size is closest to the budget (ties: the smaller prefix).
    reach = int(torch.searchsorted(filled, budget).item())
    if reach < filled.numel():
        over = int(filled[reach].item()) - budget
        under = budget - (int(filled[reach - 1].item()) if reach > 0 else 0)
        taken = reach + 1 if over < under else reach
    else:
        taken = filled.numel()
    per_layer = torch.bincount(torch.cat(cand_layers)[rank[:taken]], minlength=len(layers))
    return [count + int(extra) for count, extra in zip(counts, per_layer.tolist(), strict=True)]

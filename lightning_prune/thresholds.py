"""Which groups to prune: one ranking over all layers (global), one per layer (local), or one per
output row of each layer (row: Wanda's comparison group).

Both honour per-layer sparsity bounds. Global selection is exact: it prunes the lowest-cost groups
subject to every layer staying within ``[min, max]``. Each layer's ``lo`` cheapest groups are
mandatory, its next ``hi - lo`` cheapest are candidates, and the cheapest candidates over all layers
fill the rest of the budget, taking the prefix (in cost order) whose size is closest to it.

**The order.** Costs are ranked as a stable sort of all layers' costs, concatenated in layer order,
would rank them: by value under ``-inf < finite < +inf < NaN`` (``-0.0`` equals ``0.0``, every NaN
equals every other), and equal costs by layer, then by position (lower index first). So ties at the
cut-off go to the earliest layers and positions, the same on every rank and every run.

**The method.** Nothing is sorted at full size, and the work does not grow with ties or non-finite
costs: an event is about two comparison passes over the costs, whatever they hold.

1. A strided sample (at most :data:`SAMPLE` costs) estimates where the crossing cost lies and
   brackets it with a margin of :data:`SIGMAS` standard errors.
2. One pass over the costs, in chunks of :data:`CHUNK`, writes ``cost < lo`` straight into each
   layer's mask, counts it, and extracts the costs inside the bracket with their positions (about
   1% of them). A value holding much of the bracket (exact zeros, an all-equal layer, a coarse
   score) is counted with one more comparison instead of extracted; when the sample says most of its
   copies are below the cut, the masks take them all in this pass and give back the surplus later,
   from the end (ties go to the lower index).
3. Exact counts confirm the bracket; a radix select over the extracted costs finds the crossing
   value, and each mask gains the extracted costs below it plus the ties the order takes.

When the sample misleads (a bracket that misses, or one that would hold more than
:data:`EXTRACT_LIMIT` of the costs), a radix select over all costs takes over: histograms of the
costs' order-preserving integer keys (the float bits, sign-folded), :data:`RADIX_BINS` bins and one
pass per round; each round narrows the key range by at least ``RADIX_BINS / 2``, so float32 costs
take at most 3 rounds (float64: 6), then one comparison pass builds the masks. The result is the
same on every path (only the time differs), so ranks that sampled differently still agree. Extra
memory: the masks themselves, the extracted costs, and one chunk of temporaries.

**Shards.** Under FSDP2 a layer's costs can be split over ranks, each holding a contiguous run of
them (rank 0's first; see ``sharding.py``). Its :class:`Span` gives the layer's totals, and
``select_groups`` takes the ranks' :class:`Collectives`: the sample is skipped, the radix histograms
are summed over the ranks (a few all-reduces of ``layers x 4098`` counts), and the ties at the
crossing go to the ranks in order, each taking what the ranks before it left. Layers every rank holds
whole (costs already combined over the ranks) are counted once. The masks are exactly those one
process would build from all the costs.

**Rows.** The ``"row"`` scope prunes the same share of every row of a layer's groups (an output
row for ``1x1`` and N:M; a band of rows for ``NxM`` blocks), each row's cheapest in the same order:
per block of rows, the k-th smallest key of each row, what lies below it, then the ties at it by
position (:func:`lowest_in_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

_EPS = 1e-9
#: Elements per chunk of a pass on the CPU (a few MiB of temporaries that stay in cache).
CHUNK = 1 << 20
#: Elements per chunk of a pass on an accelerator (bounds the temporaries of huge layers).
DEVICE_CHUNK = 1 << 26
#: Most costs sampled, over all layers, to bracket the crossing (at most 1/32 of them, at least 1024).
SAMPLE = 1 << 16
#: Thresholds on the sample at which the estimate is evaluated.
GRID = 2048
#: Standard errors of the sample estimate on each side of the bracket.
SIGMAS = 4.0
#: Most costs a bracket may hold for extraction, as a fraction of all costs (with a floor of SAMPLE).
EXTRACT_LIMIT = 1 / 16
#: Histogram bins per radix round.
RADIX_BINS = 1 << 12


@dataclass(frozen=True)
class Span:
    """A layer whose groups are split over ranks: its totals, of which this rank holds a run.

    Args:
        groups: the layer's groups over all ranks.
        numel: the layer's weights over all ranks.
        replicated: every rank holds all the costs (counted once, as rank 0's).
        collectives: the ranks' collectives, which the selection of a split layer uses.
    """

    groups: int
    numel: int
    replicated: bool = False
    collectives: Collectives | None = field(default=None, compare=False, repr=False)


class Collectives(Protocol):
    """What a selection over sharded layers needs from the ranks (``sharding.ProcessGroupCollectives``)."""

    rank: int

    def sum(self, counts: Tensor) -> Tensor:
        """``counts`` (int64, CPU) summed over the ranks."""

    def before(self, counts: Tensor) -> Tensor:
        """Per entry of 1-D ``counts`` (int64, CPU), their sum over the ranks below this one."""


@dataclass(frozen=True)
class LayerGroups:
    """The groups of one layer as the selection sees them.

    Args:
        costs: 1-D costs, one per group (lower is pruned first; ``-inf`` for groups already pruned).
        group_size: weights zeroed when one group is pruned.
        numel: weights in the layer (the denominator of its sparsity).
        rows: the costs are this many equal runs, one per output row (or band of rows) of groups,
            each ranked on its own by the ``"row"`` scope.
        span: the layer's totals when its costs are split over ranks (``costs`` and ``numel`` are
            then this rank's part), ``None`` when they are all here.
    """

    costs: Tensor
    group_size: int
    numel: int
    rows: int = 1
    span: Span | None = None

    @property
    def total_groups(self) -> int:
        """Groups of the whole layer, over all ranks."""
        return self.costs.numel() if self.span is None else self.span.groups

    @property
    def total_numel(self) -> int:
        """Weights of the whole layer, over all ranks."""
        return self.numel if self.span is None else self.span.numel

    @property
    def split(self) -> bool:
        """Whether the costs are split over ranks (neither whole here nor replicated)."""
        return self.span is not None and not self.span.replicated

    def bounds(self, min_sparsity: float, max_sparsity: float) -> tuple[int, int]:
        """Fewest and most groups that keep the layer's sparsity within the bounds."""
        groups = self.total_groups
        lo = math.ceil(min_sparsity * self.total_numel / self.group_size - _EPS)
        hi = math.floor(max_sparsity * self.total_numel / self.group_size + _EPS)
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
        layers: the groups of each targeted layer. Layers split over ranks (:attr:`LayerGroups.span`)
            are selected with their span's collectives: every rank calls with its part of them.
        sparsity: fraction of all targeted weights to zero (global), of each layer's (local) or of
            each row's (row).
        scope: ``"global"``, ``"local"`` or ``"row"``.
        min_sparsity: least sparsity per layer (per row for ``"row"``); capped at ``sparsity`` so
            that a schedule's early, low targets are not overridden.
        max_sparsity: most sparsity per layer (per row for ``"row"``).

    Returns:
        One 1-D bool tensor per layer (this rank's part of it), ``True`` for each group to prune.
    """
    collectives = next((g.span.collectives for g in layers if g.span and g.span.collectives), None)
    if collectives is None and any(layer.split for layer in layers):
        raise ValueError("layers split over ranks need their span's collectives to be selected")
    min_sparsity = min(min_sparsity, sparsity)
    if scope == "row":
        return [_lowest_in_each_row(layer, sparsity, min_sparsity, max_sparsity) for layer in layers]
    bounds = [layer.bounds(min_sparsity, max_sparsity) for layer in layers]
    if scope == "local":
        counts = [
            max(lo, min(hi, round(sparsity * layer.total_numel / layer.group_size)))
            for layer, (lo, hi) in zip(layers, bounds, strict=True)
        ]
        return [
            _lowest_split(layer, count, collectives)
            if layer.split and collectives is not None
            else lowest(layer.costs, count)
            for layer, count in zip(layers, counts, strict=True)
        ]
    if scope != "global":
        raise ValueError(f"scope={scope!r} is not one of ['global', 'local', 'row']")
    counts, cut = _global_counts(layers, bounds, sparsity, collectives)
    selected = []
    for i, (layer, count) in enumerate(zip(layers, counts, strict=True)):
        # Layers not held by a bound cut at the global crossing; the others at their own.
        if cut is not None and cut.below[i] <= count <= cut.at_most[i]:
            selected.append(cut.mask(i, count))
        elif layer.split and collectives is not None:
            selected.append(_lowest_split(layer, count, collectives))
        else:
            selected.append(lowest(layer.costs, count))
    return selected


def _lowest_split(layer: LayerGroups, k: int, collectives: Collectives) -> Tensor:
    """This rank's part of the mask of the ``k`` lowest costs of a layer split over ranks."""
    k = max(0, min(k, layer.total_groups))
    if k in (0, layer.total_groups):
        return torch.full_like(layer.costs, k > 0, dtype=torch.bool)
    return _crossing([layer.costs], [0], [layer.total_groups], [1], k, (collectives, [False])).mask(0, k)


def lowest(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` lowest of 1-D ``values`` in the module's order (ties: lower index)."""
    k = max(0, min(k, values.numel()))
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k == values.numel():
        return torch.ones_like(values, dtype=torch.bool)
    return _crossing([values], [0], [values.numel()], [1], k).mask(0, k)


def _lowest_in_each_row(
    layer: LayerGroups, sparsity: float, min_sparsity: float, max_sparsity: float
) -> Tensor:
    """The ``"row"`` scope: every row of the layer's groups loses the same count, its own cheapest."""
    per_row = layer.costs.numel() // layer.rows
    row = LayerGroups(layer.costs[:per_row], layer.group_size, layer.numel // layer.rows)
    lo, hi = row.bounds(min_sparsity, max_sparsity)
    count = max(lo, min(hi, round(sparsity * row.numel / row.group_size)))
    return lowest_in_rows(layer.costs.view(layer.rows, per_row), count).view(-1)


def lowest_in_rows(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` lowest of each row of 2-D ``values``, as a stable sort of each row
    would take them (the module's order; ties: lower index).

    Per block of rows: the k-th smallest integer key of each row (``kthvalue``, no sort), what is
    below it, and the first ties at it by position, so the work is a few passes whatever the ties.
    """
    rows, width = values.shape
    k = max(0, min(k, width))
    if k in (0, width):
        return torch.full(values.shape, k == width, dtype=torch.bool, device=values.device)
    pruned = torch.empty(values.shape, dtype=torch.bool, device=values.device)
    dtype = _common_dtype([values])
    step = max(1, (CHUNK if values.device.type == "cpu" else DEVICE_CHUNK) // width)
    for start in range(0, rows, step):
        keys = _keys(_as(values[start : start + step], dtype))
        kth = keys.kthvalue(k, dim=1, keepdim=True).values
        below = keys < kth
        ties = keys == kth
        wanted = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)
        pruned[start : start + step] = below | (ties & (ties.cumsum(dim=1, dtype=torch.int32) <= wanted))
    return pruned


def _global_counts(
    layers: list[LayerGroups],
    bounds: list[tuple[int, int]],
    sparsity: float,
    collectives: Collectives | None = None,
) -> tuple[list[int], _Cut | None]:
    """Groups to prune per layer, and the cut at the crossing cost (``None`` when none is needed)."""
    total = sum(layer.total_numel for layer in layers)
    budget = round(sparsity * total) - sum(
        lo * layer.group_size for layer, (lo, _) in zip(layers, bounds, strict=True)
    )
    lows, highs = [lo for lo, _ in bounds], [hi for _, hi in bounds]
    if budget <= 0:
        return lows, None
    costs = [layer.costs for layer in layers]
    sizes = [layer.group_size for layer in layers]
    if _weight(lows, highs, sizes, [layer.total_groups for layer in layers]) <= budget:
        return highs, None  # every candidate fits
    shards = None
    if collectives is not None and any(layer.span is not None for layer in layers):
        replicated = [layer.span is None or layer.span.replicated for layer in layers]
        shards = (collectives, replicated)
    cut = _crossing(costs, lows, highs, sizes, budget, shards)
    # All candidates below the crossing value are in; ties at it go in layer order, then position,
    # until the prefix is closest to the budget.
    below = [_clamped(n, lo, hi) for n, lo, hi in zip(cut.below, lows, highs, strict=True)]
    remaining = budget - sum((n - lo) * g for n, lo, g in zip(below, lows, sizes, strict=True))
    counts = list(below)
    for i, (hi, g) in enumerate(zip(highs, sizes, strict=True)):
        if remaining <= 0:
            break
        ties = _clamped(cut.at_most[i], lows[i], hi) - below[i]
        take = min(ties, remaining // g)
        counts[i] += take
        remaining -= take * g
        if take < ties and remaining > 0:
            if g - remaining < remaining:  # one more overshoots by less than stopping undershoots
                counts[i] += 1
            break
    return counts, cut


def _clamped(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def _weight(lows: Sequence[int], highs: Sequence[int], sizes: Sequence[int], counts: Sequence[int]) -> int:
    """Weight of the candidates among the first ``counts`` groups of each layer."""
    return sum(
        (_clamped(n, lo, hi) - lo) * g for n, lo, hi, g in zip(counts, lows, highs, sizes, strict=True)
    )


# ---------------------------------------------------------------------------- keys and chunks
def _key_dtype(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    return (torch.int64, 64) if dtype == torch.float64 else (torch.int32, 32)


def _common_dtype(costs: Sequence[Tensor]) -> torch.dtype:
    """float64 when any layer's costs are float64, else float32 (exact for fp16/bf16 too)."""
    return torch.float64 if any(c.dtype == torch.float64 for c in costs) else torch.float32


def _keys(values: Tensor) -> Tensor:
    """Integer keys in the module's order: ``a < b`` as costs iff ``key(a) < key(b)``.

    The float bits as a signed integer order non-negative floats already; negative ones get their
    magnitude bits flipped. ``-0.0`` becomes ``0.0`` and every NaN the largest key.
    """
    itype, bits = _key_dtype(values.dtype)
    top = (1 << (bits - 1)) - 1
    canonical = values + 0.0  # -0.0 + 0.0 == +0.0; also a fresh tensor to work in
    nan = torch.isnan(canonical)  # before the fold below rewrites these bits in place
    keys = canonical.view(itype)
    keys.bitwise_xor_((keys >> (bits - 1)) & top)
    return keys.masked_fill_(nan, top)


def _from_key(key: int, dtype: torch.dtype) -> float:
    """The cost value whose key is ``key`` (the sign fold is its own inverse)."""
    itype, bits = _key_dtype(dtype)
    bits_of = torch.tensor([key], dtype=itype)
    bits_of.bitwise_xor_((bits_of >> (bits - 1)) & ((1 << (bits - 1)) - 1))
    return float(bits_of.view(dtype)[0])


def _key_of(value: float, dtype: torch.dtype) -> int:
    return int(_keys(torch.tensor([value], dtype=dtype))[0])


def _chunks(values: Tensor) -> list[tuple[int, Tensor]]:
    """``(offset, chunk)`` views of 1-D ``values``."""
    size = CHUNK if values.device.type == "cpu" else DEVICE_CHUNK
    return [(start, values[start : start + size]) for start in range(0, values.numel(), size)]


def _as(values: Tensor, dtype: torch.dtype) -> Tensor:
    # Compare in one dtype: a Python scalar against a bf16 tensor would be rounded to bf16.
    return values if values.dtype == dtype else values.to(dtype)


# ---------------------------------------------------------------------------- the cut
@dataclass
class _Layer:
    """One layer's part of a cut: its mask so far and what completing it needs."""

    costs: Tensor
    base: Tensor | None = None  # bool mask of the costs below the bracket (fast path)
    positions: Tensor | None = None  # positions of the extracted costs, ascending
    values: Tensor | None = None  # the extracted costs
    heavy_count: int = 0  # costs equal to the bracket's heavy value (counted, not extracted)


@dataclass
class _Cut:
    """The crossing cost and, per layer, how many costs are below it and at most it."""

    value: float
    dtype: torch.dtype
    below: list[int]
    at_most: list[int]
    layers: list[_Layer]
    heavy: float | None = None
    heavy_in_base: bool = False  # whether the base masks hold every copy of the heavy value
    ties_before: list[int] | None = None  # split layers: ties at the crossing on lower ranks

    def mask(self, i: int, count: int) -> Tensor:
        """Layer ``i``'s mask of its ``count`` lowest costs (``below[i] <= count <= at_most[i]``)."""
        layer, v = self.layers[i], self.value
        ties = count - self.below[i]
        if self.ties_before is not None:  # this rank's share: what the ranks before it left
            ties = max(0, ties - self.ties_before[i])
        if layer.base is None:  # no bracket: one comparison pass, then the ties by position
            mask = torch.empty_like(layer.costs, dtype=torch.bool)
            for start, chunk in _chunks(layer.costs):
                chunk = _as(chunk, self.dtype)
                out = mask[start : start + chunk.numel()]
                if math.isnan(v):  # everything but NaN ranks below NaN
                    torch.logical_not(torch.isnan(chunk), out=out)
                else:
                    torch.lt(chunk, v, out=out)
            return _add_first(layer.costs, mask, v, self.dtype, ties)
        mask = layer.base
        if layer.values is not None and layer.values.numel():
            assert layer.positions is not None
            mask[layer.positions[layer.values < v]] = True
            if ties > 0 and not (self.heavy is not None and self.heavy == v):
                mask[layer.positions[layer.values == v][:ties]] = True
        if self.heavy is not None and layer.heavy_count:
            h, copies = self.heavy, layer.heavy_count
            wanted = copies if h < v else ties if h == v else 0  # the first `wanted` copies belong in
            if self.heavy_in_base:
                _remove_last(layer.costs, mask, h, self.dtype, copies - wanted)
            else:
                _add_first(layer.costs, mask, h, self.dtype, wanted)
        layer.base = None  # the mask now belongs to the caller
        return mask


def _add_first(costs: Tensor, mask: Tensor, value: float, dtype: torch.dtype, count: int) -> Tensor:
    """Set ``mask`` at the first ``count`` positions where ``costs == value`` (NaN: where NaN)."""
    for start, chunk in _chunks(costs):
        if count <= 0:
            break
        chunk = _as(chunk, dtype)
        equal = torch.isnan(chunk) if math.isnan(value) else chunk == value
        found = int(torch.count_nonzero(equal))
        out = mask[start : start + chunk.numel()]
        if found <= count:
            out |= equal
        else:
            out[equal.nonzero().flatten()[:count]] = True
        count -= found
    return mask


def _remove_last(costs: Tensor, mask: Tensor, value: float, dtype: torch.dtype, count: int) -> Tensor:
    """Clear ``mask`` at the last ``count`` positions where ``costs == value``."""
    for start, chunk in reversed(_chunks(costs)):
        if count <= 0:
            break
        equal = _as(chunk, dtype) == value
        found = int(torch.count_nonzero(equal))
        out = mask[start : start + chunk.numel()]
        if found <= count:
            out &= ~equal
        else:
            out[equal.nonzero().flatten()[found - count :]] = False
        count -= found
    return mask


def _crossing(
    costs: Sequence[Tensor],
    lows: Sequence[int],
    highs: Sequence[int],
    sizes: Sequence[int],
    budget: int,
    shards: tuple[Collectives, Sequence[bool]] | None = None,
) -> _Cut:
    """The cut at the smallest cost ``v`` whose candidates ``<= v`` weigh at least ``budget``.

    ``budget`` must be reachable: ``0 < budget <= _weight(lows, highs, sizes, sizes of costs)``.
    ``shards``: the ranks' collectives and, per layer, whether every rank holds all its costs;
    then the counts are those of all ranks (see "Shards" above).
    """
    dtype = _common_dtype(costs)
    if shards is not None:
        collectives, replicated = shards
        # A replicated layer is counted once: from rank 0's copy.
        sources = [
            [] if whole and collectives.rank else [chunk for _, chunk in _chunks(c)]
            for c, whole in zip(costs, replicated, strict=True)
        ]
        key, below, at_most, local_ties = _radix(
            sources, [0] * len(costs), None, lows, highs, sizes, budget, dtype, collectives=collectives
        )
        before = collectives.before(torch.tensor(local_ties, dtype=torch.int64)).tolist()
        ties_before = [0 if whole else int(n) for n, whole in zip(before, replicated, strict=True)]
        layers = [_Layer(c) for c in costs]
        return _Cut(_from_key(key, dtype), dtype, below, at_most, layers, ties_before=ties_before)
    bracket = _bracket(costs, lows, highs, sizes, budget, dtype)
    if bracket is not None:
        cut = _bracketed(costs, lows, highs, sizes, budget, dtype, bracket)
        if cut is not None:
            return cut
    sources = [[chunk for _, chunk in _chunks(c)] for c in costs]
    key, below, at_most, _ = _radix(sources, [0] * len(costs), None, lows, highs, sizes, budget, dtype)
    layers = [_Layer(c) for c in costs]
    return _Cut(_from_key(key, dtype), dtype, below, at_most, layers)


# ---------------------------------------------------------------------------- 1. the sample
def _bracket(
    costs: Sequence[Tensor],
    lows: Sequence[int],
    highs: Sequence[int],
    sizes: Sequence[int],
    budget: int,
    dtype: torch.dtype,
) -> _Bracket | None:
    """A bracket that very likely holds the crossing; ``None`` when it would hold too many costs to
    extract."""
    total = sum(c.numel() for c in costs)
    wanted = min(SAMPLE, max(1024, total >> 5))
    # The estimate is small, serial work: numpy, so that no tiny op waits on a thread pool.
    samples, scales, drawn = [], [], []
    for c in costs:
        n = c.numel()
        stride = max(1, n // max(1, -(-wanted * n // total)))
        stride -= 1 if stride > 1 and stride % 2 == 0 else 0  # odd: crosses power-of-two periods
        sample = _as(c[stride // 2 :: stride], dtype).double().cpu().numpy()
        drawn.append(sample.size)
        scales.append(n / max(1, sample.size))
        samples.append(np.sort(sample[~np.isnan(sample)]))  # NaN ranks above all: only counted
    pooled = np.sort(np.concatenate(samples))
    if pooled.size == 0:
        return None

    def estimate(points: np.ndarray, side: str = "right") -> np.ndarray:
        weight = np.zeros(points.shape)
        for sample, scale, lo, hi, g in zip(samples, scales, lows, highs, sizes, strict=True):
            count = np.searchsorted(sample, points, side=side) * scale  # type: ignore[call-overload]
            weight += g * (np.clip(count, lo, hi) - lo)
        return weight

    def at(point: float) -> tuple[float, float]:
        """Estimated weight below ``point`` and up to it."""
        points = np.array([point])
        return float(estimate(points, "left")[0]), float(estimate(points)[0])

    grid = np.concatenate([pooled[:: max(1, pooled.size // GRID)], pooled[-1:]])
    weights = estimate(grid)
    j = int(np.searchsorted(weights, budget))
    crossing = None
    if j < grid.size:
        between = np.unique(pooled[(pooled > grid[j - 1]) & (pooled <= grid[j])] if j else pooled[:1])
        crossing = float(between[int(np.searchsorted(estimate(between), budget))])
    # Standard error of the estimated weight at the crossing (layers sampled whole add none).
    variance = 0.0
    point = crossing if crossing is not None else math.inf
    for sample, scale, m, g in zip(samples, scales, drawn, sizes, strict=True):
        if scale > 1.0:
            p = min(max(float(np.searchsorted(sample, point, side="right")) / m, 1.0 / m), 1.0 - 1.0 / m)
            variance += (g * scale) ** 2 * m * p * (1.0 - p)
    margin = SIGMAS * math.sqrt(variance) + max(sizes)
    if crossing is not None:
        before, through = at(crossing)
        if before <= budget - margin and through >= budget + margin:
            # Surely this value: count it, extract nothing. Most of its copies go in? Then the
            # masks take them all now and give back the last ones (fewer comparisons).
            return _Bracket(crossing, crossing, crossing, (budget - before) / (through - before) > 0.5)
    low_side = grid[weights <= budget - margin]
    high_side = grid[weights >= budget + margin]
    real = np.float64 if dtype == torch.float64 else np.float32
    lo = float(np.nextafter(real(low_side[-1]), real(math.inf))) if low_side.size else -math.inf
    hi = float(high_side[0]) if high_side.size else math.inf
    if lo == hi:
        return _Bracket(lo, hi, lo, False)
    inside = pooled[(pooled >= lo) & (pooled <= hi)]
    heavy, heavy_share, heavy_in = None, 0.0, False
    if inside.size:
        values, counts = np.unique(inside, return_counts=True)
        top = int(counts.argmax())
        if counts[top] / pooled.size >= EXTRACT_LIMIT / 8:  # worth a comparison pass
            heavy, heavy_share = float(values[top]), float(counts[top]) / pooled.size
            before, through = at(heavy)
            heavy_in = (budget - before) / max(through - before, 1.0) > 0.5
    if inside.size / pooled.size - heavy_share > EXTRACT_LIMIT * 0.75:
        return None
    return _Bracket(lo, hi, heavy, heavy_in)


@dataclass(frozen=True)
class _Bracket:
    """Costs ``< lo`` are below the crossing, costs ``> hi`` above it; ``heavy`` (in ``[lo, hi]``) is a
    value with many copies, counted rather than extracted; ``heavy_in``: whether the masks should
    start with its copies (most of them are likely below the crossing or at it)."""

    lo: float
    hi: float
    heavy: float | None
    heavy_in: bool


# ---------------------------------------------------------------------------- 2. one pass
def _bracketed(
    costs: Sequence[Tensor],
    lows: Sequence[int],
    highs: Sequence[int],
    sizes: Sequence[int],
    budget: int,
    dtype: torch.dtype,
    bracket: _Bracket,
) -> _Cut | None:
    """One pass: masks of ``cost < lo`` (and ``== heavy`` when it goes in), counts, and the costs in
    ``[lo, hi]`` other than ``heavy``, with their positions.

    ``None`` when the bracket missed the crossing or held too many costs to extract.
    """
    lo, hi, heavy = bracket.lo, bracket.hi, bracket.heavy
    limit = max(SAMPLE, int(EXTRACT_LIMIT * sum(c.numel() for c in costs)))
    extracted = 0
    layers, below, inside = [], [], []
    for c in costs:
        base = torch.empty_like(c, dtype=torch.bool)
        layer = _Layer(c, base)
        n_below, positions, values = 0, [], []
        scratch = torch.empty(
            min(c.numel(), CHUNK if c.device.type == "cpu" else DEVICE_CHUNK),
            dtype=torch.bool,
            device=c.device,
        )
        for start, chunk in _chunks(c):
            chunk = _as(chunk, dtype)
            out = base[start : start + chunk.numel()]
            if lo == -math.inf:
                out.zero_()
            else:
                torch.lt(chunk, lo, out=out)
                n_below += int(torch.count_nonzero(out))
            window = scratch[: chunk.numel()]
            if lo != hi:
                torch.le(chunk, hi, out=window)
                window ^= out  # lo <= cost <= hi
            equal = None
            if heavy is not None:
                equal = torch.eq(chunk, heavy, out=window if lo == hi else None)
                layer.heavy_count += int(torch.count_nonzero(equal))
            if lo != hi:
                if equal is not None:
                    window ^= equal  # heavy is in [lo, hi], so this removes exactly its copies
                found = window.nonzero().flatten()
                extracted += found.numel()
                if extracted > limit:
                    return None
                positions.append(found + start)
                values.append(chunk[found])
            if equal is not None and bracket.heavy_in:
                out |= equal
        if positions:
            layer.positions = torch.cat(positions)
            layer.values = torch.cat(values)
        layers.append(layer)
        below.append(n_below)
        count = layer.values.numel() if layer.values is not None else 0
        inside.append(n_below + count + layer.heavy_count)
    if _weight(lows, highs, sizes, below) >= budget or _weight(lows, highs, sizes, inside) < budget:
        return None  # the sample misled: the crossing lies outside the bracket
    sources = [[layer.values] if layer.values is not None else [] for layer in layers]
    extra = None
    if heavy is not None:
        extra = (_key_of(heavy, dtype), [layer.heavy_count for layer in layers])
    key_range = (_key_of(lo, dtype), _key_of(hi, dtype))
    key, counts_below, counts_at_most, _ = _radix(
        sources, below, extra, lows, highs, sizes, budget, dtype, key_range
    )
    return _Cut(_from_key(key, dtype), dtype, counts_below, counts_at_most, layers, heavy, bracket.heavy_in)


# ---------------------------------------------------------------------------- 3. radix select
def _radix(
    sources: Sequence[Sequence[Tensor]],
    base: Sequence[int],
    extra: tuple[int, Sequence[int]] | None,
    lows: Sequence[int],
    highs: Sequence[int],
    sizes: Sequence[int],
    budget: int,
    dtype: torch.dtype,
    key_range: tuple[int, int] | None = None,
    collectives: Collectives | None = None,
) -> tuple[int, list[int], list[int], list[int]]:
    """Key of the crossing among the costs of ``sources`` (per layer, chunks), per layer the
    counts below it and at most it, and this rank's own count of costs at it.

    Args:
        base: per layer, costs known to lie below every cost in its sources.
        extra: one more key and, per layer, how many costs hold it (counted, not in the sources).
        key_range: keys known to hold every cost of the sources and ``extra``.
        collectives: the histograms are summed over the ranks (each holds part of the sources).

    Each round histograms the keys in the current range into at most :data:`RADIX_BINS` bins of
    ``2**shift`` keys and keeps the bin where the weight reaches ``budget``, so the range shrinks by
    ``RADIX_BINS`` per round until it is one key.
    """
    _, bits = _key_dtype(dtype)
    top = (1 << (bits - 1)) - 1
    low_key, high_key = key_range if key_range is not None else (_key_of(-math.inf, dtype), top)
    base_t = torch.tensor(base, dtype=torch.int64)[:, None]
    lows_t = torch.tensor(lows, dtype=torch.int64)[:, None]
    highs_t = torch.tensor(highs, dtype=torch.int64)[:, None]
    sizes_t = torch.tensor(sizes, dtype=torch.int64)[:, None]
    while True:
        shift = 0
        while (high_key >> shift) - (low_key >> shift) + 1 > RADIX_BINS:
            shift += 1
        bins = (high_key >> shift) - (low_key >> shift) + 1
        origin = (low_key >> shift) - 1  # bin 0: keys below the range's first bin; bins + 1: above
        histograms = []
        for chunks in sources:
            histogram = torch.zeros(bins + 2, dtype=torch.int64)
            for chunk in chunks:
                keys = _keys(_as(chunk, dtype))
                if shift:
                    index = keys.bitwise_right_shift_(shift).sub_(origin).clamp_(0, bins + 1)
                else:  # clamp first, so that key - origin cannot overflow
                    index = keys.clamp_(origin, min(high_key + 1, top)).sub_(origin)
                histogram += torch.bincount(index, minlength=bins + 2).cpu()
            histograms.append(histogram)
        counts = torch.stack(histograms)
        local_counts = counts
        if collectives is not None:
            counts = collectives.sum(counts)
        if extra is not None:
            key, per_layer = extra
            counts[:, min(max((key >> shift) - origin, 0), bins + 1)] += torch.tensor(
                per_layer, dtype=torch.int64
            )
        at_most = base_t + counts.cumsum(1)  # per layer, costs up to the last key of each bin
        weights = ((at_most.clamp(lows_t, highs_t) - lows_t) * sizes_t).sum(0)
        j = int(torch.searchsorted(weights, budget))
        # The crossing lies in the range, so in one of its bins (never bin 0 or bins + 1).
        assert 1 <= j <= bins, "crossing outside the radix range"
        if shift == 0:  # single-key bins: the crossing is this bin's key
            return origin + j, at_most[:, j - 1].tolist(), at_most[:, j].tolist(), local_counts[:, j].tolist()
        low_key = max(low_key, (origin + j) << shift)
        high_key = min(high_key, ((origin + j + 1) << shift) - 1)

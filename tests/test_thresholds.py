"""Group selection: global and local scope, per-layer bounds, non-uniform groups, -inf and ties.

Expected selections come from brute force (sorting every cost, or enumerating every subset of groups)
and bounds are worked out in exact rational arithmetic, never from the module under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_prune.thresholds import LayerGroups, select_groups

SETTINGS = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------------------- exact helpers
def fractions(denominator: int = 40, low: int = 0, high: int | None = None) -> st.SearchStrategy[Fraction]:
    """Sparsities as exact fractions ``k / denominator`` (passed to the code as floats)."""
    return st.integers(low, denominator if high is None else high).map(lambda k: Fraction(k, denominator))


def nearest_ints(x: Fraction) -> set[int]:
    """The integer(s) closest to ``x``: two of them when ``x`` is exactly halfway."""
    floor = math.floor(x)
    rest = x - floor
    if rest < Fraction(1, 2):
        return {floor}
    if rest > Fraction(1, 2):
        return {floor + 1}
    return {floor, floor + 1}


def exact_bounds(groups: int, group_size: int, numel: int, low: Fraction, high: Fraction) -> tuple[int, int]:
    """Fewest and most whole groups whose weights keep ``low <= sparsity <= high``."""
    lo = math.ceil(low * numel / group_size)
    hi = min(groups, math.floor(high * numel / group_size))
    return lo, hi


def distinct_costs(count: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randperm(count, generator=generator).float() - count / 2) / 7.0


def split(costs: Tensor, sizes: list[int]) -> list[Tensor]:
    return [c.clone() for c in torch.split(costs, sizes)]


def cheapest(costs: Tensor, count: int) -> Tensor:
    """Bool mask of the ``count`` lowest of distinct ``costs``, by pairwise comparison (no argsort)."""
    below = (costs.unsqueeze(1) > costs.unsqueeze(0)).sum(1)  # how many are cheaper than each
    return below < count


# ---------------------------------------------------------------------------- global, no binding bounds
@SETTINGS
@given(
    st.lists(st.integers(1, 12), min_size=1, max_size=4),
    st.integers(1, 4),
    fractions(),
    st.integers(0, 2**31 - 1),
)
def test_global_prunes_the_globally_cheapest_groups(
    groups: list[int], group_size: int, sparsity: Fraction, seed: int
) -> None:
    costs = distinct_costs(sum(groups), seed)
    layers = [LayerGroups(c, group_size, c.numel() * group_size) for c in split(costs, groups)]
    selected = select_groups(layers, float(sparsity), "global")

    assert [s.dtype for s in selected] == [torch.bool] * len(layers)
    assert [s.shape for s in selected] == [c.costs.shape for c in layers]
    chosen = torch.cat(selected)
    total = sum(groups) * group_size
    # Whole-weight budget(s) nearest sparsity * total, then the whole-group count(s) nearest to those.
    counts = set()
    for budget in nearest_ints(sparsity * total):
        counts |= nearest_ints(Fraction(budget, group_size))
    count = int(chosen.sum())
    assert count in counts
    order = sorted(range(costs.numel()), key=lambda i: float(costs[i]))
    expected = torch.zeros_like(chosen)
    expected[order[:count]] = True
    assert torch.equal(chosen, expected)


def test_global_by_hand() -> None:
    a = LayerGroups(torch.tensor([0.5, 0.1, 0.9]), 1, 3)
    b = LayerGroups(torch.tensor([0.3, 0.7, 0.2]), 1, 3)
    # 50% of 6 weights = 3: the three cheapest overall are 0.1 (a), 0.2 and 0.3 (b).
    got = select_groups([a, b], 0.5, "global")
    assert got[0].tolist() == [False, True, False]
    assert got[1].tolist() == [True, False, True]


# ---------------------------------------------------------------------------- global with bounds
@st.composite
def bounded_cases(draw: st.DrawFn) -> tuple[list[int], int, int, Fraction, Fraction, Fraction, int]:
    layers = draw(st.integers(2, 3))
    groups = [draw(st.integers(1, 8 if layers == 2 else 5)) for _ in range(layers)]
    group_size = draw(st.integers(1, 3))
    # numel above groups * group_size models patterns such as N:M, where a group zeroes part of its run.
    spread = draw(st.integers(1, 2))
    low = draw(fractions(20, 0, 12))
    high = draw(fractions(20, 8, 20))
    assume(low <= high)
    sparsity = draw(fractions(40))
    return groups, group_size, spread, low, high, sparsity, draw(st.integers(0, 2**31 - 1))


def all_subsets(sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every subset of all groups as a bit matrix, and its per-layer counts."""
    n = sum(sizes)
    bits = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.int64)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    per_layer = np.stack([bits[:, owner == i].sum(1) for i in range(len(sizes))], axis=1)
    return bits, per_layer


@SETTINGS
@given(bounded_cases())
def test_global_with_bounds_is_feasible_closest_and_optimal(
    case: tuple[list[int], int, int, Fraction, Fraction, Fraction, int],
) -> None:
    groups, group_size, spread, low, high, sparsity, seed = case
    numels = [g * group_size * spread for g in groups]
    effective_low = min(low, sparsity)
    bounds = [
        exact_bounds(g, group_size, n, effective_low, high) for g, n in zip(groups, numels, strict=True)
    ]
    assume(all(lo <= hi for lo, hi in bounds))
    costs = distinct_costs(sum(groups), seed)
    layers = [LayerGroups(c, group_size, n) for c, n in zip(split(costs, groups), numels, strict=True)]

    selected = select_groups(layers, float(sparsity), "global", float(low), float(high))

    counts = [int(s.sum()) for s in selected]
    for count, numel, (lo, hi) in zip(counts, numels, bounds, strict=True):
        layer_sparsity = Fraction(count * group_size, numel)
        assert effective_low <= layer_sparsity <= high
        assert lo <= count <= hi
    # The total is as close to the whole-weight budget as any feasible total can be.
    total = sum(counts)
    feasible = range(sum(lo for lo, _ in bounds), sum(hi for _, hi in bounds) + 1)
    closest = set()
    for budget in nearest_ints(sparsity * sum(numels)):
        best = min(abs(t * group_size - budget) for t in feasible)
        closest |= {t for t in feasible if abs(t * group_size - budget) == best}
    assert total in closest
    # Among every subset of groups with that total and within the bounds, none costs less.
    bits, per_layer = all_subsets(groups)
    lows = np.array([lo for lo, _ in bounds])
    highs = np.array([hi for _, hi in bounds])
    ok = (per_layer >= lows).all(1) & (per_layer <= highs).all(1) & (bits.sum(1) == total)
    subset_costs = bits @ costs.double().numpy()
    optimum = subset_costs[ok].min()
    got = float(torch.cat(selected).double() @ costs.double())
    assert got == pytest.approx(optimum, abs=1e-6)


def test_global_min_bound_is_capped_at_the_requested_sparsity() -> None:
    # min 50% per layer, but only 25% asked for: the floor drops to 25%.
    a = LayerGroups(torch.tensor([0.0, 0.1, 0.2, 0.3]), 1, 4)
    b = LayerGroups(torch.tensor([5.0, 6.0, 7.0, 8.0]), 1, 4)
    got = select_groups([a, b], 0.25, "global", min_sparsity=0.5)
    # 25% of 8 = 2 weights and each layer needs >= 25% = 1 group: one each (uncapped, 4 in all).
    assert got[0].tolist() == [True, False, False, False]
    assert got[1].tolist() == [True, False, False, False]


def test_global_max_bound_spills_to_the_next_cheapest_layer() -> None:
    a = LayerGroups(torch.tensor([0.0, 0.1, 0.2, 0.3]), 1, 4)
    b = LayerGroups(torch.tensor([5.0, 6.0, 7.0, 8.0]), 1, 4)
    got = select_groups([a, b], 0.5, "global", max_sparsity=0.75)
    assert got[0].tolist() == [True, True, True, False]
    assert got[1].tolist() == [True, False, False, False]


# ---------------------------------------------------------------------------- local
@st.composite
def local_cases(draw: st.DrawFn) -> tuple[list[tuple[int, int, int]], Fraction, Fraction, Fraction, int]:
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        groups = draw(st.integers(1, 16))
        group_size = draw(st.integers(1, 4))
        layers.append((groups, group_size, groups * group_size * draw(st.integers(1, 2))))
    low = draw(fractions(20, 0, 10))
    high = draw(fractions(20, 10, 20))
    return layers, low, high, draw(fractions(40)), draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(local_cases())
def test_local_prunes_each_layer_to_its_rounded_count(
    case: tuple[list[tuple[int, int, int]], Fraction, Fraction, Fraction, int],
) -> None:
    shapes, low, high, sparsity, seed = case
    effective_low = min(low, sparsity)
    bounds = [exact_bounds(g, size, n, effective_low, high) for g, size, n in shapes]
    assume(all(lo <= hi for lo, hi in bounds))
    costs = split(distinct_costs(sum(g for g, _, _ in shapes), seed), [g for g, _, _ in shapes])
    layers = [LayerGroups(c, size, n) for c, (_, size, n) in zip(costs, shapes, strict=True)]

    selected = select_groups(layers, float(sparsity), "local", float(low), float(high))

    for chosen, layer, (lo, hi) in zip(selected, layers, bounds, strict=True):
        wanted = {min(hi, max(lo, k)) for k in nearest_ints(sparsity * layer.numel / layer.group_size)}
        count = int(chosen.sum())
        assert count in wanted
        assert torch.equal(chosen, cheapest(layer.costs, count))


def test_local_by_hand() -> None:
    a = LayerGroups(torch.tensor([3.0, 1.0, 2.0, 0.0]), 1, 4)
    b = LayerGroups(torch.tensor([-1.0, 9.0]), 2, 4)
    got = select_groups([a, b], 0.5, "local")
    assert got[0].tolist() == [False, True, False, True]
    assert got[1].tolist() == [True, False]


# ---------------------------------------------------------------------------- non-uniform group sizes
@st.composite
def channel_cases(draw: st.DrawFn) -> tuple[list[tuple[int, int]], Fraction, Fraction, Fraction, int]:
    # Like "1xchannel" across layers of different widths: a group is one row of `width` weights.
    layers = [(draw(st.integers(1, 10)), draw(st.integers(1, 9))) for _ in range(draw(st.integers(2, 4)))]
    low = draw(fractions(20, 0, 10))
    high = draw(fractions(20, 10, 20))
    return layers, low, high, draw(fractions(40)), draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(channel_cases())
def test_global_non_uniform_groups_respect_bounds_and_budget(
    case: tuple[list[tuple[int, int]], Fraction, Fraction, Fraction, int],
) -> None:
    shapes, low, high, sparsity, seed = case
    effective_low = min(low, sparsity)
    bounds = [exact_bounds(rows, width, rows * width, effective_low, high) for rows, width in shapes]
    assume(all(lo <= hi for lo, hi in bounds))
    costs = split(distinct_costs(sum(r for r, _ in shapes), seed), [r for r, _ in shapes])
    layers = [LayerGroups(c, width, rows * width) for c, (rows, width) in zip(costs, shapes, strict=True)]

    selected = select_groups(layers, float(sparsity), "global", float(low), float(high))

    counts = [int(s.sum()) for s in selected]
    for chosen, count, layer in zip(selected, counts, layers, strict=True):
        assert effective_low <= Fraction(count * layer.group_size, layer.numel) <= high
        assert torch.equal(chosen, cheapest(layer.costs, count)), "a layer did not prune its cheapest groups"
    pruned = sum(c * layer.group_size for c, layer in zip(counts, layers, strict=True))
    reachable_low = sum(lo * layer.group_size for (lo, _), layer in zip(bounds, layers, strict=True))
    reachable_high = sum(hi * layer.group_size for (_, hi), layer in zip(bounds, layers, strict=True))
    wanted = min(max(sparsity * sum(layer.numel for layer in layers), reachable_low), reachable_high)
    largest = max(layer.group_size for layer in layers)
    assert abs(pruned - wanted) <= largest, (pruned, float(wanted), largest)
    # One threshold: an optional group taken in one layer never costs more than one left in another.
    for i, (chosen_i, (lo_i, _)) in enumerate(zip(selected, bounds, strict=True)):
        if counts[i] <= lo_i:
            continue
        taken = float(layers[i].costs[chosen_i].max())
        for j, (chosen_j, (_, hi_j)) in enumerate(zip(selected, bounds, strict=True)):
            if i != j and counts[j] < hi_j:
                assert taken <= float(layers[j].costs[~chosen_j].min())


# ---------------------------------------------------------------------------- -inf and ties
@SETTINGS
@given(
    st.lists(st.integers(1, 12), min_size=1, max_size=4),
    fractions(20, 1, 19),
    st.sampled_from(["global", "local"]),
    st.data(),
    st.integers(0, 2**31 - 1),
)
def test_minus_inf_groups_are_selected_first(
    groups: list[int], sparsity: Fraction, scope: str, data: st.DataObject, seed: int
) -> None:
    costs = split(distinct_costs(sum(groups), seed), groups)
    generator = torch.Generator().manual_seed(seed + 1)
    dead = []
    for c in costs:
        # At most floor(sparsity * groups) already pruned, so every scope's count can hold them.
        how_many = data.draw(st.integers(0, math.floor(sparsity * c.numel())))
        index = torch.randperm(c.numel(), generator=generator)[:how_many]
        c[index] = float("-inf")
        dead.append(torch.isinf(c))
    layers = [LayerGroups(c, 1, c.numel()) for c in costs]

    selected = select_groups(layers, float(sparsity), scope)

    for chosen, was_dead, layer in zip(selected, dead, layers, strict=True):
        assert bool(chosen[was_dead].all()), "an already-pruned group was not selected"
        if scope == "local" and int(chosen.sum()) > int(was_dead.sum()):
            live = ~was_dead
            assert torch.equal(
                chosen[live], cheapest(layer.costs[live], int(chosen.sum()) - int(was_dead.sum()))
            )


@SETTINGS
@given(
    st.lists(st.integers(1, 12), min_size=1, max_size=4),
    fractions(),
    st.sampled_from(["global", "local"]),
    st.integers(0, 2**31 - 1),
)
def test_ties_are_deterministic(groups: list[int], sparsity: Fraction, scope: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    costs = torch.randint(0, 3, (sum(groups),), generator=generator).float()
    make = lambda: [LayerGroups(c, 1, c.numel()) for c in split(costs, groups)]  # noqa: E731
    first = select_groups(make(), float(sparsity), scope)
    second = select_groups(make(), float(sparsity), scope)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # Ties never make a layer skip a cheaper group for a dearer one.
    for chosen, c in zip(first, split(costs, groups), strict=True):
        if bool(chosen.any()) and not bool(chosen.all()):
            assert float(c[chosen].max()) <= float(c[~chosen].min())


def test_ties_break_by_layer_order_then_position() -> None:
    layers = [LayerGroups(torch.zeros(3), 1, 3), LayerGroups(torch.zeros(3), 1, 3)]
    got = select_groups(layers, 4 / 6, "global")
    assert got[0].tolist() == [True, True, True]
    assert got[1].tolist() == [True, False, False]


def test_unknown_scope_raises() -> None:
    with pytest.raises(ValueError, match="scope"):
        select_groups([LayerGroups(torch.zeros(2), 1, 2)], 0.5, "sideways")

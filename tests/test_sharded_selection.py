"""The selection over costs split between ranks (FSDP2 rows) equals one process's over all of them.

Ranks are threads here, joined by in-memory collectives with the semantics of
``sharding.ProcessGroupCollectives`` (sum over ranks; sum over the ranks below): the selection logic
is checked on any split, tie pattern and bound, without processes. The real collectives run in
``tests/test_fsdp.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_prune.thresholds import LayerGroups, Span, select_groups


class ThreadCollectives:
    """In-memory collectives among ``world_size`` threads (every rank calls each in the same order)."""

    def __init__(self, shared: dict[str, Any], rank: int, world_size: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, world_size

    def _exchange(self, value: Tensor) -> list[Tensor]:
        barrier: threading.Barrier = self.shared["barrier"]
        slots: list[Any] = self.shared["slots"]
        barrier.wait()
        slots[self.rank] = value.clone()
        barrier.wait()
        gathered = list(slots)
        barrier.wait()
        return gathered

    def sum(self, counts: Tensor) -> Tensor:
        return torch.stack(self._exchange(counts)).sum(0)

    def before(self, counts: Tensor) -> Tensor:
        gathered = self._exchange(counts)
        return torch.stack(gathered[: self.rank]).sum(0) if self.rank else torch.zeros_like(counts)


def run_ranks(world_size: int, work: Callable[[ThreadCollectives], Any]) -> list[Any]:
    shared: dict[str, Any] = {"barrier": threading.Barrier(world_size), "slots": [None] * world_size}
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = work(ThreadCollectives(shared, rank, world_size))
        except BaseException as error:  # re-raised below, in the test thread
            errors.append(error)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def split_rows(rows: int, world_size: int) -> list[tuple[int, int]]:
    """torch.chunk's split of ``rows`` (FSDP2's Shard(0)): ceil(rows / ranks) each, the last ranks short."""
    size = -(-rows // world_size)
    return [(min(rows, r * size), min(rows, (r + 1) * size)) for r in range(world_size)]


def shard_layers(
    costs: list[Tensor], collectives: ThreadCollectives, replicated: list[bool], group_size: int = 1
) -> list[LayerGroups]:
    """Rank ``rank``'s LayerGroups: each layer's rows of costs (2-D: rows x groups per row)."""
    layers = []
    for full, whole in zip(costs, replicated, strict=True):
        numel = full.numel() * group_size
        span = Span(full.numel(), numel, whole, collectives)
        if whole:
            layers.append(LayerGroups(full.flatten(), group_size, numel, span=span))
            continue
        start, end = split_rows(full.shape[0], collectives.world_size)[collectives.rank]
        part = full[start:end].flatten()
        layers.append(LayerGroups(part, group_size, part.numel() * group_size, span=span))
    return layers


def check_split_equals_whole(
    costs: list[Tensor],
    sparsity: float,
    scope: str,
    world_size: int,
    replicated: list[bool] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> None:
    replicated = replicated or [False] * len(costs)
    whole = [LayerGroups(c.flatten(), 1, c.numel()) for c in costs]
    expected = select_groups(whole, sparsity, scope, *bounds)

    def work(collectives: ThreadCollectives) -> list[Tensor]:
        return select_groups(shard_layers(costs, collectives, replicated), sparsity, scope, *bounds)

    per_rank = run_ranks(world_size, work)
    for i, want in enumerate(expected):
        if replicated[i]:
            for rank in range(world_size):
                assert torch.equal(per_rank[rank][i], want), f"layer {i}, rank {rank}"
            continue
        got = torch.cat([per_rank[rank][i] for rank in range(world_size)])
        assert torch.equal(got, want), f"layer {i}: {int(got.sum())} pruned, one process {int(want.sum())}"


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_distinct_costs_split_over_ranks_select_what_one_process_selects(scope: str, world_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    costs = [
        torch.rand(rows, 16, generator=generator) * scale for rows, scale in ((8, 1.0), (5, 2.0), (9, 0.5))
    ]
    for sparsity in (0.1, 0.5, 0.93):
        check_split_equals_whole(costs, sparsity, scope, world_size)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_ties_at_the_crossing_go_by_position_across_ranks(scope: str) -> None:
    # Every cost equal, or a few values: the ties must go to the lowest positions, i.e. rank 0's first.
    costs = [torch.ones(6, 10), torch.tensor([0.0, 1.0, 1.0, 2.0]).repeat(7, 2)]
    for sparsity in (0.25, 0.5, 0.77):
        check_split_equals_whole(costs, sparsity, scope, world_size=2)
        check_split_equals_whole(costs, sparsity, scope, world_size=4)


def test_replicated_layers_are_counted_once_and_bounds_hold() -> None:
    # The second layer's costs are whole on every rank (channelx1 costs combined over the ranks).
    generator = torch.Generator().manual_seed(1)
    costs = [torch.rand(8, 12, generator=generator), torch.rand(1, 30, generator=generator)]
    for sparsity in (0.3, 0.6):
        check_split_equals_whole(costs, sparsity, "global", 2, replicated=[False, True])
        check_split_equals_whole(costs, sparsity, "global", 2, replicated=[False, True], bounds=(0.2, 0.7))


def test_non_finite_costs_and_empty_shards() -> None:
    # Pruned groups are -inf, broken ones NaN; 3 rows over 4 ranks leaves rank 3 with none.
    costs = torch.tensor([[float("-inf"), 0.5, float("nan")], [0.2, float("-inf"), 0.7], [0.1, 0.9, 0.3]])
    for sparsity in (0.3, 0.7, 1.0):
        check_split_equals_whole([costs], sparsity, "global", world_size=4)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 7), st.integers(1, 6)), min_size=1, max_size=3),
    st.integers(2, 3),
    st.floats(0.0, 1.0),
    st.sampled_from(["global", "local"]),
    st.integers(0, 2**31 - 1),
    st.integers(1, 4),
)
def test_any_split_matches_one_process(
    shapes: list[tuple[int, int]], world_size: int, sparsity: float, scope: str, seed: int, levels: int
) -> None:
    # Few distinct values (levels) make ties at the crossing the rule, not the exception.
    generator = torch.Generator().manual_seed(seed)
    costs = [torch.randint(0, levels, shape, generator=generator).float() for shape in shapes]
    check_split_equals_whole(costs, sparsity, scope, world_size, bounds=(0.0, 0.9))

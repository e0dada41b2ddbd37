"""The ``"row"`` scope: every output row of a layer is pruned to the target on its own (Wanda's
comparison group). Expected choices come from a stable argsort of each row, never from the module
under test."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_prune import Pruner, PruningCallback, PruningOptions, Schedule
from lightning_prune.thresholds import LayerGroups, lowest_in_rows, select_groups

SPECIAL = [float("-inf"), float("inf"), float("nan"), -0.0, 0.0]


def sorted_choice(values: Tensor, k: int) -> Tensor:
    """The first ``k`` of each row in a stable sort (NaN last, -0.0 equal to 0.0, ties by index)."""
    pruned = torch.zeros_like(values, dtype=torch.bool)
    for row, order in zip(pruned, values.argsort(dim=1, stable=True), strict=True):
        row[order[:k]] = True
    return pruned


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 12),
    st.integers(0, 12),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["distinct", "ties", "special"]),
)
def test_lowest_in_rows_takes_what_a_stable_sort_of_each_row_takes(
    rows: int, width: int, k: int, seed: int, kind: str
) -> None:
    generator = torch.Generator().manual_seed(seed)
    if kind == "distinct":
        values = torch.randn(rows, width, generator=generator)
    else:  # few distinct values: many ties at the cut
        values = torch.randint(0, 3, (rows, width), generator=generator).float()
        if kind == "special":
            picks = torch.randint(0, len(SPECIAL), (rows, width), generator=generator)
            use = torch.rand(rows, width, generator=generator) < 0.5
            values = torch.where(use, torch.tensor(SPECIAL)[picks], values)
    k = min(k, width)
    assert torch.equal(lowest_in_rows(values, k), sorted_choice(values, k))


def test_row_scope_by_hand() -> None:
    # Two rows of four weights at 50%: each row loses its own two cheapest, although row 1's
    # costs are all above row 0's (global or local scope would take all of row 0).
    costs = torch.tensor([[1.0, 4.0, 2.0, 3.0], [40.0, 10.0, 30.0, 20.0]])
    (got,) = select_groups([LayerGroups(costs.flatten(), 1, 8, rows=2)], 0.5, "row")
    assert got.view(2, 4).tolist() == [[True, False, True, False], [False, True, False, True]]
    (local,) = select_groups([LayerGroups(costs.flatten(), 1, 8)], 0.5, "local")
    assert local.view(2, 4).tolist() == [[True, True, True, True], [False, False, False, False]]


def test_row_scope_counts_groups_per_row_and_honours_the_per_row_bounds() -> None:
    # Rows of 3 groups of 2 weights (N:M-like costs): 1/3 of each row is one group; a cap of 0.5
    # per row allows one group (2 of 6 weights), so 0.9 asked still prunes one group per row.
    costs = torch.tensor([[3.0, 1.0, 2.0], [5.0, 6.0, 4.0]]).flatten()
    layer = LayerGroups(costs, group_size=2, numel=12, rows=2)
    (third,) = select_groups([layer], 1 / 3, "row")
    assert third.view(2, 3).tolist() == [[False, True, False], [False, False, True]]
    (capped,) = select_groups([layer], 0.9, "row", max_sparsity=0.5)
    assert capped.view(2, 3).tolist() == [[False, True, False], [False, False, True]]


def test_unknown_scope_names_the_row_scope_among_the_accepted() -> None:
    with pytest.raises(ValueError, match=r"'sideways' is not one of \['global', 'local', 'row'\]"):
        select_groups([LayerGroups(torch.zeros(2), 1, 2)], 0.5, "sideways")


# ------------------------------------------------------------------------------ through the Pruner
def test_row_scope_prunes_every_output_row_to_the_target() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8))
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.01, 10, 12)[:, None])  # rows of very different scales
    magnitude = model[0].weight.detach().abs().clone()
    pruner = Pruner(model, Schedule(0, 0), PruningOptions(target_sparsity=0.5, pattern="1x1", scope="row"))
    pruner.prune(0.5)
    (mask,) = pruner.masks
    assert mask.sum(dim=1).tolist() == [8] * 12
    assert torch.equal(~mask, sorted_choice(magnitude, 8))  # each row's 8 smallest


def test_row_scope_with_n_m_makes_the_same_share_of_groups_n_m_in_every_row() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.01, 10, 6)[:, None])
    pruner = Pruner(model, Schedule(0, 0), PruningOptions(target_sparsity=0.25, pattern="2:4", scope="row"))
    pruner.prune(0.25)
    groups = pruner.masks[0].view(6, 4, 4)
    assert (groups.sum(dim=-1) == 2).sum(dim=1).tolist() == [2] * 6  # half the groups of every row


def test_row_scope_refuses_a_pattern_with_one_group_per_row() -> None:
    with pytest.raises(ValueError, match=r"scope='row'.*'1xchannel' has one group per row"):
        PruningOptions(pattern="1xchannel", scope="row")
    PruningOptions(pattern="4x1", scope="row")  # a band of 4 rows holds many blocks
    assert PruningCallback(pattern="2:4", target_sparsity=0.5, scope="row").options.scope == "row"

"""The histogram selection chooses exactly what the simple sort-based reference chooses."""

from __future__ import annotations

import pytest
import reference_selection
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_prune import thresholds
from lightning_prune.thresholds import LayerGroups, lowest, select_groups


@st.composite
def layer_sets(draw: st.DrawFn) -> tuple[list[LayerGroups], float, float, float]:
    count = draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    layers = []
    for _ in range(count):
        groups = draw(st.integers(1, 400))
        size = draw(st.sampled_from([1, 2, 4, 16]))
        # Few distinct values make many ties; some groups already pruned (-inf).
        distinct = draw(st.sampled_from([3, 50, 100_000]))
        costs = torch.randint(0, distinct, (groups,), generator=generator).float() / distinct
        costs[torch.rand(groups, generator=generator) < draw(st.sampled_from([0.0, 0.3]))] = float("-inf")
        numel = groups * size * draw(st.sampled_from([1, 2]))  # N:M-like layers hold more weights than groups
        layers.append(LayerGroups(costs, size, numel))
    sparsity = draw(st.sampled_from([0.0, 0.1, 0.33, 0.5, 0.75, 0.9, 0.99]))
    low = draw(st.sampled_from([0.0, 0.2, 0.5]))
    high = draw(st.sampled_from([0.5, 0.8, 0.98, 1.0]))
    return layers, sparsity, min(low, high), high


@pytest.fixture(params=[thresholds.EXACT_BELOW, 8], ids=["exact-sort", "histogram-rounds"])
def exact_below(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    # A tiny limit forces the histogram narrowing on small inputs; the patch holds for every example.
    monkeypatch.setattr(thresholds, "EXACT_BELOW", request.param)
    monkeypatch.setattr(thresholds, "BINS", 16 if request.param == 8 else thresholds.BINS)
    return int(request.param)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layer_sets(), scope=st.sampled_from(["global", "local"]))
def test_same_choice_as_the_sort_based_reference(
    exact_below: int, case: tuple[list[LayerGroups], float, float, float], scope: str
) -> None:
    layers, sparsity, low, high = case
    fast = select_groups(layers, sparsity, scope, low, high)
    reference = reference_selection.select_groups(layers, sparsity, scope, low, high)
    for f, r in zip(fast, reference, strict=True):
        assert torch.equal(f, r)


def test_lowest_breaks_ties_by_index() -> None:
    values = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, float("-inf")])
    assert lowest(values, 3).tolist() == [False, True, False, True, False, True]
    assert lowest(values, 0).sum() == 0
    assert lowest(values, 99).all()


def test_large_input_takes_the_histogram_path_and_stays_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    costs = [torch.rand(300_000, generator=generator), torch.rand(200_000, generator=generator) * 2]
    layers = [LayerGroups(c, 1, c.numel()) for c in costs]
    assert sum(c.numel() for c in costs) > thresholds.EXACT_BELOW
    fast = select_groups(layers, 0.7, "global", 0.0, 0.98)
    reference = reference_selection.select_groups(layers, 0.7, "global", 0.0, 0.98)
    for f, r in zip(fast, reference, strict=True):
        assert torch.equal(f, r)

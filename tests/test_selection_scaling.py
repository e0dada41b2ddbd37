"""The sort-free selection chooses exactly what the simple sort-based reference chooses, whatever the
costs hold (ties, exact zeros, all-equal layers, NaN, +-inf, -0.0), on every internal path, and its
work stays bounded: a few passes over the costs, not one per narrowing round. N:M picks within each
group exactly what a stable argsort per group picked, without sorting."""

from __future__ import annotations

import math

import pytest
import reference_selection
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_prune import patterns, thresholds
from lightning_prune.patterns import NM_BLOCK, REDUCTIONS, NMPattern, _sorting_network, parse_pattern
from lightning_prune.thresholds import LayerGroups, lowest, select_groups

KINDS = ["distinct", "few", "zeros", "equal", "nonfinite", "signed"]


def make_costs(kind: str, count: int, generator: torch.Generator) -> Tensor:
    """Costs of one layer with the ties or special values of ``kind``."""
    costs = torch.rand(count, generator=generator)
    if kind == "few":  # coarse scores: few distinct values, ties everywhere
        costs = torch.randint(0, 3, (count,), generator=generator).float() / 3
    elif kind == "zeros":  # exact zeros (already-zero weights), some negative zero
        draw = torch.rand(count, generator=generator)
        costs[draw < 0.6] = 0.0
        costs[draw < 0.1] = -0.0
    elif kind == "equal":
        costs.fill_(0.25)
    elif kind == "nonfinite":  # NaN ranks above +inf; NaN group costs come from mean(-inf, +inf)
        draw = torch.rand(count, generator=generator)
        costs[draw < 0.1] = float("nan")
        costs[(draw >= 0.1) & (draw < 0.2)] = float("inf")
        costs[(draw >= 0.2) & (draw < 0.25)] = -0.0
    elif kind == "signed":  # movement scores are signed
        costs = torch.randn(count, generator=generator)
    return costs


@st.composite
def layer_sets(draw: st.DrawFn) -> tuple[list[LayerGroups], float, float, float]:
    count = draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    layers = []
    for _ in range(count):
        groups = draw(st.integers(1, 400))
        size = draw(st.sampled_from([1, 2, 4, 16]))
        costs = make_costs(draw(st.sampled_from(KINDS)), groups, generator)
        # Some groups already pruned (-inf).
        costs[torch.rand(groups, generator=generator) < draw(st.sampled_from([0.0, 0.3]))] = float("-inf")
        costs = costs.to(draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float64])))
        numel = groups * size * draw(st.sampled_from([1, 2]))  # N:M-like layers hold more weights than groups
        layers.append(LayerGroups(costs, size, numel))
    sparsity = draw(st.sampled_from([0.0, 0.1, 0.33, 0.5, 0.75, 0.9, 0.99]))
    low = draw(st.sampled_from([0.0, 0.2, 0.5]))
    high = draw(st.sampled_from([0.5, 0.8, 0.98, 1.0]))
    return layers, sparsity, min(low, high), high


# Each setting drives a different path of the selection on small inputs.
PATHS = {
    "default": {},
    # many chunks, a tiny sample (so brackets are wide or wrong), a coarse estimate grid
    "chunked-small-sample": {"CHUNK": 7, "SAMPLE": 16, "GRID": 4},
    # no margin: brackets often miss, so the radix select over all costs runs
    "missed-bracket": {"SIGMAS": 0.0, "CHUNK": 64, "SAMPLE": 32},
    # nothing may be extracted: the radix select over all costs, in many 2-bin rounds
    "radix-only": {"EXTRACT_LIMIT": 0.0, "SAMPLE": 0, "RADIX_BINS": 2, "CHUNK": 33},
}


@pytest.fixture(params=list(PATHS))
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in PATHS[request.param].items():
        monkeypatch.setattr(thresholds, name, value)
    return str(request.param)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layer_sets(), scope=st.sampled_from(["global", "local"]))
def test_same_choice_as_the_sort_based_reference(
    path: str, case: tuple[list[LayerGroups], float, float, float], scope: str
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


def test_order_of_special_values_by_hand() -> None:
    # -inf < -1 < -0.0 == 0.0 < 2 < +inf < NaN; equal values by position.
    values = torch.tensor([float("nan"), 0.0, float("inf"), -0.0, 2.0, -1.0, float("-inf"), float("nan")])
    expected_order = [6, 5, 1, 3, 4, 2, 0, 7]
    for k in range(values.numel() + 1):
        chosen = lowest(values, k)
        assert sorted(chosen.nonzero().flatten().tolist()) == sorted(expected_order[:k]), k


def test_ties_across_layers_go_to_the_first_layer_then_position() -> None:
    nan = float("nan")
    layers = [
        LayerGroups(torch.tensor([nan, 1.0, nan]), 1, 3),
        LayerGroups(torch.tensor([nan, nan, 0.0]), 1, 3),
    ]
    got = select_groups(layers, 4 / 6, "global")  # 0.0 and 1.0, then two of the four NaN
    assert got[0].tolist() == [True, True, True]
    assert got[1].tolist() == [False, False, True]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_large_inputs_stay_exact(kind: str, sparsity: float) -> None:
    # Large enough that the sample is a small fraction and the passes run in several chunks.
    generator = torch.Generator().manual_seed(0)
    costs = [make_costs(kind, 300_000, generator), make_costs(kind, 200_000, generator) * 2]
    costs[0][:100_000] = float("-inf")  # masks only grow: a third of one layer already pruned
    layers = [LayerGroups(c, 1, c.numel()) for c in costs]
    assert sum(c.numel() for c in costs) > 2 * thresholds.SAMPLE
    fast = select_groups(layers, sparsity, "global", 0.0, 0.98)
    reference = reference_selection.select_groups(layers, sparsity, "global", 0.0, 0.98)
    for f, r in zip(fast, reference, strict=True):
        assert torch.equal(f, r)


def test_empty_and_all_nan_layers() -> None:
    nan = float("nan")
    layers = [
        LayerGroups(torch.empty(0), 1, 0),
        LayerGroups(torch.full((5,), nan), 1, 5),
        LayerGroups(torch.tensor([nan, 2.0, nan]), 1, 3),
    ]
    for sparsity in (0.25, 0.5, 0.75):
        fast = select_groups(layers, sparsity, "global")
        reference = reference_selection.select_groups(layers, sparsity, "global")
        assert all(torch.equal(f, r) for f, r in zip(fast, reference, strict=True))


@pytest.mark.parametrize(
    "bracket",
    [
        thresholds._Bracket(-float("inf"), float("inf"), None, False),  # holds everything: too much
        thresholds._Bracket(0.9, 0.95, None, False),  # misses: the crossing is near 0.5
        thresholds._Bracket(0.1, 0.2, 0.15, True),  # misses, with a heavy value
    ],
    ids=["too-wide", "missed", "missed-heavy"],
)
def test_a_misleading_bracket_costs_time_not_exactness(
    bracket: thresholds._Bracket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(thresholds, "_bracket", lambda *args: bracket)
    monkeypatch.setattr(thresholds, "SAMPLE", 16)  # with the floor of the extraction limit
    generator = torch.Generator().manual_seed(3)
    costs = [torch.rand(3000, generator=generator), torch.rand(2000, generator=generator)]
    costs[0][:500] = 0.15
    layers = [LayerGroups(c, 1, c.numel()) for c in costs]
    fast = select_groups(layers, 0.5, "global")
    reference = reference_selection.select_groups(layers, 0.5, "global")
    assert all(torch.equal(f, r) for f, r in zip(fast, reference, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "most_rounds"), [(torch.float32, 3), (torch.float64, 6)])
@pytest.mark.parametrize("kind", KINDS)
def test_radix_select_over_all_costs_takes_bounded_rounds(
    dtype: torch.dtype, most_rounds: int, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(thresholds, "_bracket", lambda *args: None)  # as when the sample misleads
    rounds = []
    bincount = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: rounds.append(1) or bincount(*a, **k))
    generator = torch.Generator().manual_seed(4)
    costs = make_costs(kind, 50_000, generator).to(dtype) * 1e30 ** torch.rand(50_000, generator=generator)
    fast = select_groups([LayerGroups(costs, 1, costs.numel())], 0.37, "global")
    assert 1 <= len(rounds) <= most_rounds  # one layer in one chunk: one histogram per round
    reference = reference_selection.select_groups([LayerGroups(costs, 1, costs.numel())], 0.37, "global")
    assert torch.equal(fast[0], reference[0])


# ---------------------------------------------------------------------------- bounded work
class Work(TorchDispatchMode):
    """Counts, over every non-view op, the largest tensor it touches; and the largest sort input."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0
        self.largest_sort = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)]
            self.elements += max((t.numel() for t in tensors), default=0)
            if func.overloadpacket in (torch.ops.aten.sort, torch.ops.aten.kthvalue, torch.ops.aten.topk):
                self.largest_sort = max(self.largest_sort, args[0].numel())
        return out


def work_of(kind: str, sparsity: float, count: int = 1 << 19) -> Work:
    generator = torch.Generator().manual_seed(1)
    costs = make_costs(kind, count, generator)
    if kind == "pruned":
        costs[torch.rand(count, generator=generator) < 0.5] = float("-inf")
    layers = [LayerGroups(c.clone(), 1, c.numel()) for c in costs.split([count // 2, count // 4, count // 4])]
    work = Work()
    with work:
        select_groups(layers, sparsity, "global")
    return work


# (distribution, sparsity): crossings inside ties, at the edge of the already-pruned mass, in NaN.
CASES = [(k, s) for k in [*KINDS, "pruned"] for s in (0.5, 0.9)] + [("pruned", 0.6), ("nonfinite", 0.95)]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "sparsity"), CASES)
def test_work_is_a_few_passes_whatever_the_costs(kind: str, sparsity: float) -> None:
    count = 1 << 19
    work = work_of(kind, sparsity, count)
    # A pass is about one op per chunk over all costs; the old histogram narrowing spent hundreds of
    # passes on ties. Nothing near full size is sorted.
    assert work.elements <= 48 * count, f"{work.elements / count:.1f} passes"
    assert work.largest_sort <= count // 16


@pytest.mark.slow
def test_ties_cost_about_what_distinct_costs_cost() -> None:
    distinct = work_of("distinct", 0.9).elements
    for kind, sparsity in [("zeros", 0.5), ("equal", 0.9), ("few", 0.5), ("pruned", 0.6)]:
        assert work_of(kind, sparsity).elements <= 2 * distinct, kind


# ---------------------------------------------------------------------------- N:M within a group
def stable_argsort_reference(
    pattern: NMPattern, scores: Tensor, pruned_groups: Tensor
) -> tuple[Tensor, Tensor]:
    """What N:M did with a per-group stable argsort: costs of, and mask over, the lowest m - n."""
    groups = pattern.group_view(scores)
    lowest_m_n = groups.argsort(dim=-1, stable=True)[..., : pattern.m - pattern.n]
    costs = REDUCTIONS[pattern.reduce](groups.gather(-1, lowest_m_n), (-1,))
    pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest_m_n, True)
    pruned &= pruned_groups.unsqueeze(-1)
    return costs, pattern.from_group_view(pruned, scores.shape)


@pytest.mark.slow
@pytest.mark.parametrize("m", range(2, 17))
def test_sorting_network_sorts_every_zero_one_input(m: int) -> None:
    # The 0-1 principle: a comparator network that sorts every 0/1 input sorts every input.
    comparators = _sorting_network(m)
    for bits in range(1 << m):
        wires = [(bits >> i) & 1 for i in range(m)]
        for i, j in comparators:
            assert i < j
            wires[i], wires[j] = min(wires[i], wires[j]), max(wires[i], wires[j])
        assert wires == sorted(wires), bits


@st.composite
def nm_cases(draw: st.DrawFn) -> tuple[NMPattern, Tensor, Tensor]:
    m = draw(st.integers(2, 10))
    pattern = NMPattern(draw(st.integers(1, m - 1)), m, draw(st.sampled_from(sorted(REDUCTIONS))))
    shape = draw(st.sampled_from([(6, 3 * m), (4, 2 * m, 3, 3), (5, m, 2)]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    count = math.prod(shape)
    scores = make_costs(draw(st.sampled_from(KINDS)), count, generator).reshape(shape)
    scores[torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.3]))] = float("-inf")
    scores = scores.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64])))
    pruned_groups = torch.rand(pattern.group_view(scores).shape[:-1], generator=generator) < 0.7
    return pattern, scores, pruned_groups


@pytest.mark.slow
@pytest.mark.parametrize("block", [NM_BLOCK, 5], ids=["one-block", "many-blocks"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=nm_cases())
def test_nm_matches_a_stable_argsort_per_group(
    block: int, case: tuple[NMPattern, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patterns, "NM_BLOCK", block)
    pattern, scores, pruned_groups = case
    costs, mask = stable_argsort_reference(pattern, scores, pruned_groups)
    got = pattern.group_costs(scores)
    assert torch.equal(got.isnan(), costs.isnan())
    assert torch.equal(got.nan_to_num(), costs.nan_to_num())  # -0.0 and 0.0 compare equal here
    assert torch.equal(pattern.pruned_elements(pruned_groups, scores), mask)


@pytest.mark.parametrize("spec", ["2:4", "1:4", "4:8", "1:2"])
def test_nm_sorts_nothing(spec: str) -> None:
    pattern = parse_pattern(spec)
    assert isinstance(pattern, NMPattern)
    scores = torch.rand(64, 64)
    work = Work()
    with work:
        costs = pattern.group_costs(scores)
        pattern.pruned_elements(costs < costs.median(), scores)
    assert work.largest_sort <= costs.numel()  # the median above; no sort over the scores

"""Patterns: parsing, the masks they build, their group costs, tiling, and pruning end to end.

Every expectation here is worked out from the definition of the pattern in the canonical
channels-last layout, with helpers written for the tests (``permute``/``reshape``, pairwise ranks),
never with the module's own layout helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_prune.criteria import Criterion
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import (
    BlockPattern,
    ChannelPattern,
    NMPattern,
    Pattern,
    UnstructuredPattern,
    parse_pattern,
)
from lightning_prune.pruner import Pruner
from lightning_prune.schedules import Schedule

SETTINGS = settings(max_examples=50, deadline=None)
REDUCE = {
    "mean": lambda t: t.mean(),
    "sum": lambda t: t.sum(),
    "max": lambda t: t.max(),
}


# ---------------------------------------------------------------------------- independent layout helpers
def channels_last(w: Tensor) -> Tensor:
    """``(out, in, *kernel)`` -> ``(out, K, in)`` by permuting ``in`` to the end."""
    out, inp = w.shape[:2]
    if w.dim() == 2:
        return w.reshape(out, 1, inp)
    return w.permute(0, *range(2, w.dim()), 1).reshape(out, -1, inp)


def from_channels_last(c: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`channels_last`."""
    out, inp, *kernel = shape
    if not kernel:
        return c.reshape(out, inp)
    t = c.reshape(out, *kernel, inp)
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def kernel_size(shape: tuple[int, ...]) -> int:
    return math.prod(shape[2:])


# ---------------------------------------------------------------------------- pattern specs
@dataclass(frozen=True)
class Spec:
    """A pattern string and what the tests know about it from its definition."""

    kind: str  # "1x1", "NxM", "channelx1", "1xchannel", "N:M"
    n: int = 1
    m: int = 1

    @property
    def text(self) -> str:
        return {"NxM": f"{self.n}x{self.m}", "N:M": f"{self.n}:{self.m}"}.get(self.kind, self.kind)

    @property
    def row_mult(self) -> int:
        return self.n if self.kind == "NxM" else 1

    @property
    def col_mult(self) -> int:
        return self.m if self.kind in ("NxM", "N:M") else 1

    @property
    def max_sparsity(self) -> float:
        return 1 - self.n / self.m if self.kind == "N:M" else 1.0

    def group_size(self, shape: tuple[int, ...]) -> int:
        out, inp, k = shape[0], shape[1], kernel_size(shape)
        return {
            "1x1": 1,
            "NxM": self.n * self.m,
            "channelx1": out * k,
            "1xchannel": inp * k,
            "N:M": self.m - self.n,
        }[self.kind]

    def check_class(self, pattern: Pattern) -> None:
        if self.kind == "1x1":
            assert type(pattern) is UnstructuredPattern
        elif self.kind == "NxM":
            assert type(pattern) is BlockPattern
            assert (pattern.rows, pattern.cols) == (self.n, self.m)
        elif self.kind == "channelx1":
            assert type(pattern) is ChannelPattern
            assert pattern.dim == "input"
        elif self.kind == "1xchannel":
            assert type(pattern) is ChannelPattern
            assert pattern.dim == "output"
        else:
            assert type(pattern) is NMPattern
            assert (pattern.n, pattern.m) == (self.n, self.m)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    kind = draw(st.sampled_from(["1x1", "NxM", "channelx1", "1xchannel", "N:M"]))
    if kind == "NxM":
        n, m = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        return Spec("1x1") if n == m == 1 else Spec("NxM", n, m)
    if kind == "N:M":
        m = draw(st.integers(2, 8))
        return Spec("N:M", draw(st.integers(1, m - 1)), m)
    return Spec(kind)


@st.composite
def tiled_shapes(draw: st.DrawFn, spec: Spec, max_mult: int = 3) -> tuple[int, ...]:
    """A Linear (out, in) or Conv1d/2d/3d (out, in, *kernel) shape that ``spec`` tiles."""
    kernel_dims = draw(st.integers(0, 3))
    out = spec.row_mult * draw(st.integers(1, max_mult))
    inp = spec.col_mult * draw(st.integers(1, max_mult))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(kernel_dims))
    return (out, inp, *kernel)


@st.composite
def spec_and_shape(draw: st.DrawFn) -> tuple[Spec, tuple[int, ...]]:
    spec = draw(specs())
    return spec, draw(tiled_shapes(spec))


def distinct_scores(shape: tuple[int, ...], seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    return torch.randperm(numel, generator=generator).float().add_(1.0).reshape(shape)


# ---------------------------------------------------------------------------- the mask, from the definition
def expected_mask(spec: Spec, shape: tuple[int, ...], groups: Tensor, scores: Tensor) -> Tensor:
    """The pruned-weight mask that ``groups`` means, built from the pattern's definition.

    ``groups`` is laid out as the canonical ``(out, K, in)`` view implies: the weight's own shape for
    1x1, ``(out/N, K, in/M)`` blocks for NxM, one entry per input channel (channelx1) or per output
    filter (1xchannel), ``(out, K, in/M)`` runs for N:M.
    """
    out, inp, k = shape[0], shape[1], kernel_size(shape)
    if spec.kind == "1x1":
        return groups.clone()
    if spec.kind == "NxM":
        blocks = groups.reshape(out // spec.n, k, inp // spec.m)
        canonical = blocks.repeat_interleave(spec.n, dim=0).repeat_interleave(spec.m, dim=2)
        return from_channels_last(canonical, shape)
    if spec.kind == "channelx1":
        view = (1, inp) + (1,) * (len(shape) - 2)
        return groups.reshape(view).expand(shape).clone()
    if spec.kind == "1xchannel":
        view = (out,) + (1,) * (len(shape) - 1)
        return groups.reshape(view).expand(shape).clone()
    # N:M: in each run of M input weights at one kernel position, the M-N lowest scores go.
    runs = channels_last(scores).reshape(out, k, inp // spec.m, spec.m)
    rank = (runs.unsqueeze(-1) > runs.unsqueeze(-2)).sum(-1)  # how many in the run score lower
    lowest = rank < spec.m - spec.n
    pruned = lowest & groups.reshape(out, k, inp // spec.m).unsqueeze(-1)
    return from_channels_last(pruned.reshape(out, k, inp), shape)


def check_structure(spec: Spec, pruned: Tensor, scores: Tensor | None = None) -> None:
    """Assert that the pruned-weight mask ``pruned`` has the pattern's structure.

    For N:M with ``scores`` (distinct), the pruned weights of a run must be its lowest-scored.
    """
    shape = tuple(pruned.shape)
    out, inp, k = shape[0], shape[1], kernel_size(shape)
    if spec.kind == "1x1":
        return
    if spec.kind == "NxM":
        blocks = channels_last(pruned).reshape(out // spec.n, spec.n, k, inp // spec.m, spec.m)
        assert torch.equal(blocks.all(4).all(1), blocks.any(4).any(1)), "a block is partly pruned"
    elif spec.kind == "channelx1":
        per_channel = pruned.transpose(0, 1).reshape(inp, -1)
        assert torch.equal(per_channel.all(1), per_channel.any(1)), "an input channel is partly pruned"
    elif spec.kind == "1xchannel":
        per_filter = pruned.reshape(out, -1)
        assert torch.equal(per_filter.all(1), per_filter.any(1)), "an output filter is partly pruned"
    else:
        runs = channels_last(pruned).reshape(out, k, inp // spec.m, spec.m)
        lost = runs.sum(-1)
        assert bool(((lost == 0) | (lost == spec.m - spec.n)).all()), f"a run lost neither 0 nor M-N: {lost}"
        if scores is not None:
            values = channels_last(scores).reshape(out, k, inp // spec.m, spec.m)
            rank = (values.unsqueeze(-1) > values.unsqueeze(-2)).sum(-1)
            lowest = rank < spec.m - spec.n
            touched = (lost > 0).unsqueeze(-1)
            assert torch.equal(runs, lowest & touched), "a pruned run did not lose its lowest scores"


# ---------------------------------------------------------------------------- parsing
@SETTINGS
@given(specs())
def test_parse_pattern_class_and_round_trip(spec: Spec) -> None:
    pattern = parse_pattern(spec.text)
    spec.check_class(pattern)
    assert str(pattern) == spec.text
    assert parse_pattern(str(pattern)) == pattern
    assert parse_pattern(f"  {spec.text.upper()} ") == pattern
    assert parse_pattern(pattern) is pattern


# ---------------------------------------------------------------------------- masks
@SETTINGS
@given(spec_and_shape(), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_pruned_elements_count_and_structure(
    case: tuple[Spec, tuple[int, ...]], seed: int, density: float
) -> None:
    spec, shape = case
    pattern = parse_pattern(spec.text)
    assert pattern.tiling_error(torch.Size(shape)) is None
    scores = distinct_scores(shape, seed)
    costs = pattern.group_costs(scores)
    generator = torch.Generator().manual_seed(seed + 1)
    groups = torch.rand(costs.shape, generator=generator) < density

    pruned = pattern.pruned_elements(groups, scores)

    assert pruned.dtype == torch.bool
    assert tuple(pruned.shape) == shape
    assert pattern.group_size(torch.Size(shape)) == spec.group_size(shape)
    assert int(pruned.sum()) == int(groups.sum()) * spec.group_size(shape)
    check_structure(spec, pruned, scores)
    assert torch.equal(pruned, expected_mask(spec, shape, groups, scores))


@SETTINGS
@given(spec_and_shape(), st.integers(0, 2**31 - 1))
def test_group_costs_layout(case: tuple[Spec, tuple[int, ...]], seed: int) -> None:
    spec, shape = case
    out, inp, k = shape[0], shape[1], kernel_size(shape)
    costs = parse_pattern(spec.text).group_costs(distinct_scores(shape, seed))
    expected_groups = {
        "1x1": math.prod(shape),
        "NxM": (out // spec.n) * k * (inp // spec.m),
        "channelx1": inp,
        "1xchannel": out,
        "N:M": out * k * (inp // spec.m),
    }[spec.kind]
    assert costs.numel() == expected_groups
    # One group per weight-count share: every weight lies in exactly one group (N:M groups own M).
    covered = spec.m if spec.kind == "N:M" else spec.group_size(shape)
    assert costs.numel() * covered == math.prod(shape)


# ---------------------------------------------------------------------------- group costs
def sample_indices(count: int, seed: int, size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, size, (count,), generator=generator).tolist()


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from(sorted(REDUCE)),
    st.data(),
    st.integers(0, 2**31 - 1),
)
def test_block_costs_reduce_their_block(
    rows: int, cols: int, reduce: str, data: st.DataObject, seed: int
) -> None:
    spec = Spec("NxM", rows, cols)
    shape = data.draw(tiled_shapes(spec))
    out, inp, k = shape[0], shape[1], kernel_size(shape)
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    costs = BlockPattern(rows, cols, reduce).group_costs(scores)
    assert tuple(costs.shape) == (out // rows, k, inp // cols)
    canonical = channels_last(scores)
    picks = zip(
        sample_indices(6, seed, out // rows),
        sample_indices(6, seed + 1, k),
        sample_indices(6, seed + 2, inp // cols),
        strict=True,
    )
    for i, pos, j in picks:
        block = canonical[i * rows : (i + 1) * rows, pos, j * cols : (j + 1) * cols]
        assert block.numel() == rows * cols
        assert torch.isclose(costs[i, pos, j], REDUCE[reduce](block))


def test_block_costs_by_hand_on_a_conv() -> None:
    # Conv2d weight (out=2, in=4, 1, 2): channels-last puts the 2 kernel positions first, then in.
    w = torch.arange(16, dtype=torch.float64).reshape(2, 4, 1, 2)
    # Block (row 0..1, kernel position 0, in 0..1) holds w[0:2, 0:2, 0, 0] = {0, 2, 8, 10}.
    for reduce, value in (("mean", 5.0), ("sum", 20.0), ("max", 10.0)):
        costs = BlockPattern(2, 2, reduce).group_costs(w)
        assert costs.shape == (1, 2, 2)
        assert float(costs[0, 0, 0]) == value
    # Block (rows 0..1, kernel position 1, in 2..3) = w[0:2, 2:4, 0, 1] = {5, 7, 13, 15}.
    assert float(BlockPattern(2, 2, "sum").group_costs(w)[0, 1, 1]) == 40.0


@SETTINGS
@given(
    st.sampled_from(["input", "output"]),
    st.sampled_from(sorted(REDUCE)),
    st.data(),
    st.integers(0, 2**31 - 1),
)
def test_channel_costs_reduce_their_channel(dim: str, reduce: str, data: st.DataObject, seed: int) -> None:
    shape = data.draw(tiled_shapes(Spec("1x1"), max_mult=5))
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    costs = ChannelPattern(dim, reduce).group_costs(scores).flatten()
    channels = [scores[:, c] for c in range(shape[1])] if dim == "input" else list(scores)
    assert costs.numel() == len(channels)
    for index, channel in enumerate(channels):
        assert torch.isclose(costs[index], REDUCE[reduce](channel))


@SETTINGS
@given(st.integers(2, 8), st.data(), st.sampled_from(sorted(REDUCE)), st.integers(0, 2**31 - 1))
def test_nm_costs_reduce_the_weights_a_run_would_lose(
    m: int, data: st.DataObject, reduce: str, seed: int
) -> None:
    n = data.draw(st.integers(1, m - 1))
    spec = Spec("N:M", n, m)
    shape = data.draw(tiled_shapes(spec))
    out, inp, k = shape[0], shape[1], kernel_size(shape)
    scores = distinct_scores(shape, seed).double()
    costs = NMPattern(n, m, reduce).group_costs(scores)
    assert tuple(costs.shape) == (out, k, inp // m)
    canonical = channels_last(scores)
    picks = zip(
        sample_indices(6, seed, out),
        sample_indices(6, seed + 1, k),
        sample_indices(6, seed + 2, inp // m),
        strict=True,
    )
    for o, pos, g in picks:
        run = sorted(canonical[o, pos, g * m : (g + 1) * m].tolist())
        lost = torch.tensor(run[: m - n], dtype=torch.float64)
        assert torch.isclose(costs[o, pos, g], REDUCE[reduce](lost))


# ---------------------------------------------------------------------------- tiling
@SETTINGS
@given(specs(), st.integers(1, 12), st.integers(1, 12), st.lists(st.integers(1, 3), max_size=3))
def test_tiling_error(spec: Spec, out: int, inp: int, kernel: list[int]) -> None:
    shape = (out, inp, *kernel)
    error = parse_pattern(spec.text).tiling_error(torch.Size(shape))
    tiles = out % spec.row_mult == 0 and inp % spec.col_mult == 0
    if tiles:
        assert error is None
    else:
        assert isinstance(error, str)
        assert str(shape) in error
        assert spec.text in error


# ---------------------------------------------------------------------------- end to end through the Pruner
@st.composite
def models(draw: st.DrawFn, spec: Spec) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["Linear", "Conv1d", "Conv2d", "Conv3d"]))
        out = spec.row_mult * draw(st.integers(1, 3))
        inp = spec.col_mult * draw(st.integers(1, 3))
        if kind == "Linear":
            layers.append(nn.Linear(inp, out))
            continue
        dims = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}[kind]
        kernel = tuple(draw(st.integers(1, 2 if dims == 3 else 3)) for _ in range(dims))
        layers.append(getattr(nn, kind)(inp, out, kernel_size=kernel))
    return nn.Sequential(*layers)


@st.composite
def pruning_cases(draw: st.DrawFn) -> tuple[Spec, nn.Sequential, float, float, str, int]:
    spec = draw(specs())
    model = draw(models(spec))
    top = min(0.95, spec.max_sparsity)
    s1 = draw(st.floats(0.0, top))
    s2 = draw(st.floats(s1, top))
    scope = draw(st.sampled_from(["global", "local"]))
    return spec, model, s1, s2, scope, draw(st.integers(0, 2**31 - 1))


def weights(model: nn.Sequential) -> list[Tensor]:
    return [layer.weight.detach() for layer in model]


def check_sparsity(spec: Spec, ws: list[Tensor], sparsity: float, scope: str) -> None:
    zeros = [int((w == 0).sum()) for w in ws]
    sizes = [spec.group_size(tuple(w.shape)) for w in ws]
    if scope == "global":
        wanted = sparsity * sum(w.numel() for w in ws)
        # The closest whole-weight budget is reached to within half of the group that crosses it.
        assert abs(sum(zeros) - wanted) <= max(sizes) / 2 + 0.5 + 1e-6, (zeros, wanted, sizes)
        assert abs(sum(zeros) - wanted) <= max(sizes)
    else:
        for z, w, size in zip(zeros, ws, sizes, strict=True):
            wanted = sparsity * w.numel()
            assert abs(z - wanted) <= size / 2 + 1e-6, (z, wanted, size)


@SETTINGS
@given(pruning_cases())
def test_pruner_reaches_sparsity_with_structure_and_nested_masks(
    case: tuple[Spec, nn.Sequential, float, float, str, int],
) -> None:
    spec, model, s1, s2, scope, seed = case
    torch.manual_seed(seed)
    for layer in model:
        nn.init.normal_(layer.weight)
    original = [w.clone() for w in weights(model)]
    options = PruningOptions(
        target_sparsity=s2,
        pattern=spec.text,
        scope=scope,
        skip_last_layer=False,
        max_sparsity_per_layer=1.0,
    )
    pruner = Pruner(model, Schedule(start_step=0, end_step=10, frequency=1), options)
    assert len(pruner.targets) == len(model)
    assert not pruner.skipped

    pruner.prune(s1)
    first = [w == 0 for w in weights(model)]
    check_sparsity(spec, weights(model), s1, scope)
    for zero, w in zip(first, original, strict=True):
        check_structure(spec, zero, w.abs())

    pruner.prune(s2)
    second = [w == 0 for w in weights(model)]
    check_sparsity(spec, weights(model), s2, scope)
    for zero, w in zip(second, original, strict=True):
        check_structure(spec, zero, w.abs())
    for before, after in zip(first, second, strict=True):
        assert not bool((before & ~after).any()), "a weight pruned at s1 came back at s2"
    # Weights that were not pruned keep their values.
    for w, orig, zero in zip(weights(model), original, second, strict=True):
        assert torch.equal(w[~zero], orig[~zero])


class ShuffledCriterion(Criterion):
    """Fresh random scores at every event, unrelated to the weights: masks must still only grow."""

    name = "shuffled-test"

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        return torch.rand(param.shape, generator=self.generator)


@SETTINGS
@given(pruning_cases(), st.floats(0.0, 1.0))
def test_masks_only_grow_when_scores_change_between_events(
    case: tuple[Spec, nn.Sequential, float, float, str, int], middle: float
) -> None:
    spec, model, s1, s3, scope, seed = case
    s2 = s1 + (s3 - s1) * middle
    options = PruningOptions(
        target_sparsity=s3,
        pattern=spec.text,
        criterion=ShuffledCriterion(seed),
        scope=scope,
        skip_last_layer=False,
        max_sparsity_per_layer=1.0,
    )
    pruner = Pruner(model, Schedule(start_step=0, end_step=10, frequency=1), options)
    previous = [torch.zeros_like(w, dtype=torch.bool) for w in weights(model)]
    for sparsity in (s1, s2, s3):
        pruner.prune(sparsity)
        now = [w == 0 for w in weights(model)]
        check_sparsity(spec, weights(model), sparsity, scope)
        for before, after in zip(previous, now, strict=True):
            check_structure(spec, after)
            assert not bool((before & ~after).any()), "a pruned weight came back"
        previous = now


def test_pruner_nxm_on_a_conv_by_hand() -> None:
    # Conv2d(4 -> 2, kernel 1x2), pattern 2x2: 4 blocks (kernel position x input pair) of 4 weights.
    conv = nn.Conv2d(4, 2, kernel_size=(1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1, 17, dtype=torch.float32).reshape(2, 4, 1, 2))
    options = PruningOptions(
        target_sparsity=0.25, pattern="2x2", skip_last_layer=False, max_sparsity_per_layer=1.0
    )
    pruner = Pruner(nn.Sequential(conv), Schedule(start_step=0, end_step=10, frequency=1), options)
    pruner.prune(0.25)
    # The block with the smallest magnitudes sits at kernel position 0, input channels 0..1:
    # w[0:2, 0:2, 0, 0] = {1, 3, 9, 11}.
    expected = torch.zeros(2, 4, 1, 2, dtype=torch.bool)
    expected[0:2, 0:2, 0, 0] = True
    assert torch.equal(conv.weight.detach() == 0, expected)

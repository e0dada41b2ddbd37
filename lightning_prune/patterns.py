"""Patterns: the shape the zeros take.

A pattern turns a weight-shaped tensor of element scores into one *cost* per group (lower is pruned
first) and turns a set of pruned groups back into a weight-shaped mask. Every weight is seen in one
canonical layout, ``(out, K, in)``: ``out`` output rows/filters, ``K`` kernel positions (1 for
Linear) and ``in`` input channels. Conv weights are read channels-last so that blocks and N:M groups
run along input channels at a fixed kernel position, the layout that sparse kernels accelerate.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

from lightning_prune.registry import Registry, build_strategy

if TYPE_CHECKING:
    from lightning_prune.options import PruningOptions

REDUCTIONS: dict[str, Callable[[Tensor, tuple[int, ...]], Tensor]] = {
    "mean": lambda t, dims: t.mean(dim=dims),
    "sum": lambda t, dims: t.sum(dim=dims),
    "max": lambda t, dims: t.amax(dim=dims),
}


def to_canonical(t: Tensor) -> Tensor:
    """View a weight-shaped tensor ``(out, in, *kernel)`` as ``(out, K, in)``."""
    if t.dim() < 2:
        raise ValueError(f"a pattern needs a weight with at least 2 dims, got shape {tuple(t.shape)}")
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.flatten(2).transpose(1, 2)


def from_canonical(t: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_canonical`: ``(out, K, in)`` back to the weight's own ``shape``."""
    if len(shape) == 2:
        return t.squeeze(1)
    return t.transpose(1, 2).reshape(shape)


def canonical_dims(shape: torch.Size) -> tuple[int, int, int]:
    """``(out, K, in)`` of a weight shape."""
    kernel = 1
    for size in shape[2:]:
        kernel *= size
    return shape[0], kernel, shape[1]


def _check_sizes(*sizes: object) -> None:
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"pattern sizes must be ints, got {size!r}")


class Pattern(ABC):
    """How element scores are grouped and how pruned groups become a mask.

    Subclasses implement :meth:`group_costs`, :meth:`pruned_elements` and :meth:`group_size`; they
    hold configuration only, no state, so one instance serves any number of layers.
    """

    #: Largest fraction of a layer this pattern can zero.
    max_sparsity: float = 1.0
    #: A pruned group is zeroed whole (group lasso can shrink groups; N:M keeps N of M, so not).
    removes_whole_groups: ClassVar[bool] = True
    #: Groups hold more than one weight (progressive pruning has structure to ease in).
    structured: ClassVar[bool] = True

    def tiling_error(self, shape: torch.Size) -> str | None:
        """Why this pattern cannot tile a weight of ``shape``, or ``None`` when it can."""
        return None

    def check_options(self, options: PruningOptions) -> None:  # noqa: B027 - optional, no-op by default
        """Raise ``ValueError`` for options this pattern cannot serve (called when they are built)."""

    @abstractmethod
    def group_view(self, t: Tensor) -> Tensor:
        """``t`` (weight-shaped) as ``(*group_dims, S)``: one row of ``S`` elements per group."""

    @abstractmethod
    def from_group_view(self, groups: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`group_view`: ``(*group_dims, S)`` back to a tensor of ``shape``."""

    @abstractmethod
    def group_costs(self, scores: Tensor) -> Tensor:
        """One cost per group, shaped ``group_dims``; the groups with the lowest cost are pruned first."""

    @abstractmethod
    def pruned_elements(self, pruned_groups: Tensor, scores: Tensor) -> Tensor:
        """Weight-shaped bool tensor, ``True`` where a weight is pruned.

        Args:
            pruned_groups: bool tensor shaped like :meth:`group_costs`'s result.
            scores: the element scores the costs came from.
        """

    @abstractmethod
    def group_size(self, shape: torch.Size) -> int:
        """How many weights one pruned group zeroes in a weight of ``shape``."""

    @abstractmethod
    def __str__(self) -> str:
        """The pattern string a config file would write, e.g. ``"4x1"``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), str(self)))


class UnstructuredPattern(Pattern):
    """``"1x1"``: every weight is its own group."""

    structured = False

    def group_view(self, t: Tensor) -> Tensor:
        return t.unsqueeze(-1)

    def from_group_view(self, groups: Tensor, shape: torch.Size) -> Tensor:
        return groups.squeeze(-1)

    def group_costs(self, scores: Tensor) -> Tensor:
        return scores

    def pruned_elements(self, pruned_groups: Tensor, scores: Tensor) -> Tensor:
        return pruned_groups

    def group_size(self, shape: torch.Size) -> int:
        return 1

    def __str__(self) -> str:
        return "1x1"


class _BlockPattern(Pattern):
    """Rectangular blocks of the canonical ``(out, K, in)`` layout, zeroed whole.

    ``None`` as a block extent means "the whole dimension".
    """

    def __init__(self, reduce: str = "mean") -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is not one of {sorted(REDUCTIONS)}")
        self.reduce = reduce

    @abstractmethod
    def _block(self) -> tuple[int | None, int | None, int | None]:
        """Block extent along (out, K, in); ``None`` spans the whole dimension."""

    def _extent(self, shape: torch.Size) -> tuple[int, int, int]:
        dims = canonical_dims(shape)
        return tuple(d if b is None else b for b, d in zip(self._block(), dims, strict=True))  # type: ignore[return-value]

    def tiling_error(self, shape: torch.Size) -> str | None:
        if len(shape) < 2:
            return f"pattern {str(self)!r} needs a weight with at least 2 dims, got shape {tuple(shape)}"
        out, _, inp = canonical_dims(shape)
        rows, _, cols = self._extent(shape)
        if out % rows or inp % cols:
            return (
                f"pattern {str(self)!r} needs output size divisible by {rows} and input size divisible "
                f"by {cols}, got weight shape {tuple(shape)} (out={out}, in={inp})"
            )
        return None

    def group_view(self, t: Tensor) -> Tensor:
        out, kernel, inp = canonical_dims(t.shape)
        rows, span, cols = self._extent(t.shape)
        blocks = to_canonical(t).reshape(out // rows, rows, kernel // span, span, inp // cols, cols)
        return blocks.permute(0, 2, 4, 1, 3, 5).reshape(out // rows, kernel // span, inp // cols, -1)

    def from_group_view(self, groups: Tensor, shape: torch.Size) -> Tensor:
        out, kernel, inp = canonical_dims(shape)
        rows, span, cols = self._extent(shape)
        blocks = groups.reshape(out // rows, kernel // span, inp // cols, rows, span, cols)
        return from_canonical(blocks.permute(0, 3, 1, 4, 2, 5).reshape(out, kernel, inp), shape)

    def group_costs(self, scores: Tensor) -> Tensor:
        return REDUCTIONS[self.reduce](self.group_view(scores), (-1,))

    def pruned_elements(self, pruned_groups: Tensor, scores: Tensor) -> Tensor:
        size = self.group_size(scores.shape)
        return self.from_group_view(
            pruned_groups.unsqueeze(-1).expand(*pruned_groups.shape, size), scores.shape
        )

    def group_size(self, shape: torch.Size) -> int:
        rows, span, cols = self._extent(shape)
        return rows * span * cols


class BlockPattern(_BlockPattern):
    """``"NxM"``: blocks of ``rows`` output rows by ``cols`` input columns.

    For convolutions a block spans ``rows`` filters and ``cols`` input channels at one kernel
    position.

    Args:
        rows: block height N (output rows/filters), at least 1.
        cols: block width M (input columns/channels), at least 1.
        reduce: how element scores make a block score: ``"mean"``, ``"sum"`` or ``"max"``.
    """

    def __init__(self, rows: int, cols: int, reduce: str = "mean") -> None:
        super().__init__(reduce)
        _check_sizes(rows, cols)
        if rows < 1 or cols < 1:
            raise ValueError(f"block pattern '{rows}x{cols}' needs both sizes >= 1")
        self.rows, self.cols = rows, cols

    def _block(self) -> tuple[int | None, int | None, int | None]:
        return self.rows, 1, self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


class ChannelPattern(_BlockPattern):
    """Whole channels: ``"channelx1"`` (input channels/columns) or ``"1xchannel"`` (output filters/rows).

    Args:
        dim: ``"input"`` for ``channelx1``, ``"output"`` for ``1xchannel``.
        reduce: how element scores make a channel score: ``"mean"``, ``"sum"`` or ``"max"``.
    """

    def __init__(self, dim: str = "output", reduce: str = "mean") -> None:
        super().__init__(reduce)
        if dim not in ("input", "output"):
            raise ValueError(f"dim={dim!r} is not one of ['input', 'output']")
        self.dim = dim

    def _block(self) -> tuple[int | None, int | None, int | None]:
        return (None, None, 1) if self.dim == "input" else (1, None, None)

    def __str__(self) -> str:
        return "channelx1" if self.dim == "input" else "1xchannel"


class NMPattern(Pattern):
    """``"N:M"``: at most ``n`` non-zeros in every ``m`` consecutive input weights (2:4 = 50%).

    A group is a run of ``m`` input weights; pruning it zeroes its ``m - n`` lowest-scored weights,
    and its cost is the reduced score of those. Ranking groups lets a schedule make a growing share
    of groups N:M until every group is, which is the pattern's largest sparsity ``1 - n/m``.

    Args:
        n: non-zeros kept per group, at least 1.
        m: group length, greater than ``n``.
        reduce: how the scores of the weights a group would lose make its cost.
    """

    removes_whole_groups = False  # it keeps n of every m

    def __init__(self, n: int, m: int, reduce: str = "mean") -> None:
        _check_sizes(n, m)
        if not 0 < n < m:
            raise ValueError(f"N:M pattern '{n}:{m}' needs 0 < N < M")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is not one of {sorted(REDUCTIONS)}")
        self.n, self.m, self.reduce = n, m, reduce

    @property
    def max_sparsity(self) -> float:  # type: ignore[override]
        return 1.0 - self.n / self.m

    def tiling_error(self, shape: torch.Size) -> str | None:
        if len(shape) < 2:
            return f"pattern {str(self)!r} needs a weight with at least 2 dims, got shape {tuple(shape)}"
        inp = shape[1]
        if inp % self.m:
            return f"pattern {str(self)!r} needs input size divisible by {self.m}, got weight shape {tuple(shape)}"
        return None

    def group_view(self, t: Tensor) -> Tensor:
        out, kernel, inp = canonical_dims(t.shape)
        return to_canonical(t).reshape(out, kernel, inp // self.m, self.m)

    def from_group_view(self, groups: Tensor, shape: torch.Size) -> Tensor:
        out, kernel, inp = canonical_dims(shape)
        return from_canonical(groups.reshape(out, kernel, inp), shape)

    def group_costs(self, scores: Tensor) -> Tensor:
        """The reduced scores of each group's ``m - n`` lowest weights (ascending, NaN highest)."""
        groups = self.group_view(scores)
        if self.m <= NM_COMPARE_MAX:
            return _nm_reduce_lowest(groups, self.m - self.n, self.reduce)
        lost = groups.gather(-1, groups.argsort(dim=-1, stable=True)[..., : self.m - self.n])
        return REDUCTIONS[self.reduce](lost, (-1,))

    def pruned_elements(self, pruned_groups: Tensor, scores: Tensor) -> Tensor:
        """In each pruned group, its ``m - n`` lowest weights in the order of a stable sort: by
        score (NaN highest, ``-0.0 == 0.0``), ties to the lower index."""
        groups = self.group_view(scores)
        if self.m <= NM_COMPARE_MAX:
            pruned = _nm_lowest_mask(groups, self.m - self.n)
        else:
            pruned = torch.zeros_like(groups, dtype=torch.bool)
            pruned.scatter_(-1, groups.argsort(dim=-1, stable=True)[..., : self.m - self.n], True)
        pruned &= pruned_groups.unsqueeze(-1)
        return self.from_group_view(pruned, scores.shape)

    def group_size(self, shape: torch.Size) -> int:
        return self.m - self.n

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


#: Patterns by name and by name family (``"NxM"``, ``"N:M"``): ``pattern="4x1"`` in any config.
PATTERNS: Registry[Pattern] = Registry("pattern", forgiving=True)


def _blocks(match: re.Match[str], **options: Any) -> Pattern:
    rows, cols = int(match[1]), int(match[2])
    if rows < 1 or cols < 1:
        raise ValueError(f"pattern={match[0]!r}: block sizes must be >= 1; accepted: {PATTERNS.names()}")
    return UnstructuredPattern() if rows == cols == 1 and not options else BlockPattern(rows, cols, **options)


def _n_of_m(match: re.Match[str], **options: Any) -> Pattern:
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"pattern={match[0]!r}: N:M needs 0 < N < M; accepted: {PATTERNS.names()}")
    return NMPattern(n, m, **options)


PATTERNS.add("1x1", UnstructuredPattern)
PATTERNS.add("channelx1", lambda **options: ChannelPattern("input", **options))
PATTERNS.add("1xchannel", lambda **options: ChannelPattern("output", **options))
PATTERNS.add_family(r"(\d+)x(\d+)", _blocks, "NxM", "4x1")
PATTERNS.add_family(r"(\d+):(\d+)", _n_of_m, "N:M", "2:4")


P = TypeVar("P", bound=type[Pattern])


def register_pattern(name: str) -> Callable[[P], P]:
    """Class decorator: make a :class:`Pattern` subclass selectable as ``pattern=name`` from configs."""

    def register(cls: P) -> P:
        PATTERNS.add(name, cls)
        return cls

    return register


def parse_pattern(spec: object) -> Pattern:
    """Turn a pattern from a config into a :class:`Pattern`: a registered name (``"4x1"``, ``"2:4"``),
    an object, or a mapping with ``name`` or ``_target_`` and options (``{"name": "4x1", "reduce": "max"}``).

    Raises:
        ValueError: naming the value and what is accepted.
    """
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 60:
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124.
        raise ValueError(
            f"pattern={spec!r} is a number; YAML reads an unquoted '{spec // 60}:{spec % 60}' as base-60 "
            f'{spec}, so quote it: pattern: "{spec // 60}:{spec % 60}". Accepted: {PATTERNS.names()}'
        )
    return build_strategy(spec, Pattern, PATTERNS, "pattern")


# ---------------------------------------------------------------------------- N:M without sorting
#: Longest N:M group ranked by comparisons; longer groups use a stable argsort (same result).
NM_COMPARE_MAX = 8
#: Elements per block of rows in the N:M passes.
NM_BLOCK = 1 << 20


def _sorting_network(m: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for ``m`` inputs: comparators ``(i, j)``, ``i < j``, each
    leaving the lower value at ``i`` (built for the next power of two; wires past ``m`` hold +inf)."""
    size = 1 << (m - 1).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return [(i, j) for i, j in pairs if j < m]


def _nm_row_blocks(groups: Tensor) -> list[slice]:
    """Blocks of leading rows of about ``NM_BLOCK`` elements: the temporaries of one block stay in cache."""
    rows = max(1, NM_BLOCK // max(1, groups[:1].numel()))
    return [slice(start, start + rows) for start in range(0, groups.shape[0], rows)]


def _nm_reduce_lowest(groups: Tensor, count: int, reduce: str) -> Tensor:
    """``REDUCTIONS[reduce]`` over the ``count`` lowest values of each group (last dim), taken in
    ascending order with NaN highest, block by block: a sorting network cut down to the outputs
    needed, a few elementwise min/max passes instead of a per-group argsort."""
    plan, needed = [], set(range(count))
    for i, j in reversed(_sorting_network(groups.shape[-1])):  # what the wanted outputs depend on
        if i in needed or j in needed:
            plan.append((i, j, i in needed, j in needed))
            needed |= {i, j}
    plan.reverse()
    # fmin passes NaN over and maximum keeps it, so NaN sorts last; without NaN, minimum is faster.
    low_of = torch.fmin if _has_nan(groups) else torch.minimum
    out = torch.empty(groups.shape[:-1], dtype=groups.dtype, device=groups.device)
    for block in _nm_row_blocks(groups):
        columns = list(groups[block].unbind(-1))
        for i, j, low, high in plan:
            a, b = columns[i], columns[j]
            if low:
                columns[i] = low_of(a, b)
            if high:
                columns[j] = torch.maximum(a, b)
        lowest = columns[:count]
        if reduce == "max":  # the largest of ascending values is the last (NaN included)
            out[block] = lowest[-1]
        elif count <= 4 and groups.dtype in (torch.float32, torch.float64):
            # What torch's sum and mean give over so short a last dim (reduced precision types
            # accumulate in float32, so they take the general path), without a stacked copy.
            total = lowest[0].clone() if count == 1 else torch.add(lowest[0], lowest[1])
            for value in lowest[2:]:
                total += value
            out[block] = total / count if reduce == "mean" else total
        else:
            out[block] = REDUCTIONS[reduce](torch.stack(lowest, dim=-1), (-1,))
    return out


def _has_nan(values: Tensor) -> bool:
    # The maximum propagates NaN: one reduction, no bool tensor.
    return values.numel() > 0 and bool(torch.isnan(values.amax()))


def _nm_lowest_mask(groups: Tensor, count: int) -> Tensor:
    """``True`` at each group's ``count`` lowest elements, exactly as the first ``count`` of a
    stable argsort: an element's rank is how many others are lower, plus equal ones before it."""
    m = groups.shape[-1]
    nan = _has_nan(groups)  # NaN compares false; when present, rank it above everything else
    pruned = torch.empty(groups.shape, dtype=torch.bool, device=groups.device)
    for block in _nm_row_blocks(groups):
        columns = groups[block].unbind(-1)
        ranks = [torch.full_like(columns[0], e, dtype=torch.uint8) for e in range(m)]
        for e in range(m):
            for f in range(e + 1, m):
                f_first = torch.lt(columns[f], columns[e])  # otherwise e (lower index) goes first
                if nan:
                    f_first |= torch.isnan(columns[e]) & ~torch.isnan(columns[f])
                step = f_first.view(torch.uint8)
                ranks[e] += step  # ranks stay in [0, m): e starts at e, and f loses at most f
                ranks[f] -= step
        for e, rank in enumerate(ranks):
            torch.lt(rank, count, out=pruned[block][..., e])
    return pruned

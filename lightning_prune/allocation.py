"""How an event's sparsity is shared among the layers: by the scope's ranking, or fixed per layer (ERK).

``allocation="scope"`` (the default) leaves it to the selection: ``scope="global"`` ranks every
group of every layer together, so each layer ends where its scores put it; ``"local"`` and
``"row"`` give every layer (or row) the event's sparsity.

``allocation="erk"`` fixes each layer's share first, by the Erdős-Rényi-Kernel rule of RigL (Evci
et al. 2020): the density (fraction kept) of a weight shaped ``(out, in, *kernel)`` is proportional
to ``sum(shape) / prod(shape)``, so large layers are pruned harder than small ones, with one factor
for all layers chosen so that the targets reach the event's sparsity overall. Densities are
clamped to the per-layer bounds (``min_sparsity_per_layer``, ``max_sparsity_per_layer`` and the
pattern's own largest sparsity) and the factor is solved with the clamps in place, so a layer held
at a bound passes its share on to the others. Each layer is then pruned to its own sparsity by its
own scores (``scope="row"``: each of its rows). The shares only fall as the event's target rises,
so masks still only grow from event to event.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from lightning_prune.coupled import CoupledPattern
from lightning_prune.patterns import Pattern
from lightning_prune.thresholds import LayerGroups, select_groups

if TYPE_CHECKING:
    from lightning_prune.options import PruningOptions

#: The values ``allocation`` takes.
ALLOCATIONS = ("scope", "erk")
#: Bisection rounds on the ERK factor (in log space): far below a weight's share for any real model.
_ROUNDS = 200


def erk_weights(shape: Sequence[int]) -> float:
    """The ERK density of a weight of ``shape`` (``(out, in, *kernel)``) up to the common factor."""
    dims = [int(d) for d in shape if int(d) > 0]
    if not dims:
        return 0.0
    return sum(dims) / math.prod(dims)


def erk_sparsities(
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
) -> list[float]:
    """Per-layer sparsities whose weighted mean is ``sparsity``, by the Erdős-Rényi-Kernel rule.

    Args:
        shapes: each layer's weight shape (``(out, in, *kernel)``; any order of the same dims works).
        sparsity: the overall sparsity to reach, over all the layers' weights.
        min_sparsity: least sparsity of any layer (capped at ``sparsity``, as the selection does).
        max_sparsity: most sparsity of any layer.

    Returns:
        One sparsity per layer in ``[min_sparsity, max_sparsity]``; their mean weighted by the
        layers' sizes is ``sparsity`` (to float precision) whenever the bounds allow it, else the
        nearest bound.

    Example::

        >>> [round(s, 3) for s in erk_sparsities([(64, 64), (256, 64)], 0.5)]
        [0.286, 0.554]
    """
    if not shapes:
        return []
    min_sparsity = min(min_sparsity, sparsity)
    sizes = [math.prod(int(d) for d in shape) for shape in shapes]
    raw = [erk_weights(shape) for shape in shapes]
    low_density, high_density = 1.0 - max_sparsity, 1.0 - min_sparsity
    wanted = (1.0 - sparsity) * sum(sizes)

    def kept(log_factor: float) -> float:
        factor = math.exp(log_factor)
        return sum(
            n * min(high_density, max(low_density, factor * r)) for n, r in zip(sizes, raw, strict=True)
        )

    positive = [r for r in raw if r > 0]
    if not positive:
        return [sparsity for _ in shapes]
    # The factor at which the largest raw density is clamped low, and the smallest is clamped high.
    lo = math.log(max(low_density, 1e-300) / max(positive)) - 1.0
    hi = math.log(high_density / min(positive)) + 1.0
    for _ in range(_ROUNDS):
        middle = (lo + hi) / 2
        if kept(middle) < wanted:
            lo = middle
        else:
            hi = middle
    factor = math.exp((lo + hi) / 2)
    return [1.0 - min(high_density, max(low_density, factor * r)) for r in raw]


def select_by_allocation(
    options: PruningOptions, layers: list[LayerGroups], shapes: Sequence[Sequence[int]], sparsity: float
) -> list[Tensor]:
    """The groups to prune at an event: the scope's selection, or each layer's ERK share of it.

    Args:
        options: the run's options (``allocation``, ``scope`` and the per-layer bounds are read;
            under ``"erk"`` the scope only says whether a layer is ranked whole, ``"global"`` and
            ``"local"``, or row by row, ``"row"``).
        layers: each target's groups, as :func:`~lightning_prune.thresholds.select_groups` takes them.
        shapes: each target's weight shape in the standard ``(out, in, *kernel)`` layout.
        sparsity: the event's sparsity over all targets.

    Returns:
        One 1-D bool tensor per layer, ``True`` for each group to prune.
    """
    low, high = options.min_sparsity_per_layer, options.max_sparsity_per_layer
    if options.allocation == "scope":
        return select_groups(layers, sparsity, options.scope, low, high)
    high = min(high, options.pattern.max_sparsity)
    shares = erk_sparsities(shapes, sparsity, low, high)
    within = "row" if options.scope == "row" else "local"
    return [
        select_groups([layer], share, within, min(low, share), high)[0]
        for layer, share in zip(layers, shares, strict=True)
    ]


def check_allocation(allocation: object, pattern: Pattern) -> str:
    """Return ``allocation`` if it is accepted with ``pattern``, else raise ``ValueError`` saying why.

    Coupled patterns (``"head"``, ``"ffn"``) rank units spread over several weights, which have no
    single weight shape for ERK.
    """
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not one of {list(ALLOCATIONS)}")

    if allocation != "scope" and isinstance(pattern, CoupledPattern):
        raise ValueError(
            f"allocation={allocation!r} gives each weight its own share, but pattern {str(pattern)!r} prunes "
            "units spread over several weights; use allocation='scope' with it"
        )
    return allocation


__all__ = [
    "ALLOCATIONS",
    "check_allocation",
    "erk_sparsities",
    "erk_weights",
    "select_by_allocation",
]

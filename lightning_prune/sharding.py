"""Targets whose weights are FSDP2 shards: each rank prunes its own rows, the selection is global.

Under ``fully_shard`` (Lightning's ``ModelParallelStrategy``) every weight is a ``DTensor`` split by
rows (``Shard(0)``) over a 1-D data-parallel mesh: rank ``r`` holds a contiguous run of rows. The
Pruner keeps masks and score buffers for those local rows only, and the per-step masking touches
them alone. What needs the whole tensor goes over the process group as counts, never as weights:

- group costs: a group that lies within one rank's rows is scored there; groups that span every
  row (``channelx1``: whole input columns) are summed (or maxed) over the ranks, a vector of one
  cost per column;
- the selection (``thresholds.py``): the histograms of the radix select are summed over the ranks,
  so the crossing cost and each layer's count are those of the whole tensors, and the ties at the
  crossing go by position as in one process (rank 0's rows come first);
- event and report sparsities: zero counts summed over the ranks;
- the checkpoint: full masks and buffers, gathered when the state is saved, so a state saved on
  any number of ranks loads on any other, each rank taking its rows back.

What cannot be decided from local rows is refused before training, naming the layer: row blocks
that straddle a shard cut (``4x1`` with 6 rows per rank), layouts that store inputs first
(Hugging Face ``Conv1D``: its shards split input columns), tensor parallelism (``Shard(1)``, 2-D
meshes), and options that need whole weights (coupled heads/units, progressive fades, group lasso,
rewinding, SparseGPT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_prune.patterns import REDUCTIONS, NMPattern, Pattern, UnstructuredPattern, _BlockPattern
from lightning_prune.thresholds import LayerGroups, Span

if TYPE_CHECKING:
    from lightning_prune.options import PruningOptions
    from lightning_prune.targets import Target

try:  # torch.distributed.tensor is public from torch 2.4; absent in builds without distributed
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as ShardPlacement
except ImportError:  # pragma: no cover - such builds have no FSDP2 either
    DTensor = None  # type: ignore[assignment,misc]
    ShardPlacement = None  # type: ignore[assignment,misc]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a weight under FSDP2 or tensor parallelism)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor`` (same storage: writes reach the weight), or ``tensor`` itself."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.to_local()  # type: ignore[attr-defined,no-any-return]
    return tensor


def local_with_grad(param: Tensor) -> Tensor:
    """A detached view of ``param``'s local rows whose ``.grad`` is its local gradient rows.

    Criteria read ``param.grad`` (see ``criteria.py``); under FSDP2 both are DTensors.
    """
    view = local(param).detach()
    grad = param.grad
    if grad is not None:
        view.grad = local(grad)
    return view


@dataclass(frozen=True)
class RowShard:
    """How the rows of one sharded weight are spread over the ranks.

    Args:
        counts: rows each rank holds, in rank order (``Shard(0)`` chunks follow the mesh order).
        rank: this rank.
    """

    counts: tuple[int, ...]
    rank: int

    @property
    def rows(self) -> int:
        """Rows of the whole stored weight (its dim 0)."""
        return sum(self.counts)

    @property
    def offset(self) -> int:
        """The first row held here."""
        return sum(self.counts[: self.rank])

    @property
    def cuts(self) -> list[int]:
        """The rows where one rank's rows end and the next rank's begin."""
        return [sum(self.counts[:r]) for r in range(1, len(self.counts))]


class ProcessGroupCollectives:
    """The two collectives the selection needs, over one process group (see ``thresholds.Collectives``).

    Args:
        group: the data-parallel group the weights are sharded over (``None``: the default group).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # NCCL moves device tensors only; gloo takes CPU ones.
        on_gpu = "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    def sum(self, counts: Tensor) -> Tensor:
        """``counts`` (int64, CPU) summed over the ranks."""
        total = counts.to(self.device, copy=True)
        dist.all_reduce(total, group=self.group)
        return total.cpu()

    def before(self, counts: Tensor) -> Tensor:
        """Per entry of 1-D ``counts`` (int64, CPU), the sum over the ranks below this one."""
        gathered = self.gather(counts)
        return torch.stack(gathered[: self.rank]).sum(0) if self.rank else torch.zeros_like(counts)

    def gather(self, values: Tensor) -> list[Tensor]:
        """Every rank's 1-D ``values`` (CPU), in rank order."""
        mine = values.to(self.device).contiguous()
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        return [part.cpu() for part in gathered]

    def all_true(self, flag: Tensor) -> Tensor:
        """Whether a bool scalar is true on every rank (on ``flag``'s device, no host sync here)."""
        value = flag.to(device=self.device, dtype=torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return value[0].bool().to(flag.device)

    def reduce_costs(self, costs: Tensor, op: str) -> Tensor:
        """Partial group costs combined over the ranks in place (``"sum"`` or ``"max"``)."""
        dist.all_reduce(costs, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return costs


@dataclass
class ShardPlan:
    """How each target's rows are spread over the ranks, and the collectives that join them.

    Args:
        shards: per target, its :class:`RowShard` (``None``: a plain tensor, the same on every rank).
        collectives: the data-parallel group's collectives.
        spans: per target, the whole layer's totals for the selection (``replicated``: every rank
            holds all its group costs, a plain tensor's or groups spanning every row).
        group_sizes: per target, the weights one group of the whole layer zeroes.
    """

    shards: list[RowShard | None]
    collectives: ProcessGroupCollectives
    spans: list[Span]
    group_sizes: list[int]

    def sharded(self, index: int) -> bool:
        """Whether target ``index`` is split over the ranks."""
        return self.shards[index] is not None

    def layer_groups(self, index: int, pattern: Pattern, standard: Tensor) -> tuple[Tensor, LayerGroups]:
        """Group costs of target ``index`` from its local standard-layout scores, and its
        :class:`LayerGroups` for the selection.

        Groups within the local rows are the pattern's own; groups spanning every row (whole input
        channels) are summed (or maxed) over the ranks, then every rank holds them whole.
        """
        span = self.spans[index]
        costs = (
            self._whole_costs(index, pattern, standard) if span.replicated else pattern.group_costs(standard)
        )
        numel = span.numel if span.replicated else standard.numel()
        rows = costs.shape[0] if costs.dim() > 1 else 1  # the "row" scope ranks each on its own
        return costs, LayerGroups(costs.flatten(), self.group_sizes[index], numel, rows, span)

    def _whole_costs(self, index: int, pattern: Pattern, standard: Tensor) -> Tensor:
        shard = self.shards[index]
        if shard is None:
            return pattern.group_costs(standard)
        assert isinstance(pattern, _BlockPattern)
        groups = pattern.group_view(standard)
        if pattern.reduce == "max":
            partial = (
                REDUCTIONS["max"](groups, (-1,))
                if groups.shape[-1]
                else groups.new_full(groups.shape[:-1], float("-inf"))
            )
            return self.collectives.reduce_costs(partial.contiguous(), "max")
        total = self.collectives.reduce_costs(groups.sum(dim=-1).contiguous(), "sum")
        if pattern.reduce == "mean":
            total /= self.group_sizes[index]
        return total

    def total_counts(self, counts: list[int]) -> list[int]:
        """Per target, ``counts`` of this rank summed over the ranks where the target is sharded."""
        summed = self.collectives.sum(
            torch.tensor(
                [c if shard is not None else 0 for c, shard in zip(counts, self.shards, strict=True)]
            )
        ).tolist()
        return [
            int(s) if shard is not None else c
            for c, s, shard in zip(counts, summed, self.shards, strict=True)
        ]

    def gather(self, index: int, tensor: Tensor) -> Tensor:
        """The whole of a row-sharded ``tensor`` of target ``index`` (every rank gets it, on CPU)."""
        shard = self.shards[index]
        assert shard is not None
        world = self.collectives.world_size
        chunk = max(shard.counts)  # all_gather takes equal sizes: pad to the largest shard
        local_bytes = tensor.detach().to(self.collectives.device).contiguous().view(torch.uint8)
        padded = local_bytes.new_zeros((chunk, *local_bytes.shape[1:]))
        padded[: local_bytes.shape[0]] = local_bytes
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=self.collectives.group)
        whole = torch.cat([part[:n].cpu() for part, n in zip(parts, shard.counts, strict=True)])
        return whole.view(tensor.dtype)

    def rows_of(self, index: int, whole: Tensor) -> Tensor:
        """This rank's rows of a whole tensor of target ``index``."""
        shard = self.shards[index]
        assert shard is not None
        return whole[shard.offset : shard.offset + shard.counts[shard.rank]]


def group_shape(pattern: Pattern, standard_shape: torch.Size) -> torch.Size:
    """The shape of the pattern's group costs for a weight of ``standard_shape`` (no data touched)."""
    return pattern.group_view(torch.empty(standard_shape, device="meta")).shape[:-1]


def rows_per_group(pattern: Pattern, whole: torch.Size) -> int:
    """How many rows of a layer of standard shape ``whole`` one row of the pattern's groups covers."""
    groups = group_shape(pattern, whole)
    return whole[0] // max(1, groups[0] if len(groups) else 1)


def spans_all_rows(pattern: Pattern, whole: torch.Size) -> bool:
    """Whether each group of the pattern spans every row of the layer (``channelx1``), so rows on
    several ranks (a layer of one row stays on one rank)."""
    return whole[0] > 1 and rows_per_group(pattern, whole) == whole[0]


def refused_options(options: PruningOptions) -> dict[str, str]:
    """The options this run sets that sharded weights cannot serve yet, each with the reason."""
    from lightning_prune.coupled import CoupledPattern

    refused = {}
    if isinstance(options.pattern, CoupledPattern):
        refused["pattern"] = f"{str(options.pattern)!r} couples rows and columns of several weights"
    elif not isinstance(options.pattern, UnstructuredPattern | NMPattern | _BlockPattern):
        refused["pattern"] = f"{str(options.pattern)!r} is a custom pattern whose groups may span shards"
    if options.progressive is not None:
        refused["progressive"] = "a fade orders each layer's pruned weights over the whole tensor"
    if options.regularizer is not None:
        refused["regularizer"] = "group lasso norms span rows on other ranks"
    if options.rewind is not None:
        refused["rewind"] = "the rewind snapshot would be saved from rank 0's rows only"
    if options.allocation != "scope":
        refused["allocation"] = f"{options.allocation!r} shares are computed from whole layer shapes"
    if options.regrow:
        refused["regrow"] = "regrowth ranks pruned weights by gradients on other ranks' rows too"
    if options.criterion.reconstructs:
        refused["criterion"] = f"{options.criterion.name!r} reconstructs whole layers from their inputs"
    return refused


def plan_shards(targets: list[Target], pattern: Pattern, options: PruningOptions) -> ShardPlan | None:
    """The shard plan of ``targets``, or ``None`` when no target is a ``DTensor``.

    Raises:
        ValueError: naming each target and option that sharding cannot serve and why. Every rank
            checks every rank's rows, so all ranks refuse alike (none waits in a collective).
    """
    sharded = [t for t in targets if is_sharded(t.param)]
    if not sharded:
        return None
    errors = [f"{key}: {why}" for key, why in refused_options(options).items()]
    groups = set()
    for target in sharded:
        param: Any = target.param
        mesh = param.device_mesh
        placements = tuple(param.placements)
        if mesh.ndim != 1 or len(placements) != 1 or placements[0] != ShardPlacement(0):
            errors.append(
                f"{target.name}: placements {placements} on a {mesh.ndim}-D mesh; only FSDP2's row shards "
                "(Shard(0) on one data-parallel mesh dimension) are supported, not tensor parallelism "
                "(Shard(1)) or HSDP"
            )
            continue
        if target.layout.transposed:
            errors.append(
                f"{target.name}: layout {target.layout.name} stores inputs first, so its shards split input "
                "columns; exclude it (exclude=[...]) or keep it unsharded"
            )
            continue
        groups.add(mesh.get_group())
    if len(groups) > 1:
        errors.append("the targets are sharded over different process groups")
    if errors:
        raise ValueError(
            "lightning_prune cannot prune these sharded (FSDP2) weights exactly: " + "; ".join(errors)
        )
    collectives = ProcessGroupCollectives(groups.pop())
    counts = torch.tensor([local(t.param).shape[0] if is_sharded(t.param) else 0 for t in targets])
    per_rank = torch.stack(collectives.gather(counts))  # (ranks, targets): every rank's row counts
    shards = [
        RowShard(tuple(per_rank[:, i].tolist()), collectives.rank) if is_sharded(t.param) else None
        for i, t in enumerate(targets)
    ]
    problems = [
        f"{t.name} has {shard.rows} rows for {collectives.world_size} ranks, so some rank holds none"
        for t, shard in zip(targets, shards, strict=True)
        if shard is not None and 0 in shard.counts
    ]
    problems += _misaligned(targets, shards, pattern)
    if problems:
        raise ValueError(
            f"lightning_prune cannot prune these sharded (FSDP2) weights with pattern {str(pattern)!r}: "
            + "; ".join(problems)
            + ". Exclude such layers (exclude=[...]), use a pattern whose row blocks divide each rank's "
            "rows, or change the number of ranks"
        )
    spans, sizes = [], []
    for target, shard in zip(targets, shards, strict=True):
        whole = torch.Size(target.layout.standard_shape(tuple(target.param.shape)))  # a DTensor's is whole
        replicated = shard is None or spans_all_rows(pattern, whole)
        spans.append(Span(group_shape(pattern, whole).numel(), whole.numel(), replicated, collectives))
        sizes.append(pattern.group_size(whole))
    return ShardPlan(shards, collectives, spans, sizes)


def _misaligned(targets: list[Target], shards: list[RowShard | None], pattern: Pattern) -> list[str]:
    """Targets whose row groups straddle a cut between two ranks' rows."""
    reasons = []
    for target, shard in zip(targets, shards, strict=True):
        if shard is None:
            continue
        whole = torch.Size(target.layout.standard_shape(tuple(target.param.shape)))
        if spans_all_rows(pattern, whole):
            continue
        step = rows_per_group(pattern, whole)
        bad = [cut for cut in shard.cuts if cut % step]
        if bad:
            reasons.append(
                f"{target.name} has {shard.rows} rows, cut between ranks at rows {shard.cuts}: row {bad[0]} is "
                f"inside a group of {step} rows"
            )
    return reasons

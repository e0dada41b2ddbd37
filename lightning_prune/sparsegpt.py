"""SparseGPT (Frantar & Alistarh 2023): prune a layer from its inputs' Hessian and correct the rest.

For a Linear-like layer with weight ``W`` (out, in) and calibration inputs ``X`` (tokens, in), the
layer's output error after pruning is ``(W - W') H (W - W')^T`` per row with ``H = X^T X``. Removing
one weight ``w_q`` and moving the others of its row by the optimal-brain-surgeon update costs
``w_q^2 / [H^-1]_qq`` and changes the row by ``-w_q / [H^-1]_qq * [H^-1]_q,:``. SparseGPT applies
this column by column, left to right: column ``j``'s weights are either kept or pruned, and the
error of the pruned ones is spread over the columns not yet visited. Because every row visits the
columns in the same order, all rows share one sequence of inverse Hessians, read off the upper
Cholesky factor ``U`` of ``H^-1`` (row ``j`` of ``U``, scaled, is the inverse of the Hessian of
columns ``j..`` at its first row), so a layer costs one Cholesky and one pass of rank-1 updates.

The mask is chosen as the pass goes ("adaptive mask selection"): for unstructured pruning, in each
block of ``block_size`` columns the weights with the lowest ``w^2 / U_jj^2`` over the whole block
are pruned, using the weights as corrected so far; for N:M, in each group of M columns the M - N
lowest of every row. Before the pass, ``H`` gets ``dampening * mean(diag(H))`` added to its
diagonal, and inputs that were always zero are pruned first.

Memory: the layer's statistic ``H`` and, while it is solved, a copy, its Cholesky factor and the
factor of its inverse: four ``in_features^2`` float32 tensors of one layer, plus a float32 copy of
its weight.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_prune.checks import check_int
from lightning_prune.criteria import ReconstructingCriterion, register_criterion
from lightning_prune.patterns import NMPattern, Pattern, UnstructuredPattern

if TYPE_CHECKING:
    from lightning_prune.options import PruningOptions
    from lightning_prune.targets import Target

#: Columns whose masks are chosen together (unstructured) and whose updates are batched.
BLOCK_SIZE = 128
#: Fraction of the Hessian's mean diagonal added to its diagonal before it is inverted.
DAMPENING = 0.01


@register_criterion
class SparseGPTCriterion(ReconstructingCriterion):
    """SparseGPT: each layer pruned from the Hessian ``X^T X`` of its calibration inputs, and its kept
    weights corrected to make up for the pruned ones (Frantar & Alistarh 2023).

    Layers are taken in the order the model calls them, each from inputs that went through the
    layers already pruned. Supports Linear and Hugging Face Conv1D weights, unstructured (``"1x1"``)
    and N:M patterns; every layer is pruned to the target (each block of ``block_size`` columns for
    ``"1x1"``, as in the paper), so ``scope`` and the per-layer bounds play no part.

    Args:
        block_size: columns whose masks are chosen together and whose updates are applied together.
        dampening: fraction of the Hessian's mean diagonal added to its diagonal (the paper's 1%);
            raise it if a layer's Hessian is reported as not positive definite.
        init_batches: batches to calibrate on when the callback's or :func:`prune_once`'s
            ``calibration_batches`` is not given (the paper used 128 sequences).
    """

    name = "sparsegpt"

    def __init__(
        self, block_size: int = BLOCK_SIZE, dampening: float = DAMPENING, init_batches: int = 128
    ) -> None:
        self.block_size = _positive_int(f"{self.name} block_size", block_size)
        if isinstance(dampening, bool) or not isinstance(dampening, numbers.Real) or not dampening >= 0:
            raise ValueError(
                f"{self.name} dampening={dampening!r} must be a number >= 0 (the paper uses 0.01)"
            )
        self.dampening: float = float(dampening)
        self.init_batches = _positive_int(f"{self.name} init_batches", init_batches)

    def supports(self, target: Target) -> str | None:
        if isinstance(target.module, torch.nn.Embedding):
            return "an embedding's input is token ids, not activations"
        if target.param_name != "weight":
            return f"{target.param_name!r} of {type(target.module).__name__} does not take the module's first input"
        if target.param.dim() != 2 or target.layout.row_blocks > 1:
            return (
                f"{target.layout.name} weight of shape {tuple(target.param.shape)}: only Linear-like layers"
            )
        return None

    def check_options(self, options: PruningOptions) -> None:
        pattern = options.pattern
        if not isinstance(pattern, UnstructuredPattern | NMPattern):
            raise ValueError(
                f"criterion {self.name!r} prunes pattern '1x1' or N:M ('2:4', '4:8'), not pattern={str(pattern)!r}"
            )
        if isinstance(pattern, NMPattern) and self.block_size % pattern.m:
            raise ValueError(
                f"criterion {self.name!r}: block_size={self.block_size} must be a multiple of M={pattern.m} "
                f"of pattern {str(pattern)!r}, so that no N:M group straddles two blocks"
            )
        for key, value in (("progressive", options.progressive), ("rewind", options.rewind)):
            if value is not None:
                raise ValueError(
                    f"criterion {self.name!r} writes corrected weights once; {key}={value!r} would change "
                    f"them afterwards; set {key} to null (false) with it"
                )

    def layer_state(self, target: Target) -> Tensor:
        columns = target.layout.standard_shape(tuple(target.param.shape))[1]
        return torch.zeros(columns, columns, dtype=torch.float32, device=target.param.device)

    def observe(self, state: Tensor | None, target: Target, inputs: tuple[Any, ...]) -> None:
        assert state is not None
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        state.addmm_(x.T, x)

    @torch.no_grad()
    def reconstruct(
        self, state: Tensor, target: Target, keep: Tensor, sparsity: float, pattern: Pattern
    ) -> Tensor:
        weight = target.layout.to_standard(target.param)  # a view: writes reach the stored weight
        n_m = (pattern.n, pattern.m) if isinstance(pattern, NMPattern) else None
        pruned_weight, pruned = sparsegpt_prune(
            weight.float(),
            state,
            sparsity=sparsity,
            n_m=n_m,
            block_size=self.block_size,
            dampening=self.dampening,
            keep=keep,
            name=target.name,
        )
        weight.copy_(pruned_weight)
        return ~pruned


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float = 0.5,
    n_m: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
    dampening: float = DAMPENING,
    keep: Tensor | None = None,
    prune: Tensor | None = None,
    name: str = "the layer",
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` (out, in) against ``hessian`` (in, in) and correct the weights it keeps.

    Args:
        weight: the layer's weight in the ``(out, in)`` layout; not modified.
        hessian: ``X^T X`` of the layer's inputs (any positive scale); not modified.
        sparsity: fraction of each block of ``block_size`` columns to prune (unstructured).
        n_m: ``(n, m)`` for N:M: keep ``n`` of every ``m`` consecutive inputs of each row instead.
        block_size: columns per block (a multiple of ``m`` for N:M).
        dampening: fraction of the mean diagonal added to the diagonal of ``hessian``.
        keep: ``False`` where a weight is pruned already; those are pruned first.
        prune: prune exactly these weights (``True``) instead of choosing: the weight update of
            SparseGPT for a mask chosen elsewhere.
        name: the layer, for messages.

    Returns:
        The corrected weight (float32, zero wherever pruned) and the bool mask of pruned weights.

    Raises:
        RuntimeError: when the dampened Hessian is not positive definite, naming the layer.
    """
    columns = weight.shape[1]
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.to(torch.float32, copy=True)
    dead = torch.diagonal(h) == 0  # inputs that were always zero: nothing to keep them for
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(dampening * float(torch.diagonal(h).mean()))
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        h = torch.cholesky_inverse(factor)
        factor, info = torch.linalg.cholesky_ex(h, upper=True)
    if int(info) != 0:
        raise RuntimeError(
            f"sparsegpt: the Hessian of {name} ({columns} inputs) is not positive definite after dampening="
            f"{dampening}; calibrate on more batches or raise the dampening"
        )
    inverse = factor  # U with U^T U = H^-1: row j holds the updates for removing column j
    del h
    already = torch.zeros_like(w, dtype=torch.bool) if keep is None else ~keep.to(torch.bool)
    saliency_floor = float("-inf")
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        block_inverse = inverse[start:end, start:end]
        diagonal = torch.diagonal(block_inverse)
        errors = torch.zeros_like(block)
        if prune is not None:
            chosen = prune[:, start:end].to(torch.bool) | already[:, start:end]
        elif n_m is None:
            saliency = (block / diagonal).square().masked_fill_(already[:, start:end], saliency_floor)
            chosen = _lowest(saliency.view(-1), round(sparsity * saliency.numel())).view_as(block)
            chosen |= already[:, start:end]  # masks only grow
        else:
            chosen = torch.zeros_like(block, dtype=torch.bool)
        for j in range(end - start):
            if prune is None and n_m is not None and j % n_m[1] == 0:
                group = slice(j, j + n_m[1])
                saliency = (block[:, group] / diagonal[group]).square()
                saliency.masked_fill_(already[:, start:end][:, group], saliency_floor)
                lost = saliency.topk(n_m[1] - n_m[0], dim=1, largest=False).indices
                chosen[:, group].scatter_(1, lost, True)
                chosen[:, group] |= already[:, start:end][:, group]  # masks only grow
            column = block[:, j]
            error = column.where(chosen[:, j], 0.0) / block_inverse[j, j]
            # The pruned weights' error, spread over this block's later columns (this one zeroes).
            block[:, j:].sub_(error[:, None] * block_inverse[j, j:][None, :])
            block[:, j].masked_fill_(chosen[:, j], 0.0)
            errors[:, j] = error
        w[:, start:end] = block
        pruned[:, start:end] = chosen
        w[:, end:].sub_(errors @ inverse[start:end, end:])  # and over the later blocks
    return w.masked_fill_(pruned, 0.0), pruned


def _positive_int(key: str, value: object) -> int:
    checked = check_int(key, value, minimum=1)
    assert checked is not None
    return checked


def _lowest(values: Tensor, count: int) -> Tensor:
    """Bool mask of the ``count`` lowest of 1-D ``values``."""
    chosen = torch.zeros_like(values, dtype=torch.bool)
    if count > 0:
        chosen[values.topk(min(count, values.numel()), largest=False).indices] = True
    return chosen

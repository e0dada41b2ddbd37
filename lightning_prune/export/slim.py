"""slim: remove pruned hidden units, channels and heads, for a smaller dense model with the same outputs.

The rules (see ``docs/export.md``): in a chain ``producer -> per-channel ops -> consumer`` found by
tracing, hidden unit ``j`` goes when

- the consumer's input slice ``j`` is all zero (the unit is multiplied by zero whatever it emits), or
- the producer's row/filter ``j`` is all zero, so the unit emits the same value ``k_j`` for every
  input (``act(bias_j)``, through BatchNorm's running statistics for convolutions). ``k_j == 0``
  needs nothing more; otherwise ``k_j * W2[:, j]`` is folded into the consumer's bias, which is exact
  for a Linear consumer and for a convolution without zero padding (zero padding turns a constant
  channel into a non-constant one at the borders, so such units are kept and reported).

A head of ``nn.MultiheadAttention`` goes when its ``out_proj`` columns are all zero, or its value
rows are (its value bias, the same for every key, then adds ``out_proj`` times it to every output, and
that is folded into ``out_proj``'s bias).

Equality holds in eval mode (BatchNorm running statistics, no dropout); it is checked on
``example_inputs`` before the model is returned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_prune.couplings import KINDS
from lightning_prune.export.attention import SlimMultiheadAttention
from lightning_prune.export.chains import (
    CONVS,
    LINEAR,
    ZERO_PRODUCT_OPS,
    Chain,
    GraphFindings,
    Layer,
    find_chains,
    layer_at,
    norm_at,
    tensor_inputs,
    trace,
)
from lightning_prune.export.resize import replace_module, resized_layer, resized_norm
from lightning_prune.export.structures import ShrunkStructure, shrink_structures, structure_sizes

#: Largest allowed difference between the original's and the slim model's outputs, relative to
#: ``1 + max |original output|``: summation order changes with the hidden size.
CHECK_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


@dataclass(frozen=True)
class SlimmedChain:
    """What slim did to one chain (or one attention module).

    Args:
        kind: ``"linear"``, ``"conv"`` or ``"attention"``.
        layers: qualified names: producer, BatchNorms, consumer; or the attention module.
        before: hidden units (channels, heads) before.
        after: after.
        folded: removed units whose constant output was folded into the next layer's bias.
        params_before: parameters of ``layers`` before.
        params_after: after.
        note: units that look removable but were kept, and why.
        producers: how many of ``layers`` (from the start) produce the hidden units: 2 for a gated FFN.
    """

    kind: str
    layers: tuple[str, ...]
    before: int
    after: int
    folded: int
    params_before: int
    params_after: int
    note: str = ""
    producers: int = 1

    @property
    def unit(self) -> str:
        """What is counted: hidden units, channels or heads."""
        return {"linear": "units", "conv": "channels", "attention": "heads"}[self.kind]


@dataclass
class SlimResult:
    """The smaller model and what was done to get it.

    Args:
        model: a new model (the input is not modified): the same class, with resized layers.
        chains: every chain found, in graph order, shrunk or not.
        skipped: layers with zero rows/columns/heads that were left as they are, with the reason.
        params_before: parameters of the input model.
        params_after: parameters of ``model``.
        max_abs_diff: largest difference between the outputs of the input and of ``model`` on the
            example inputs (eval mode); ``None`` when not checked.
    """

    model: nn.Module
    chains: list[SlimmedChain] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float | None = None

    @property
    def changed(self) -> bool:
        """Whether any layer was made smaller."""
        return any(c.after < c.before for c in self.chains)

    def __str__(self) -> str:
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        lines = [f"slim: parameters {self.params_before:,} -> {self.params_after:,} ({ratio:.1%})"]
        if self.max_abs_diff is not None:
            lines[0] += f", max abs output difference {self.max_abs_diff:.3g}"
        if not self.changed:
            lines.append("nothing to remove: the model is an unchanged copy")
        for chain in self.chains:
            path = " -> ".join((", ".join(chain.layers[: chain.producers]), *chain.layers[chain.producers :]))
            sizes = f"{chain.before} -> {chain.after} {chain.unit}"
            folded = f", {chain.folded} folded into a bias" if chain.folded else ""
            params = f"params {chain.params_before:,} -> {chain.params_after:,}"
            lines.append(f"  {chain.kind:9} {path}: {sizes}{folded}; {params}")
            if chain.note:
                lines.append(f"            note: {chain.note}")
        if self.skipped:
            lines.append("left untouched:")
            lines.extend(f"  {name}: {reason}" for name, reason in self.skipped.items())
        return "\n".join(lines)


def slim(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    round_to: int = 1,
    check: bool = True,
) -> SlimResult:
    """Physically remove pruned hidden units, channels and attention heads; return a smaller copy.

    Chains are found by tracing ``model`` with ``torch.fx``: ``Linear -> elementwise ops ->
    Linear`` (FFN/MLP blocks), ``ConvNd -> BatchNormNd/elementwise ops -> ConvNd`` and
    ``nn.MultiheadAttention`` whose attention weights are unused. The returned model is a deep copy
    of ``model``, same class and forward, with those layers replaced by smaller ones (attention by
    :class:`~lightning_prune.export.SlimMultiheadAttention`). Layers with zero structure that cannot
    be proven safe to shrink are left alone and listed in :attr:`SlimResult.skipped`.

    Args:
        model: the pruned network (its forward must be traceable by ``torch.fx``).
        example_inputs: positional inputs for ``model``, as ``torch.export`` takes them: ``(x,)``.
        round_to: keep a multiple of this many units per chain (8 or 64 suit tensor cores); the
            extra units are the removable ones with the largest weights. For attention, the kept
            inner width ``heads * head_dim`` is rounded.
        check: run both models on ``example_inputs`` in eval mode and raise if the outputs differ
            by more than float rounding (see :data:`CHECK_TOLERANCE`).

    Returns:
        :class:`SlimResult` with the new model (in the train/eval mode the input was in) and a
        report; ``print(result)`` shows it.

    Raises:
        ValueError: on a bad argument, before any work.
        RuntimeError: when the forward cannot be traced, or (a bug) the outputs differ.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune.export import slim
        >>> model = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> with torch.no_grad():  # units 40-63 pruned: zero rows (pattern="1xchannel") and zero bias
        ...     _ = model[0].weight[40:].zero_(), model[0].bias[40:].zero_()
        >>> result = slim(model, (torch.randn(8, 512),), round_to=8)
        >>> print(result)  # doctest: +ELLIPSIS
        slim: parameters 33,482 -> 20,930 (62.5%), max abs output difference ...
          linear    0 -> 2: 64 -> 40 units; params 33,482 -> 20,930
        >>> small = result.model
        >>> small[0]
        Linear(in_features=512, out_features=40, bias=True)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} must be a torch.nn.Module")
    if not isinstance(example_inputs, tuple | list):
        raise ValueError(
            f"example_inputs={type(example_inputs).__name__} must be a tuple of positional inputs, "
            "e.g. (x,) for model(x)"
        )
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to={round_to!r} must be an int >= 1 (e.g. 8 for tensor cores)")
    if not isinstance(check, bool):
        raise ValueError(f"check={check!r} must be True or False")
    inputs = tuple(example_inputs)
    slimmed = copy.deepcopy(model)
    modes = {name: module.training for name, module in slimmed.named_modules()}
    slimmed.eval()
    with torch.no_grad():
        reference = slimmed(*inputs) if check else None
    try:
        findings: GraphFindings | None = find_chains(slimmed, trace(slimmed))
        untraced = None
    except RuntimeError as error:  # Hugging Face models: module structure instead (structures.py)
        findings, untraced = None, error
    params_before = _count(slimmed.parameters())
    result = SlimResult(slimmed, params_before=params_before)
    with torch.no_grad():
        for chain in [] if findings is None else findings.chains:
            result.chains.append(_shrink_chain(slimmed, chain, round_to))
        for name in [] if findings is None else findings.attention:
            result.chains.append(_shrink_attention(slimmed, name, round_to))
        handled = {n for c in result.chains for n in c.layers} | {
            f"{c.layers[0]}.out_proj" for c in result.chains if c.kind == "attention"
        }
        # A traced graph is the better judge of FFN chains (it sees every user of the hidden units);
        # heads it cannot judge (reshapes), so those come from module structure either way.
        kinds = KINDS if findings is None else ("head",)
        structures = shrink_structures(slimmed, round_to, handled, kinds)
    if findings is None and not structures.shrunk:
        assert untraced is not None
        raise RuntimeError(
            f"{untraced} Nor did it find attention heads or FFN units by module structure (the recipes of "
            "lightning_prune/couplings.py; register one for your modules with register_coupling)."
        ) from untraced
    result.chains.extend(_structure_chain(s) for s in structures.shrunk)
    result.skipped = dict(structures.skipped)
    covered = structures.layers
    if findings is not None:
        untouched = _untouched(slimmed, findings, result.chains)
        result.skipped.update({k: v for k, v in untouched.items() if k not in covered})
    else:
        reason = (
            f"not part of a head or FFN unit found by module structure; the rest of the model was not "
            f"traced ({type(untraced.__cause__).__name__ if untraced is not None else ''})"
        )
        result.skipped.update(_zero_structure(slimmed, covered, reason))
    result.params_after = _count(slimmed.parameters())
    if check:
        with torch.no_grad():
            result.max_abs_diff = _compare(reference, slimmed(*inputs))
    for name, module in slimmed.named_modules():
        module.training = modes.get(name, module.training)
    return result


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def _zero_slices(weight: Tensor, dim: int) -> Tensor:
    """Bool per index of ``dim``: whether that whole slice of ``weight`` is zero."""
    return weight.transpose(0, dim).reshape(weight.shape[dim], -1).eq(0).all(dim=1)


def _round_keep(keep: Tensor, score: Tensor, round_to: int, width: int = 1) -> Tensor:
    """Add back removable units (largest ``score`` first) until ``count * width`` is a multiple of ``round_to``.

    At least one unit is always kept, so no layer gets a zero-sized dimension.
    """
    total = keep.numel()
    target = max(1, int(keep.sum()))
    while target < total and (target * width) % round_to:
        target += 1
    extra = target - int(keep.sum())
    if extra <= 0:
        return keep
    candidates = (~keep).nonzero().squeeze(1)
    order = torch.argsort(-score[candidates], stable=True)
    keep = keep.clone()
    keep[candidates[order[:extra]]] = True
    return keep


def _constants(root: nn.Module, chain: Chain, producers: list[Layer], hidden: int) -> tuple[Tensor, Tensor]:
    """``(known, value)`` per hidden unit at the consumer's input: units that are the same for every input.

    A producer unit with an all-zero row/filter emits its bias. The chain's own ops are then run on
    one value per unit, which is exact because they act on every unit alone; a product is also
    known (zero) when either factor is known to be zero.
    """
    weight = producers[0].weight
    shape = (1, hidden) if chain.kind == "linear" else (1, hidden, *([1] * (weight.dim() - 2)))
    known: dict[fx.Node, Tensor] = {}
    value: dict[fx.Node, Tensor] = {}
    for node, layer in zip(chain.producer_nodes, producers, strict=True):
        rows = _zero_slices(layer.weight.detach(), 0)
        bias = torch.zeros_like(rows, dtype=weight.dtype) if layer.bias is None else layer.bias.detach()
        known[node] = rows
        value[node] = torch.where(rows, bias, torch.zeros_like(bias)).reshape(shape)
    for node in chain.between:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: value[n].clone())
        if node.op == "call_module":
            out = root.get_submodule(str(node.target))(*args, **kwargs)
        elif node.op == "call_function":
            out = node.target(*args, **kwargs)  # type: ignore[operator]
        else:
            out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        inputs = tensor_inputs(node)
        state = torch.stack([known[n] for n in inputs]).all(0)
        if node.target in ZERO_PRODUCT_OPS:
            for n in inputs:
                state |= known[n] & value[n].reshape(hidden).eq(0)
        known[node] = state
        value[node] = torch.where(state, out.reshape(hidden), torch.zeros_like(out.reshape(hidden))).reshape(
            shape
        )
    last = chain.between[-1] if chain.between else chain.producer_nodes[0]
    return known[last], value[last].reshape(hidden)


def _constant_input_is_exact(layer: Layer) -> bool:
    """Whether a constant input channel of ``layer`` adds the same amount at every output position."""
    if isinstance(layer, nn.Linear):
        return True
    if layer.padding_mode != "zeros":  # reflect/replicate/circular padding of a constant is constant
        return True
    if isinstance(layer.padding, str):
        return layer.padding == "valid" or all(
            d * (k - 1) == 0 for d, k in zip(layer.dilation, layer.kernel_size, strict=True)
        )
    return all(p == 0 for p in layer.padding)


def _shrink_chain(root: nn.Module, chain: Chain, round_to: int) -> SlimmedChain:
    producers = [layer_at(root, n) for n in chain.producers]
    consumer = layer_at(root, chain.consumer)
    norms = [norm_at(root, n) for n in chain.norms]
    layers = (*chain.producers, *chain.norms, chain.consumer)
    params_before = sum(_count(root.get_submodule(n).parameters()) for n in layers)
    w2 = consumer.weight.detach()
    hidden = w2.shape[1]
    dead = _zero_slices(w2, 1)  # the consumer ignores these units
    constant, emitted = _constants(root, chain, producers, hidden)  # these are the same for every input
    silent = constant & emitted.eq(0)
    exact_fold = _constant_input_is_exact(consumer)
    foldable = constant & torch.isfinite(emitted) & (silent | exact_fold)
    keep = ~(dead | foldable)
    score = w2.double().transpose(0, 1).reshape(hidden, -1).square().sum(1)
    for layer in producers:
        score += layer.weight.detach().double().reshape(hidden, -1).square().sum(1)
        if layer.bias is not None:
            score += layer.bias.detach().double().square()
    keep = _round_keep(keep, score, round_to)
    notes = []
    unfoldable = int((constant & ~foldable & ~dead).sum())
    if unfoldable:
        notes.append(
            f"{unfoldable} constant nonzero {'channels' if chain.kind == 'conv' else 'units'} kept: "
            f"{chain.consumer} zero-pads its input, so a constant channel is not constant at the borders"
        )
    padded = int((keep & (dead | foldable)).sum())
    if padded:
        notes.append(f"{padded} removable kept for round_to={round_to}")
    after = int(keep.sum())
    fold = foldable & ~keep & ~dead & emitted.ne(0)
    if after < hidden:
        index = keep.nonzero().squeeze(1)
        extra = None
        if bool(fold.any()):
            per_unit = w2.double()[:, fold].reshape(w2.shape[0], int(fold.sum()), -1).sum(-1)
            extra = per_unit @ emitted.double()[fold]
        for name, layer in zip(chain.producers, producers, strict=True):
            replace_module(root, name, resized_layer(layer, index, None, None))
        for name, norm in zip(chain.norms, norms, strict=True):
            replace_module(root, name, resized_norm(norm, index))
        replace_module(root, chain.consumer, resized_layer(consumer, None, index, extra))
        if extra is not None and consumer.bias is None:
            notes.append(f"{chain.consumer} gained a bias for the folded constants")
    params_after = sum(_count(root.get_submodule(n).parameters()) for n in layers)
    folded = int(fold.sum()) if after < hidden else 0
    return SlimmedChain(
        chain.kind,
        layers,
        hidden,
        after,
        folded,
        params_before,
        params_after,
        "; ".join(notes),
        len(producers),
    )


def _attention_parts(mha: nn.MultiheadAttention) -> tuple[list[Tensor], list[Tensor | None]]:
    if mha.in_proj_weight is not None:
        weights = list(mha.in_proj_weight.detach().chunk(3))
    else:
        weights = [mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()]
    biases: list[Tensor | None] = (
        [None, None, None] if mha.in_proj_bias is None else list(mha.in_proj_bias.detach().chunk(3))
    )
    return weights, biases


def _removable_heads(mha: nn.MultiheadAttention) -> tuple[Tensor, Tensor]:
    """``(out_dead, value_zero)`` per head."""
    heads, width, embed = mha.num_heads, mha.head_dim, mha.embed_dim
    out_dead = mha.out_proj.weight.detach().reshape(embed, heads, width).eq(0).all(-1).all(0)
    (_, _, w_v), _ = _attention_parts(mha)
    value_zero = w_v.reshape(heads, width, -1).eq(0).all(-1).all(-1)
    return out_dead, value_zero


def _shrink_attention(root: nn.Module, name: str, round_to: int) -> SlimmedChain:
    mha = root.get_submodule(name)
    assert isinstance(mha, nn.MultiheadAttention)
    heads, width, embed = mha.num_heads, mha.head_dim, mha.embed_dim
    params_before = _count(mha.parameters())
    (w_q, w_k, w_v), (b_q, b_k, b_v) = _attention_parts(mha)
    w_o, b_o = mha.out_proj.weight.detach(), mha.out_proj.bias
    out_dead, value_zero = _removable_heads(mha)
    keep = ~(out_dead | value_zero)
    per_head = w_o.double().reshape(embed, heads, width).square().sum((0, 2))
    score = per_head + w_v.double().reshape(heads, -1).square().sum(1)
    keep = _round_keep(keep, score, round_to, width)
    after = int(keep.sum())
    # A head with zero value rows outputs its value bias whatever the attention: fold it into out_proj.
    fold = value_zero & ~out_dead & ~keep
    fold &= torch.zeros_like(fold) if b_v is None else b_v.reshape(heads, width).ne(0).any(-1)
    if after == heads:
        return SlimmedChain("attention", (name,), heads, heads, 0, params_before, params_before)
    kept = keep.nonzero().squeeze(1)
    rows = (kept[:, None] * width + torch.arange(width, device=kept.device)).flatten()
    extra = None
    if bool(fold.any()):
        assert b_v is not None
        folded_rows = (
            fold.nonzero().squeeze(1)[:, None] * width + torch.arange(width, device=kept.device)
        ).flatten()
        extra = w_o.double()[:, folded_rows] @ b_v.double()[folded_rows]
    new = SlimMultiheadAttention(
        embed,
        width,
        kept.tolist(),
        heads,
        kdim=mha.kdim,
        vdim=mha.vdim,
        in_bias=mha.in_proj_bias is not None,
        out_bias=b_o is not None or extra is not None,
        dropout=mha.dropout,
        batch_first=mha.batch_first,
        device=w_o.device,
        dtype=w_o.dtype,
    )
    picked = [w.index_select(0, rows) for w in (w_q, w_k, w_v)]
    if new.in_proj_weight is not None:
        new.in_proj_weight.copy_(torch.cat(picked))
    else:
        new.q_proj_weight.copy_(picked[0])
        new.k_proj_weight.copy_(picked[1])
        new.v_proj_weight.copy_(picked[2])
    if new.in_proj_bias is not None:
        new.in_proj_bias.copy_(torch.cat([b.index_select(0, rows) for b in (b_q, b_k, b_v)]))  # type: ignore[union-attr]
    new.out_proj.weight.copy_(w_o.index_select(1, rows))
    if new.out_proj.bias is not None:
        base = (
            torch.zeros(embed, dtype=torch.float64, device=w_o.device)
            if b_o is None
            else b_o.detach().double()
        )
        new.out_proj.bias.copy_(base + (0 if extra is None else extra))
    for param in new.parameters():
        param.requires_grad_(mha.out_proj.weight.requires_grad)
    replace_module(root, name, new.train(mha.training))
    padded = int((keep & (out_dead | value_zero)).sum())
    note = f"{padded} removable heads kept for round_to={round_to}" if padded else ""
    return SlimmedChain(
        "attention", (name,), heads, after, int(fold.sum()), params_before, _count(new.parameters()), note
    )


def _not_shrunk_reason(root: nn.Module, name: str, findings: GraphFindings, reasons: dict[str, str]) -> str:
    if name in reasons:
        return reasons[name]
    module = root.get_submodule(name)
    if type(module) not in (*LINEAR, *CONVS, nn.MultiheadAttention):
        return (
            f"its type {type(module).__name__} is not exactly nn.Linear, nn.ConvNd or nn.MultiheadAttention"
        )
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:cut])
        if ancestor in findings.calls:
            kind = type(root.get_submodule(ancestor)).__name__
            return f"it runs inside {ancestor} ({kind}), which torch.fx traces as one opaque call"
    return "the traced forward does not call it"


def _untouched(root: nn.Module, findings: GraphFindings, chains: list[SlimmedChain]) -> dict[str, str]:
    """Layers with zero rows, columns or heads that slim left as they are, with why."""
    producers = {name for c in chains for name in c.layers[: c.producers]}
    consumers = {c.layers[-1] for c in chains}
    skipped: dict[str, str] = {}
    attention = [
        n for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention | SlimMultiheadAttention)
    ]
    for name, module in root.named_modules():
        if any(name.startswith(f"{a}.") for a in attention):
            continue  # out_proj belongs to its attention module
        if isinstance(module, nn.MultiheadAttention) and name not in producers:
            out_dead, value_zero = _removable_heads(module)
            count = int((out_dead | value_zero).sum())
            if count:
                reason = _not_shrunk_reason(root, name, findings, findings.output_reasons)
                skipped[name] = f"{count} of {module.num_heads} heads are zero but kept: {reason}"
        elif isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            weight = module.weight.detach()
            parts = []
            rows = int(_zero_slices(weight, 0).sum())
            if rows and name not in producers:
                reason = _not_shrunk_reason(root, name, findings, findings.output_reasons)
                parts.append(f"{rows} of {weight.shape[0]} output units are zero but kept: {reason}")
            columns = int(_zero_slices(weight, 1).sum())
            if columns and name not in consumers:
                reason = _not_shrunk_reason(root, name, findings, findings.input_reasons)
                parts.append(f"{columns} of {weight.shape[1]} input units are zero but kept: {reason}")
            if parts:
                skipped[name] = "; ".join(parts)
    return skipped


def _structure_chain(shrunk: ShrunkStructure) -> SlimmedChain:
    """A report line for a head group or FFN found by module structure."""
    before, after, note = structure_sizes(shrunk)
    coupling = shrunk.coupling
    if coupling.kind == "head":
        return SlimmedChain(
            "attention", (coupling.name,), before, after, 0, shrunk.params_before, shrunk.params_after, note
        )
    return SlimmedChain(
        "linear", shrunk.layers, before, after, 0, shrunk.params_before, shrunk.params_after, note,
        max(1, len(shrunk.layers) - 1),
    )  # fmt: skip


def _zero_structure(root: nn.Module, covered: set[str], reason: str) -> dict[str, str]:
    """Layers outside ``covered`` with zero output rows or input columns, each with ``reason``."""
    from lightning_prune.layouts import prunable_weights

    skipped = {}
    for name, module in root.named_modules():
        if name in covered:
            continue
        for param_name, layout in prunable_weights(module):
            weight = getattr(module, param_name)
            if not isinstance(weight, Tensor) or isinstance(module, nn.Embedding):
                continue
            standard = layout.to_standard(weight.detach())
            rows, columns = int(_zero_slices(standard, 0).sum()), int(_zero_slices(standard, 1).sum())
            if rows or columns:
                skipped[name] = (
                    f"{rows} of {standard.shape[0]} output and {columns} of {standard.shape[1]} input units "
                    f"are zero but kept: {reason}"
                )
    return skipped


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, tuple | list):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for key in value for leaf in _leaves(value[key])]
    return [value]


def _compare(reference: Any, output: Any) -> float:
    """Largest difference between two model outputs; raises when they differ beyond rounding."""
    expected, actual = _leaves(reference), _leaves(output)
    if len(expected) != len(actual):
        raise RuntimeError(
            f"slim changed the model's output structure ({len(expected)} -> {len(actual)} values)"
        )
    worst = 0.0
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if not isinstance(want, Tensor):
            if not isinstance(want, int | float | str | bool | type(None)):
                continue  # a KV cache or another object: its tensors differ in shape once heads go
            if want != got:
                raise RuntimeError(f"slim changed output value {index}: {want!r} -> {got!r}")
            continue
        if not isinstance(got, Tensor) or got.shape != want.shape:
            shape = getattr(got, "shape", type(got).__name__)
            raise RuntimeError(
                f"slim changed the shape of output {index}: {tuple(want.shape)} -> {shape}; the forward "
                "probably reads a layer's size (e.g. fc1.out_features); please report this model"
            )
        if not want.is_floating_point():
            if not torch.equal(want, got):
                raise RuntimeError(f"slim changed output {index} (dtype {want.dtype})")
            continue
        finite = torch.isfinite(want)
        if not torch.equal(finite, torch.isfinite(got)):
            raise RuntimeError(f"slim changed which values of output {index} are finite")
        if not bool(finite.any()):
            continue
        diff = float((want[finite].double() - got[finite].double()).abs().max())
        scale = float(want[finite].double().abs().max())
        tolerance = CHECK_TOLERANCE.get(want.dtype, 1e-4) * (1.0 + scale)
        if diff > tolerance:
            raise RuntimeError(
                f"slim changed output {index} by up to {diff:.3g} (tolerance {tolerance:.3g}); this is a bug "
                "or a construct slim does not understand: please report it. check=False returns the model "
                "anyway"
            )
        worst = max(worst, diff)
    return worst

"""Remove pruned heads and FFN units from models torch.fx cannot trace, by module structure.

The couplings of ``couplings.py`` (the recipes that find attention heads and FFN units in Hugging
Face Llama/Mistral/Qwen, GPT-2, BERT and ViT modules, and the user's own) say which slices of which
weights make one head or unit. A unit whose *consumer* slices are all zero (the output projection's
columns of a head, the down projection's columns of an FFN unit) contributes nothing whatever its
other weights hold, so it can be cut out of every member; this is exact, needs no trace, and is what
``pattern="head"``/``"ffn"`` pruning leaves. Under grouped-query attention a unit is a key/value head
with all its query heads, so the layer stays a valid GQA layer.

After the weights shrink, the attributes the forward and ``generate()`` read are set from the new
sizes (:func:`refresh_attributes`): head counts (``num_heads``, ``num_attention_heads``,
``num_key_value_heads``), inner widths (``all_head_size``, GPT-2's ``split_size``) and FFN widths
(``intermediate_size``); and, when every layer ends with the same sizes and the config can say so, the
model's ``config`` too, so that ``save_pretrained``/``from_pretrained`` work as for any model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_prune.couplings import KINDS, Coupling, Member, find_couplings, layout_of, unit_view
from lightning_prune.export.resize import replace_module, resized_layer

#: Attributes that hold a module's number of query heads, key/value heads, inner width, FFN width.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
INNER_ATTRS = ("all_head_size", "split_size", "inner_dim")
FFN_ATTRS = ("intermediate_size", "ffn_dim")
#: The config attribute where slim records the weight shape of every layer it resized.
SIZES_KEY = "lightning_prune_slim"


@dataclass(frozen=True)
class ShrunkStructure:
    """What happened to one coupling (a head group or an FFN) in :func:`shrink_structures`."""

    coupling: Coupling
    layers: tuple[str, ...]
    kept: Tensor
    dead: Tensor
    params_before: int
    params_after: int
    note: str = ""


@dataclass
class StructureFindings:
    """The result of :func:`shrink_structures`."""

    shrunk: list[ShrunkStructure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> set[str]:
        """Every layer that belongs to a coupling slim looked at."""
        return {name for s in self.shrunk for name in s.layers}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _resizable(module: nn.Module, member: Member) -> str | None:
    """Why slim cannot resize the member's layer, or ``None``."""
    if member.param_name != "weight":
        return f"its weight {member.param_name} is not a layer's own weight (nn.MultiheadAttention is slimmed by tracing)"
    if type(module) is nn.Linear or type(module).__name__ == "Conv1D":
        return None
    return f"{type(module).__name__} is not exactly nn.Linear or Hugging Face's Conv1D"


def shrink_structures(
    root: nn.Module, round_to: int, avoid: set[str], kinds: Sequence[str] = KINDS
) -> StructureFindings:
    """Remove every dead unit of every coupling of ``root`` (in place); report what was done.

    Args:
        root: the model (a copy that slim owns).
        round_to: keep a multiple of this many inner indices per coupling (heads: ``heads * head_dim``).
        avoid: layer names another path (the torch.fx chains) already handled; couplings touching
            them are left alone.
        kinds: which couplings to look at.
    """
    from lightning_prune.export.slim import _round_keep  # the same rounding as the traced chains

    names = {id(m): n for n, m in root.named_modules()}
    findings = StructureFindings()
    for coupling in find_couplings(root, kinds).couplings:
        layers = tuple(dict.fromkeys(names.get(id(m.module), "?") for m in coupling.members))
        if set(layers) & avoid:
            continue
        reasons = [r for m in coupling.members if (r := _resizable(m.module, m)) is not None]
        consumers = [m for m in coupling.members if m.dim == "in"]
        dead = _dead_units(coupling, consumers)
        if reasons or not consumers:
            if bool(dead.any()):
                why = reasons[0] if reasons else "no member reads the units as inputs"
                findings.skipped[coupling.name] = (
                    f"{int(dead.sum())} of {coupling.units} {_unit_word(coupling)} are zero but kept: {why}"
                )
            continue
        width = consumers[0].width  # inner indices per unit: heads * head_dim, or 1
        score = sum(
            (unit_view(_standard(m).double(), m, coupling.units).square().sum(1) for m in coupling.members),
            torch.zeros(coupling.units, dtype=torch.float64),
        )
        keep = _round_keep(~dead, score.cpu(), round_to, width)
        before = sum(_count(root.get_submodule(n)) for n in layers)
        note = ""
        padded = int((keep & dead).sum())
        if padded:
            note = f"{padded} removable {_unit_word(coupling)} kept for round_to={round_to}"
        if not bool(keep.all()):
            _cut(root, coupling, keep, names)
        after = sum(_count(root.get_submodule(n)) for n in layers)
        findings.shrunk.append(ShrunkStructure(coupling, layers, keep, dead, before, after, note))
    refresh_attributes(root, kinds)
    return findings


def _unit_word(coupling: Coupling) -> str:
    if coupling.kind != "head":
        return "units"
    return "heads" if coupling.heads_per_unit == 1 else "key/value groups"


def _standard(member: Member) -> Tensor:
    weight = getattr(member.module, member.param_name)
    assert isinstance(weight, Tensor)
    return layout_of(member).to_standard(weight.detach())


def _dead_units(coupling: Coupling, consumers: Sequence[Member]) -> Tensor:
    """Units whose every consumer slice is zero (``False`` everywhere when there is no consumer)."""
    if not consumers:
        return torch.zeros(coupling.units, dtype=torch.bool)
    dead = torch.ones(coupling.units, dtype=torch.bool)
    for member in consumers:
        dead &= unit_view(_standard(member), member, coupling.units).eq(0).all(dim=1).cpu()
    return dead


def _cut(root: nn.Module, coupling: Coupling, keep: Tensor, names: dict[int, str]) -> None:
    """Replace each member layer by one holding only the kept units' runs (rows or columns)."""
    removed: dict[int, dict[int, Tensor]] = {}  # id(module) -> axis -> bool per index: removed
    modules: dict[int, nn.Module] = {}
    for member in coupling.members:
        shape = _standard(member).shape
        per_axis = removed.setdefault(id(member.module), {})
        flags = per_axis.setdefault(member.axis, torch.zeros(shape[member.axis], dtype=torch.bool))
        runs = (~keep).repeat_interleave(member.width)
        flags[member.offset : member.offset + runs.numel()] |= runs
        modules[id(member.module)] = member.module
    config = getattr(root, "config", None)
    for key, per_axis in removed.items():
        module = modules[key]
        index = {axis: (~flags).nonzero().squeeze(1) for axis, flags in per_axis.items()}
        new = _resized(module, index.get(0), index.get(1))
        replace_module(root, names[key], new)
        if config is not None and hasattr(config, "to_dict"):  # a Hugging Face config: saved with the model
            sizes = dict(getattr(config, SIZES_KEY, None) or {})
            sizes[names[key]] = list(_weight(new).shape)
            setattr(config, SIZES_KEY, sizes)


def _resized(module: nn.Module, out_index: Tensor | None, in_index: Tensor | None) -> nn.Module:
    if isinstance(module, nn.Linear):
        return resized_layer(module, out_index, in_index, None)
    # Hugging Face's Conv1D: y = x @ W + b with W stored (in, out); a shallow copy keeps its class
    # and every other attribute, with new parameters of the kept size.
    weight, bias = _weight(module).detach(), module.bias
    if out_index is not None:
        weight = weight.index_select(1, out_index)
    if in_index is not None:
        weight = weight.index_select(0, in_index)
    new = conv1d_like(module, weight.shape[0], weight.shape[1])
    with torch.no_grad():
        _weight(new).copy_(weight)
        if isinstance(bias, Tensor) and isinstance(new.bias, Tensor):
            new.bias.copy_(bias.detach() if out_index is None else bias.detach().index_select(0, out_index))
    return new


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def conv1d_like(module: nn.Module, inputs: int, outputs: int) -> nn.Module:
    """A copy of Hugging Face ``Conv1D`` ``module`` (its class and other attributes) with new,
    uninitialised parameters for ``inputs -> outputs`` (weight stored ``(in, out)``)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    assert isinstance(weight, Tensor)
    new = copy.copy(module)
    new._parameters = dict(module._parameters)  # a shallow copy would share the dict
    device, dtype = weight.device, weight.dtype
    new.weight = nn.Parameter(
        torch.empty(inputs, outputs, device=device, dtype=dtype), requires_grad=weight.requires_grad
    )
    if isinstance(bias, Tensor):
        new.bias = nn.Parameter(
            torch.zeros(outputs, device=device, dtype=dtype), requires_grad=bias.requires_grad
        )
    new.nf, new.nx = outputs, inputs  # type: ignore[assignment]
    return new


def _set_ints(module: nn.Module, names: Sequence[str], value: int) -> None:
    for name in names:
        current = getattr(module, name, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(module, name, value)


def refresh_attributes(root: nn.Module, kinds: Sequence[str] = KINDS) -> None:
    """Set the size attributes of every coupled module of ``root`` from its weights.

    Per module: head counts, key/value head counts and inner widths on the attention module and its
    direct children (BERT keeps them on ``attention.self``), FFN widths on the FFN module. When every
    head coupling ends with the same counts and the model's ``config`` has a ``head_dim`` (so that
    fewer heads do not change the head width, as in Llama, Mistral and Qwen), the config's
    ``num_attention_heads``/``num_key_value_heads`` follow; ``intermediate_size`` follows when every
    FFN has the same width.
    """
    head_sizes: set[tuple[int, int, int]] = set()
    ffn_sizes: set[int] = set()
    modules = dict(root.named_modules())
    for coupling in find_couplings(root, kinds).couplings:
        module = modules.get(coupling.name, root)
        holders = [module, *module.children()]
        if coupling.kind == "head":
            queries = coupling.units * coupling.heads_per_unit
            head_dim = coupling.members[-1].width // coupling.heads_per_unit
            for holder in holders:
                _set_ints(holder, HEAD_ATTRS, queries)
                _set_ints(holder, KV_ATTRS, coupling.units)
                _set_ints(holder, INNER_ATTRS, queries * head_dim)
            head_sizes.add((queries, coupling.units, head_dim))
        elif coupling.kind == "ffn":
            for holder in holders:
                _set_ints(holder, FFN_ATTRS, coupling.units)
            ffn_sizes.add(coupling.units)
    config = getattr(root, "config", None)
    if config is None:
        return
    if len(head_sizes) == 1 and isinstance(getattr(config, "head_dim", None), int):
        queries, kv_heads, head_dim = head_sizes.pop()
        if config.head_dim == head_dim and isinstance(getattr(config, "num_attention_heads", None), int):
            config.num_attention_heads = queries
            if isinstance(getattr(config, "num_key_value_heads", None), int):
                config.num_key_value_heads = kv_heads
    if len(ffn_sizes) == 1 and isinstance(getattr(config, "intermediate_size", None), int):
        config.intermediate_size = ffn_sizes.pop()


def structure_sizes(shrunk: ShrunkStructure) -> tuple[int, int, str]:
    """``(before, after, note)`` in heads (or units) for a report line."""
    coupling = shrunk.coupling
    per = coupling.heads_per_unit
    before, after = coupling.units * per, int(shrunk.kept.sum()) * per
    notes = [shrunk.note] if shrunk.note else []
    if per > 1:
        notes.insert(
            0, f"key/value heads {coupling.units} -> {int(shrunk.kept.sum())}, {per} query heads each"
        )
    return before, after, "; ".join(notes)

"""Built-in coupling recipes: where heads and FFN units are in common modules (see ``couplings.py``).

By class: ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``/``DecoderLayer`` (FFN). By
attribute shape, whatever the class is called (so Llama, Mistral, Qwen, Gemma, OPT, CLIP... without
importing ``transformers``): separate q/k/v/o projections with a ``head_dim``; GPT-2's fused
``c_attn`` with ``c_proj``; BERT's ``self.query/key/value`` with ``output.dense``; gated FFNs
(``gate_proj``, ``up_proj``, ``down_proj``); ``c_fc``/``c_proj``; ``intermediate.dense``/``output.dense``;
``fc1``/``fc2``. Each checks the sizes and says why it refuses a module that has the shape but not the
sizes.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_prune.couplings import (
    Coupling,
    Member,
    fused_heads,
    heads,
    register_coupling,
    register_shape_recipe,
    units,
)


def _child(module: nn.Module, *path: str) -> nn.Module | None:
    for name in path:
        child = getattr(module, name, None)
        if not isinstance(child, nn.Module):
            return None
        module = child
    return module


def _int(module: nn.Module, *names: str) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _weighted(*modules: nn.Module | None) -> bool:
    return all(m is not None and isinstance(getattr(m, "weight", None), Tensor) for m in modules)


@register_coupling("MultiheadAttention")
def _multihead_attention(module: nn.Module) -> list[Coupling]:
    assert isinstance(module, nn.MultiheadAttention)
    if module.in_proj_weight is not None:
        return [fused_heads(module, module.out_proj, head_dim=module.head_dim, param_name="in_proj_weight")]
    width = module.head_dim
    members = [Member(module, "out", width, 0, f"{role}_proj_weight", role) for role in ("q", "k", "v")]
    return [
        Coupling(module.num_heads, (*members, Member(module.out_proj, "in", width, role="o")), kind="head")
    ]


@register_coupling("TransformerEncoderLayer", "TransformerDecoderLayer")
def _torch_transformer_layer(module: nn.Module) -> list[Coupling]:
    # Its self_attn (nn.MultiheadAttention) has a recipe of its own.
    up, down = _child(module, "linear1"), _child(module, "linear2")
    if not _weighted(up, down):
        return []
    assert up is not None and down is not None
    return [units([up], down)]


@register_shape_recipe(
    "q_proj, k_proj, v_proj, o_proj or out_proj, head_dim (Llama, Mistral, Qwen, ViT, OPT)"
)
def _q_k_v_o(module: nn.Module) -> list[Coupling]:
    q, k, v = _child(module, "q_proj"), _child(module, "k_proj"), _child(module, "v_proj")
    o = _child(module, "o_proj") or _child(module, "out_proj")
    head_dim = _int(module, "head_dim")
    if not _weighted(q, k, v, o) or head_dim is None:
        return []
    assert q is not None and k is not None and v is not None and o is not None
    return [heads(q, k, v, o, head_dim=head_dim)]


@register_shape_recipe("c_attn, c_proj, head_dim (GPT-2 attention)")
def _gpt2_attention(module: nn.Module) -> list[Coupling]:
    qkv, o = _child(module, "c_attn"), _child(module, "c_proj")
    head_dim = _int(module, "head_dim")
    if not _weighted(qkv, o) or head_dim is None or getattr(module, "is_cross_attention", False):
        return []
    assert qkv is not None and o is not None
    return [fused_heads(qkv, o, head_dim=head_dim)]


@register_shape_recipe("self.query/key/value with attention_head_size, output.dense (BERT attention)")
def _bert_attention(module: nn.Module) -> list[Coupling]:
    inner = _child(module, "self")
    o = _child(module, "output", "dense")
    if inner is None or o is None:
        return []
    q, k, v = _child(inner, "query"), _child(inner, "key"), _child(inner, "value")
    head_dim = _int(inner, "attention_head_size", "head_dim")
    if not _weighted(q, k, v, o) or head_dim is None:
        return []
    assert q is not None and k is not None and v is not None
    return [heads(q, k, v, o, head_dim=head_dim)]


@register_shape_recipe("gate_proj, up_proj, down_proj (gated FFN: Llama, Mistral, Qwen)")
def _gated_ffn(module: nn.Module) -> list[Coupling]:
    gate, up, down = _child(module, "gate_proj"), _child(module, "up_proj"), _child(module, "down_proj")
    if not _weighted(gate, up, down):
        return []
    assert gate is not None and up is not None and down is not None
    return [units([up, gate], down)]


@register_shape_recipe("c_fc, c_proj (GPT-2 MLP)")
def _gpt2_mlp(module: nn.Module) -> list[Coupling]:
    up, down = _child(module, "c_fc"), _child(module, "c_proj")
    if not _weighted(up, down):
        return []
    assert up is not None and down is not None
    return [units([up], down)]


@register_shape_recipe("intermediate.dense, output.dense (BERT layer)")
def _bert_ffn(module: nn.Module) -> list[Coupling]:
    up, down = _child(module, "intermediate", "dense"), _child(module, "output", "dense")
    if not _weighted(up, down):
        return []
    assert up is not None and down is not None
    return [units([up], down)]


@register_shape_recipe("fc1, fc2 (ViT, OPT, CLIP MLP)")
def _fc1_fc2(module: nn.Module) -> list[Coupling]:
    up, down = _child(module, "fc1"), _child(module, "fc2")
    if not _weighted(up, down):
        return []
    assert up is not None and down is not None
    return [units([up], down)]

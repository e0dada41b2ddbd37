"""Rebuild a slimmed model from its state dict and a fresh instance of the original class."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_prune.export.attention import SlimMultiheadAttention
from lightning_prune.export.chains import is_layer, is_norm
from lightning_prune.export.resize import empty_layer, param, replace_module, resized_norm


def load_slim_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Resize a fresh instance of the original architecture to fit a slim state dict, and load it.

    ``slim(...).model.state_dict()`` has the original's keys with smaller shapes (plus
    ``kept_heads`` for attention with heads removed, and a bias where constants were folded into a
    layer that had none). This replaces every Linear, ConvNd, BatchNormNd and MultiheadAttention of
    ``model`` whose shapes differ by one of the right size, then loads with ``strict=True``.

    Args:
        model: a new instance of the model class that was slimmed (modified in place).
        state_dict: the slim model's state dict.

    Returns:
        ``model``, resized and loaded.

    Raises:
        ValueError: when ``model`` is not a module or ``state_dict`` not a mapping.
        RuntimeError: from ``load_state_dict`` when keys still do not match.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} must be a torch.nn.Module")
    if not isinstance(state_dict, dict):
        raise ValueError(f"state_dict={type(state_dict).__name__} must be a dict of tensors")
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(f"{r}.") for r in replaced):
            continue
        prefix = f"{name}." if name else ""
        new = _fit(module, prefix, state_dict)
        if new is not None:
            replace_module(model, name, new)
            replaced.append(name)
    model.load_state_dict(state_dict, strict=True)
    return model


def _fit(module: nn.Module, prefix: str, state: dict[str, Tensor]) -> nn.Module | None:
    """A module shaped like ``state``'s entries under ``prefix``, or ``None`` when ``module`` fits."""
    if isinstance(module, nn.MultiheadAttention) and f"{prefix}kept_heads" in state:
        kept = state[f"{prefix}kept_heads"].tolist()
        out_bias = f"{prefix}out_proj.bias" in state
        weight = module.out_proj.weight
        return SlimMultiheadAttention(
            module.embed_dim, module.head_dim, kept, module.num_heads, kdim=module.kdim, vdim=module.vdim,
            in_bias=f"{prefix}in_proj_bias" in state, out_bias=out_bias, dropout=module.dropout,
            batch_first=module.batch_first, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
    if is_layer(module) and f"{prefix}weight" in state:
        weight = state[f"{prefix}weight"]
        has_bias = f"{prefix}bias" in state
        if weight.shape == module.weight.shape and has_bias == (module.bias is not None):
            return None
        with torch.no_grad():
            return empty_layer(module, weight, has_bias)
    if is_norm(module) and f"{prefix}running_mean" in state:
        size = state[f"{prefix}running_mean"].shape[0]
        if size == module.num_features:
            return None
        index = torch.zeros(size, dtype=torch.long, device=param(module, "running_mean").device)
        with torch.no_grad():
            return resized_norm(module, index)
    return None

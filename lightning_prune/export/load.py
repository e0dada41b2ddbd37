"""Rebuild a slimmed model from its state dict and a fresh instance of the original class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.export.attention import SlimMultiheadAttention
from lightning_prune.export.chains import is_layer, is_norm
from lightning_prune.export.resize import empty_layer, param, replace_module, resized_norm
from lightning_prune.export.structures import SIZES_KEY, conv1d_like, refresh_attributes


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
    _load_allowing_ties(model, state_dict)
    refresh_attributes(model)  # head counts, widths and config of Hugging Face modules, from the new shapes
    return model


def _load_allowing_ties(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """``load_state_dict(strict=True)``, except that a key may be missing when its tensor is tied to
    one that is loaded (``save_pretrained`` writes a tied LM head once)."""
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensors[key]) for key in state_dict if key in tensors}
    result = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if id(tensors[key]) not in loaded]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"load_slim_state_dict: keys missing from the state dict {missing}, unexpected keys "
            f"{list(result.unexpected_keys)}: the model is not an instance of the class that was slimmed"
        )


def load_slim_pretrained(model_class: Any, path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a Hugging Face model that ``slim`` made smaller and ``save_pretrained(path)`` saved.

    ``slim`` records in the model's config (``lightning_prune_slim``) the weight shape of every layer
    it resized. This builds ``model_class`` from the saved config, resizes those layers, sets the head
    counts and widths each attention and FFN module reads, then lets ``from_pretrained`` load the
    weights (its own key renaming and checks included). ``model_class.from_pretrained(path)`` alone
    works only when every layer kept the same sizes and the config can say so (Llama-style configs,
    which hold ``head_dim``); this works in every case.

    Args:
        model_class: the Hugging Face model class, e.g. ``LlamaForCausalLM``.
        path: the folder ``save_pretrained`` wrote.
        kwargs: passed to ``from_pretrained`` (``torch_dtype``, ``device_map``...).

    Returns:
        the model, an instance of ``model_class``, in eval mode.
    """

    class _Slim(model_class):  # type: ignore[misc]
        def __init__(self, config: Any, *args: Any, **options: Any) -> None:
            super().__init__(config, *args, **options)
            resize_to_shapes(self, dict(getattr(config, SIZES_KEY, None) or {}))

    _Slim.__name__ = _Slim.__qualname__ = model_class.__name__
    model = _Slim.from_pretrained(path, **kwargs)
    model.__class__ = model_class
    return model.eval()  # type: ignore[no-any-return]


def resize_to_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Replace each layer named in ``shapes`` by an uninitialised one of that weight shape (as
    stored), then set the size attributes of the modules that read them."""
    for name, shape in shapes.items():
        module = model.get_submodule(name)
        weight = module.weight
        assert isinstance(weight, Tensor)
        if list(weight.shape) == list(shape):
            continue
        with torch.no_grad():
            if type(module).__name__ == "Conv1D":
                new: nn.Module = conv1d_like(module, shape[0], shape[1])
            elif is_layer(module):
                new = empty_layer(module, torch.empty(shape, device="meta"), module.bias is not None)
            else:
                raise ValueError(
                    f"{name}: a {type(module).__name__} cannot be resized by load_slim_pretrained"
                )
        replace_module(model, name, new)
    refresh_attributes(model)


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
    if type(module).__name__ == "Conv1D" and f"{prefix}weight" in state:  # Hugging Face, stored (in, out)
        weight = state[f"{prefix}weight"]
        if weight.shape == module.weight.shape:
            return None
        return conv1d_like(module, weight.shape[0], weight.shape[1])
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

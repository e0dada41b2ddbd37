"""Build resized copies of Linear, ConvNd and BatchNormNd layers, and swap modules by name."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_prune.export.chains import Layer, Norm


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def param(module: nn.Module, name: str) -> Tensor:
    """``module``'s parameter or buffer ``name``, which must be a tensor (not ``None``)."""
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is {type(value).__name__}, not a tensor")
    return value


def resized_layer(
    layer: Layer, out_index: Tensor | None, in_index: Tensor | None, extra_bias: Tensor | None
) -> Layer:
    """A new Linear/ConvNd holding the selected output rows and input columns of ``layer``."""
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    if out_index is not None:
        weight = weight.index_select(0, out_index)
        bias = None if bias is None else bias.index_select(0, out_index)
    if in_index is not None:
        weight = weight.index_select(1, in_index)
    if extra_bias is not None:
        base = torch.zeros_like(extra_bias) if bias is None else bias.double()
        bias = (base + extra_bias).to(weight.dtype)
    new = empty_layer(layer, weight, bias is not None)
    new.weight.copy_(weight)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if bias is not None and new.bias is not None:  # new has a bias exactly when bias is set
        new.bias.copy_(bias)
        new.bias.requires_grad_(
            layer.weight.requires_grad if layer.bias is None else layer.bias.requires_grad
        )
    return new.train(layer.training)


def resized_norm(norm: Norm, index: Tensor) -> Norm:
    """A new BatchNormNd holding the selected channels of ``norm``."""
    running_mean = param(norm, "running_mean")
    new = type(norm)(
        len(index),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
        device=running_mean.device,
        dtype=running_mean.dtype,
    )
    for attr in ("weight", "bias", "running_mean", "running_var"):
        old = getattr(norm, attr)
        if old is not None:
            getattr(new, attr).copy_(old.detach().index_select(0, index))
            if isinstance(old, nn.Parameter):
                getattr(new, attr).requires_grad_(old.requires_grad)
    if norm.num_batches_tracked is not None and new.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new.train(norm.training)


def empty_layer(module: Layer, weight: Tensor, has_bias: bool) -> Layer:
    """A layer like ``module`` with ``weight``'s shape (values are loaded afterwards)."""
    out_size, in_size = weight.shape[0], weight.shape[1]
    device, dtype = module.weight.device, module.weight.dtype
    if isinstance(module, nn.Linear):
        return nn.Linear(in_size, out_size, bias=has_bias, device=device, dtype=dtype)
    # torch annotates _ConvNd.kernel_size, stride, padding and dilation as tuple[int, ...] but ConvNd's
    # constructor as N-tuples; values read from a module of the same class are N-tuples.
    return type(module)(
        in_size, out_size, groups=1, bias=has_bias, padding_mode=module.padding_mode, device=device, dtype=dtype,
        kernel_size=module.kernel_size, stride=module.stride, padding=module.padding, dilation=module.dilation,  # type: ignore[arg-type]
    )  # fmt: skip

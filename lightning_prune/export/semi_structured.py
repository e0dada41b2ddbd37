"""to_semi_structured: 2:4 sparse Linear weights as PyTorch semi-structured sparse tensors (GPU).

A weight is 2:4 sparse when every run of 4 consecutive input weights of each output row holds at
most 2 non-zeros: the grouping of ``pattern="2:4"`` (:class:`~lightning_prune.NMPattern`) for Linear
layers, and the one NVIDIA's sparse tensor cores (compute capability 8.0+) accelerate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_prune.export.resize import param
from lightning_prune.layouts import prunable_weights

if TYPE_CHECKING:
    from torch.sparse import SparseSemiStructuredTensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = ("auto", "cusparselt", "cutlass")
MIN_CAPABILITY = (8, 0)


def two_four_fraction(weight: Tensor) -> float:
    """Fraction of the runs of 4 consecutive input weights that hold at most 2 non-zeros.

    Args:
        weight: a 2-D ``(out, in)`` weight with ``in`` divisible by 4.

    Raises:
        ValueError: for another shape.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} must be 2-D with an input size divisible by 4"
        )
    groups = weight.detach().ne(0).reshape(weight.shape[0], -1, 4).sum(-1)
    return float(groups.le(2).float().mean())


def is_two_four(weight: Tensor) -> bool:
    """Whether every run of 4 consecutive input weights of ``weight`` holds at most 2 non-zeros."""
    return weight.dim() == 2 and weight.shape[1] % 4 == 0 and two_four_fraction(weight) == 1.0


@dataclass
class SemiStructuredResult:
    """What :func:`to_semi_structured` converted.

    Args:
        model: the model with converted weights (the input itself when ``inplace=True``).
        converted: qualified names of the Linear layers whose weight is now semi-structured.
        skipped: other Linear layers, with why they stay dense.
        backend: ``"cusparselt"`` or ``"cutlass"``; ``None`` for a dry run.
    """

    model: nn.Module
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str | None = None

    def __str__(self) -> str:
        how = f" ({self.backend})" if self.backend else " (dry run: nothing converted)"
        lines = [f"to_semi_structured{how}: {len(self.converted)} Linear layers 2:4"]
        lines.extend(f"  converted {name}" for name in self.converted)
        lines.extend(f"  skipped   {name}: {reason}" for name, reason in self.skipped.items())
        return "\n".join(lines)


def _backend_class(backend: str) -> type[SparseSemiStructuredTensor]:
    if backend == "cutlass":
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def _resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def _shape_reason(weight: Tensor, backend: str) -> str | None:
    """Why the backend's kernel refuses ``weight``'s shape, or ``None``."""
    constraints = getattr(_backend_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(weight.dtype)
    rows, cols = (
        (32, 64) if constraints is None else (constraints.sparse_min_rows, constraints.sparse_min_cols)
    )
    out_size, in_size = weight.shape
    if out_size < rows or out_size % rows or in_size < cols or in_size % cols:
        return (
            f"shape {tuple(weight.shape)}: the {backend} kernel needs out_features a multiple of {rows} and "
            f"in_features a multiple of {cols}"
        )
    return None


def to_semi_structured(
    model: nn.Module, *, backend: str = "auto", inplace: bool = False, dry_run: bool = False
) -> SemiStructuredResult:
    """Store every 2:4 sparse ``nn.Linear`` weight as a semi-structured sparse tensor, for inference.

    Every ``nn.Linear`` whose weight is exactly 2:4 sparse (see :func:`is_two_four`) is converted with
    ``torch.sparse`` (cuSPARSELt or CUTLASS kernels); the others stay dense and are listed with the
    reason. The converted weights do not take gradients. Whether it is faster depends on the shape:
    large layers gain, small ones can be slower than dense (see ``benchmarks/RESULTS.md``).

    Args:
        model: the pruned network, on a CUDA GPU of compute capability 8.0 or newer, in float16 or
            bfloat16 (convert first: ``model.half().cuda()``).
        backend: ``"auto"`` (cuSPARSELt when this torch build has it, else CUTLASS),
            ``"cusparselt"`` or ``"cutlass"``.
        inplace: convert ``model`` itself instead of a deep copy (saves GPU memory).
        dry_run: only report which layers would be converted; needs no GPU and changes nothing.

    Returns:
        :class:`SemiStructuredResult`; ``print(result)`` lists every Linear layer.

    Raises:
        ValueError: on a bad argument, a 2:4 layer in another dtype, or when no layer can be converted.
        RuntimeError: when the weights are not on a CUDA GPU, the GPU is older than compute
            capability 8.0, or the backend asked for is missing from this torch build.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} must be a torch.nn.Module")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    for flag, value in (("inplace", inplace), ("dry_run", dry_run)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag}={value!r} must be True or False")
    resolved = _resolve_backend(backend)
    planned, skipped, wrong_dtype = _plan(model, resolved)
    if dry_run:  # report, never refuse: what would convert once the dtype is right, and why not
        for name, dtype in wrong_dtype.items():
            skipped[name] = f"2:4 sparse, but {dtype}: convert the model to float16 or bfloat16 first"
        return SemiStructuredResult(model, planned, skipped, None)
    if wrong_dtype:
        raise ValueError(
            f"to_semi_structured needs float16 or bfloat16 weights; these 2:4 layers are not: {wrong_dtype}. "
            "Convert the model first, e.g. model.to(torch.bfloat16)"
        )
    if not planned:
        raise ValueError(f"no Linear layer can be converted to 2:4 semi-structured sparsity: {skipped}")
    _check_device(model, planned, backend)
    target = model if inplace else copy.deepcopy(model)
    sparse_class = _backend_class(resolved)
    with torch.no_grad():
        for name in planned:
            layer = target.get_submodule(name)
            sparse = sparse_class.from_dense(param(layer, "weight").detach().contiguous())
            layer.weight = nn.Parameter(sparse, requires_grad=False)
    return SemiStructuredResult(target, planned, skipped, resolved)


def _plan(model: nn.Module, backend: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """``(to convert, skipped with reasons, 2:4 layers in a dtype the kernels refuse)``."""
    planned: list[str] = []
    skipped: dict[str, str] = {}
    wrong_dtype: dict[str, str] = {}
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            skipped.update(_other_layer(name, module))
            continue
        weight = module.weight
        if any(name.startswith(f"{a}.") for a in attention):
            skipped[name] = "inside nn.MultiheadAttention, which reads out_proj.weight itself"
        elif type(module) is not nn.Linear:
            skipped[name] = (
                f"its type {type(module).__name__} is not exactly nn.Linear (its forward may differ)"
            )
        elif weight.shape[1] % 4:
            skipped[name] = f"in_features={weight.shape[1]} is not a multiple of 4"
        elif not is_two_four(weight):
            share = 1.0 - two_four_fraction(weight)
            skipped[name] = (
                f"not 2:4 sparse: {share:.1%} of its groups of 4 inputs have more than 2 non-zeros"
            )
        elif weight.dtype not in SUPPORTED_DTYPES:
            wrong_dtype[name] = str(weight.dtype).removeprefix("torch.")
        elif (reason := _shape_reason(weight, backend)) is not None:
            skipped[name] = reason
        else:
            planned.append(name)
    return planned, skipped, wrong_dtype


def _other_layer(name: str, module: nn.Module) -> dict[str, str]:
    """Why a prunable weight of another layer type (Conv1D, convolutions, attention) is not converted."""
    if isinstance(module, nn.Embedding):
        return {}  # a lookup, not a matrix product: nothing to accelerate
    reasons = {}
    for param_name, layout in prunable_weights(module):
        weight = layout.to_standard(getattr(module, param_name))
        label = name if param_name == "weight" else f"{name}.{param_name}"
        flat = weight.reshape(weight.shape[0], -1) if weight.dim() == 2 else None
        sparse = "2:4 sparse along its inputs" if flat is not None and is_two_four(flat) else "not 2:4"
        reasons[label] = (
            f"{type(module).__name__} ({layout.name}, {sparse}): only nn.Linear weights are converted; "
            "a Conv1D can be replaced by an nn.Linear with its weight transposed"
            if type(module).__name__ == "Conv1D"
            else f"{type(module).__name__} ({layout.name}, {sparse}): only nn.Linear weights are converted"
        )
    return reasons


def _check_device(model: nn.Module, planned: list[str], backend: str) -> None:
    devices = {param(model.get_submodule(name), "weight").device for name in planned}
    off_gpu = sorted(str(d) for d in devices if d.type != "cuda")
    if off_gpu:
        available = "available" if torch.cuda.is_available() else "not available in this process"
        raise RuntimeError(
            f"to_semi_structured needs the model on a CUDA GPU (compute capability >= 8.0), but 2:4 weights are "
            f"on {off_gpu} (CUDA is {available}); move it with model.cuda() first"
        )
    for device in devices:
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise RuntimeError(
                f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                "2:4 semi-structured kernels need 8.0 or newer (A100, H100, RTX 30xx and later)"
            )
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if backend == "cusparselt" and (cusparselt is None or not cusparselt.is_available()):
        raise RuntimeError(
            "backend='cusparselt' but this torch build has no cuSPARSELt; use backend='cutlass'"
        )

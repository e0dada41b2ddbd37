"""``sparsity_report``: how sparse a model is, layer by layer, counted from its weights.

It counts zeros in the weights themselves, not masks, so it reports the same for a model pruned by
this library, by ``torch.nn.utils.prune`` (whose ``weight`` attribute is the masked product) or by
hand, and it tells which zeros a physical export can use: whole output rows, whole input channels,
and whether a layer is 2:4 along its input channels.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_prune.files import write_atomically
from lightning_prune.layouts import STANDARD, Layout
from lightning_prune.patterns import to_canonical
from lightning_prune.sharding import is_sharded
from lightning_prune.targets import is_op_type, model_weights

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros in one layer's weight.

    Args:
        name: qualified module name (``torch.compile``'s ``_orig_mod`` removed), with
            ``.<parameter>`` for a parameter not called ``weight``; a tied weight once, under the
            first module that holds it.
        type: module class name (``Parameter`` for a tensor no layer type reads, like ViT's
            position embeddings).
        shape: weight shape, as stored.
        numel: number of weights.
        zeros: number of weights that are exactly zero.
        sparsity: ``zeros / numel``.
        zero_rows: output rows (Linear) or filters (Conv) that are entirely zero, read through the
            layer's layout (a Hugging Face ``Conv1D`` stores outputs as columns).
        zero_channels: input columns (Linear) or input channels (Conv; of every group of a grouped
            convolution) that are entirely zero.
        is_2of4: whether every group of 4 consecutive input weights holds at most 2 non-zeros
            (``False`` when the input size is not a multiple of 4).
        pattern: how the layer was pruned, or why it was left dense, when the caller knows.
        layout: how the stored weight maps to ``(out, in, *kernel)`` (see ``layouts.py``).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    sparsity: float
    zero_rows: int
    zero_channels: int
    is_2of4: bool
    pattern: str = ""
    layout: str = "standard"


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and overall zeros of a model.

    Args:
        layers: one entry per weight, in module order (a weight shared by several modules once).
    """

    layers: tuple[LayerSparsity, ...]

    @property
    def numel(self) -> int:
        """Weights over all reported layers."""
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        """Zero weights over all reported layers."""
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all reported layers (0 for a model with no weights)."""
        return self.zeros / self.numel if self.numel else 0.0

    def __getitem__(self, name: str) -> LayerSparsity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the report; layers: {[layer.name for layer in self.layers]}")

    def table(self, title: str | None = "Sparsity by layer") -> Table:
        """The report as a ``rich`` table, with a total row."""
        from rich.table import Table  # imported where it is used: rich is only needed to print

        show_pattern = any(layer.pattern for layer in self.layers)
        table = Table(title=title)
        table.add_column("layer")
        table.add_column("shape")
        if show_pattern:
            table.add_column("pattern")
        for column in ("weights", "sparsity", "zero rows", "zero channels", "2:4"):
            table.add_column(column, justify="right")
        for layer in self.layers:
            cells = [layer.name, "x".join(map(str, layer.shape))]
            if show_pattern:
                cells.append(layer.pattern)
            cells += [
                f"{layer.numel:,}",
                f"{layer.sparsity:.1%}",
                str(layer.zero_rows),
                str(layer.zero_channels),
                "yes" if layer.is_2of4 else "no",
            ]
            table.add_row(*cells)
        total = ["total", ""] + ([""] if show_pattern else []) + [f"{self.numel:,}", f"{self.sparsity:.1%}"]
        table.add_row(*total, "", "", "", end_section=True)
        return table

    def __str__(self) -> str:
        from rich.console import Console

        text = io.StringIO()
        Console(file=text, width=120, color_system=None).print(self.table())
        return text.getvalue()

    def to_csv(self, path: str) -> None:
        """Write one row per layer (every field; shape as ``AxB``) to ``path``, atomically."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(LayerSparsity)])
        writer.writeheader()
        for layer in self.layers:
            row = asdict(layer)
            row["shape"] = "x".join(map(str, layer.shape))
            writer.writerow(row)
        write_atomically(path, buffer.getvalue())


def describe_left_out(left_out: dict[str, tuple[int, str]], share: float) -> str:
    """One message: the share of the model's weights left dense, by reason, naming the layers."""
    by_reason: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name, (numel, reason) in left_out.items():
        by_reason.setdefault(reason, []).append(name)
        sizes[reason] = sizes.get(reason, 0) + numel
    parts = []
    for reason, names in by_reason.items():
        shown = names if len(names) <= 4 else [*names[:3], f"... {len(names) - 3} more"]
        parts.append(f"{reason}: {sizes[reason]:,} weights in {shown}")
    return (
        f"lightning_prune leaves {share:.1%} of the model's weights with 2 or more dims dense; "
        + "; ".join(parts)
    )


def _weights(model: nn.Module, op_types: Sequence[str] | None) -> Iterable[tuple[str, str, Tensor, Layout]]:
    """``(name, type, weight, layout)`` of every tensor of 2 or more dims, each once."""
    weights, _, others = model_weights(model)
    for weight in weights:
        holders = [h for h in weight.holders if op_types is None or is_op_type(h[1], op_types)]
        if holders:
            name, module, param_name, layout = holders[0]
            yield name, type(module).__name__, getattr(module, param_name), layout
    if op_types is None:
        params = dict(model.named_parameters())
        for name, _ in others.items():
            yield name, "Parameter", params.get(name, _find(model, name)), STANDARD


def _find(model: nn.Module, name: str) -> Tensor:
    # A name as plain_name wrote it (no torch.compile wrapper): look it up without the wrapper.
    for full, param in model.named_parameters():
        if ".".join(p for p in full.split(".") if p != "_orig_mod") == name:
            return param
    raise KeyError(name)


@torch.no_grad()
def layer_sparsity(
    name: str, kind: str, weight: Tensor, pattern: str = "", layout: Layout = STANDARD
) -> LayerSparsity:
    """Count the zeros of one ``weight`` and the structure they form in its ``layout``.

    A sharded (FSDP2) weight is gathered whole first: a collective, so every rank must report.
    """
    if is_sharded(weight):
        weight = weight.full_tensor()  # type: ignore[attr-defined]
    standard = layout.to_standard(weight.detach())
    zero = to_canonical(standard) == 0  # (out, K, in)
    out, kernel, inputs = zero.shape
    nonzero_per_quad = (~zero).reshape(out, kernel, inputs // 4, 4).sum(-1) if inputs % 4 == 0 else None
    groups = layout.groups
    # Input channel j of group g is read only by that group's filters: zero when they all skip it.
    by_group = zero.reshape(groups, out // groups, kernel, inputs)
    counts = torch.stack(
        [
            zero.sum(),
            zero.all(dim=2).all(dim=1).sum(),
            by_group.all(dim=2).all(dim=1).sum(),
            (nonzero_per_quad > 2).sum()
            if nonzero_per_quad is not None
            else zero.new_ones((), dtype=torch.long),
        ]
    ).tolist()  # one device sync per layer
    numel = weight.numel()
    return LayerSparsity(
        name=name,
        type=kind,
        shape=tuple(weight.shape),
        numel=numel,
        zeros=counts[0],
        sparsity=counts[0] / numel,
        zero_rows=counts[1],
        zero_channels=counts[2],
        is_2of4=counts[3] == 0,
        pattern=pattern,
        layout=layout.name,
    )


def sparsity_report(model: nn.Module, op_types: Sequence[str] | None = None) -> SparsityReport:
    """Count the zeros of every parameter of ``model`` that has at least 2 dims, each tensor once.

    Works on any model, also one pruned elsewhere: it reads the weights, not masks. Layers are read
    through their layout (``layouts.py``): a Hugging Face ``Conv1D``'s rows are its inputs, an
    ``nn.MultiheadAttention``'s ``in_proj_weight`` is reported, a weight tied to another module
    once. Tensors no layer type reads (ViT's position embeddings) are reported as ``Parameter``.

    Args:
        model: the network to inspect.
        op_types: module class names to report (subclasses count); ``None`` reports every
            parameter with 2 or more dims.

    Returns:
        the per-layer counts and, as properties, the overall ``numel``, ``zeros`` and ``sparsity``.

    Example::

        >>> from torch import nn
        >>> layer = nn.Linear(4, 2)
        >>> _ = nn.init.zeros_(layer.weight[0])
        >>> report = sparsity_report(nn.Sequential(layer))
        >>> report.sparsity, report["0"].zero_rows
        (0.5, 1)
    """
    if op_types is not None and (isinstance(op_types, str) or not all(isinstance(t, str) for t in op_types)):
        raise ValueError(f"op_types={op_types!r} must be a list of module class names, or None for all")
    layers = (
        layer_sparsity(name, kind, weight, layout=layout)
        for name, kind, weight, layout in _weights(model, op_types)
    )
    return SparsityReport(tuple(layers))

"""Layouts: how each module type stores its weights, mapped to the one layout patterns read.

Patterns, reports and exports read every weight as ``(out, in, *kernel)``, PyTorch's own layout for
``nn.Linear`` and ``nn.ConvNd``: output rows/filters first, input columns/channels second. Other
modules store theirs differently: Hugging Face's ``Conv1D`` (GPT-2) keeps ``(in, out)``,
``nn.ConvTransposeNd`` keeps ``(in, out, *kernel)``, and ``nn.MultiheadAttention`` stacks its query,
key and value projections in one ``in_proj_weight`` of ``3 * embed_dim`` rows. A :class:`Layout`
turns the stored tensor into a *view* in the standard layout and back, so that ``"2:4"`` runs along
inputs and ``"channelx1"`` removes input channels on every layer type.

Adding a module type is one registered function (by class name, so optional libraries such as
``transformers`` need not be imported)::

    @register_layout("MyLinear")
    def _my_linear(module):
        return [("weight", TRANSPOSED)]  # stored (in, out)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Layout:
    """How a stored weight maps to the standard ``(out, in, *kernel)`` layout.

    Args:
        name: a short description shown in reports (``"standard"``, ``"(in, out)"``, ...).
        transposed: the stored tensor holds inputs first: ``(in, out, *kernel)``.
        groups: convolution groups (a filter sees ``in / groups`` input channels).
        row_blocks: the rows stack this many separate projections (q, k, v of an attention layer);
            a pattern must tile each block on its own.
    """

    name: str = "standard"
    transposed: bool = False
    groups: int = 1
    row_blocks: int = 1

    def to_standard(self, stored: Tensor) -> Tensor:
        """A view of ``stored`` as ``(out, in, *kernel)`` (writes through it reach the weight)."""
        return stored.transpose(0, 1) if self.transposed else stored

    def from_standard(self, standard: Tensor) -> Tensor:
        """A view of a standard-layout tensor in the stored layout (the inverse of :meth:`to_standard`)."""
        return standard.transpose(0, 1) if self.transposed else standard

    def standard_shape(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape :meth:`to_standard` gives for a stored tensor of ``stored_shape``."""
        shape = tuple(stored_shape)
        return (shape[1], shape[0], *shape[2:]) if self.transposed else shape

    def block_shape(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The standard shape of one of the ``row_blocks`` stacked projections."""
        shape = self.standard_shape(stored_shape)
        return (shape[0] // self.row_blocks, *shape[1:])

    def input_channels(self, stored_shape: tuple[int, ...]) -> int:
        """How many input channels the layer reads (``groups`` times the standard input size)."""
        return self.standard_shape(stored_shape)[1] * self.groups


STANDARD = Layout()
TRANSPOSED = Layout("(in, out)", transposed=True)

#: A registered function gives the prunable ``(parameter name, layout)`` pairs of a module.
LayoutRule = Callable[[nn.Module], list[tuple[str, Layout]]]
LAYOUT_RULES: dict[str, LayoutRule] = {}


def register_layout(*class_names: str) -> Callable[[LayoutRule], LayoutRule]:
    """Decorator: the function gives the prunable weights of modules of these class names.

    A subclass of a registered class uses its nearest registered base's rule.
    """

    def register(rule: LayoutRule) -> LayoutRule:
        for class_name in class_names:
            LAYOUT_RULES[class_name] = rule
        return rule

    return register


def _weight(module: nn.Module, layout: Layout) -> list[tuple[str, Layout]]:
    # A Tensor, not only a Parameter: under torch.nn.utils.prune or parametrize `weight` is computed.
    weight = getattr(module, "weight", None)
    return [("weight", layout)] if isinstance(weight, Tensor) and weight.dim() >= 2 else []


@register_layout("Linear", "Embedding")
def _linear(module: nn.Module) -> list[tuple[str, Layout]]:
    # Embedding rows are tokens, as in the LM head an embedding is often tied to.
    return _weight(module, STANDARD)


@register_layout("Conv1d", "Conv2d", "Conv3d")
def _conv(module: nn.Module) -> list[tuple[str, Layout]]:
    groups = int(getattr(module, "groups", 1))
    return _weight(module, STANDARD if groups == 1 else Layout(f"groups={groups}", groups=groups))


@register_layout("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
def _conv_transpose(module: nn.Module) -> list[tuple[str, Layout]]:
    # Stored (in, out / groups, *kernel); with groups > 1 no view gives the standard layout.
    groups = int(getattr(module, "groups", 1))
    return _weight(module, TRANSPOSED) if groups == 1 else []


@register_layout("Conv1D")
def _hf_conv1d(module: nn.Module) -> list[tuple[str, Layout]]:
    # transformers.pytorch_utils.Conv1D (GPT-2 and kin): y = x @ W + b with W stored (in, out).
    return _weight(module, TRANSPOSED)


@register_layout("MultiheadAttention")
def _multihead_attention(module: nn.Module) -> list[tuple[str, Layout]]:
    # out_proj is an nn.Linear of its own; the input projections are parameters of this module.
    stacked = getattr(module, "in_proj_weight", None)
    if isinstance(stacked, nn.Parameter):
        return [("in_proj_weight", Layout("q,k,v rows", row_blocks=3))]
    return [
        (name, STANDARD)
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        if isinstance(getattr(module, name, None), nn.Parameter)
    ]


def rule_for(module: nn.Module) -> LayoutRule | None:
    """The layout rule of ``module``'s class or its nearest registered base, or ``None``."""
    for cls in type(module).__mro__:
        rule = LAYOUT_RULES.get(cls.__name__)
        if rule is not None:
            return rule
    return None


def prunable_weights(module: nn.Module) -> list[tuple[str, Layout]]:
    """The ``(parameter name, layout)`` pairs of ``module`` that can be pruned (maybe none).

    A module of an unregistered type that has a ``weight`` parameter of 2 or more dims is read in
    the standard layout.
    """
    rule = rule_for(module)
    return rule(module) if rule is not None else _weight(module, STANDARD)

"""Find what :func:`~lightning_prune.export.slim` may shrink, from a ``torch.fx`` trace of the model.

A *chain* ends in a consumer layer (Linear or ConvNd) whose input is computed, unit by unit, from the
outputs of one or more producer layers of the same kind: ``Linear -> activation -> Linear``, a gated
FFN ``down(silu(gate(x)) * up(x))``, or ``ConvNd -> BatchNormNd -> activation -> ConvNd``. Every
tensor in between has a single user and every op in between is per-unit (elementwise, BatchNorm, or
elementwise arithmetic between two such tensors), so hidden unit ``j`` of the producers only reaches
input ``j`` of the consumer and can be removed on its own. Anything else (a second user, a reshape, a
normalisation over the hidden dim, a layer called twice) means no chain, and the reason is kept for
the report.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TypeAlias, TypeGuard

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.export.attention import SlimMultiheadAttention

LINEAR: tuple[type[nn.Module], ...] = (nn.Linear,)
CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}
#: The types in LINEAR, CONVS and NORMS, for annotations.
Layer: TypeAlias = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
Norm: TypeAlias = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d

#: Activation and dropout modules that act on every element alone (exact types: a subclass may not).
ELEMENTWISE_MODULES: frozenset[type[nn.Module]] = frozenset(
    {
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
        nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Softsign,
        nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout,
    }
)  # fmt: skip
#: Channel dropout zeroes whole channels: per-channel, so fine between convolutions.
CHANNEL_DROPOUT: frozenset[type[nn.Module]] = frozenset({nn.Dropout1d, nn.Dropout2d, nn.Dropout3d})

_FUNCTION_NAMES = (
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "silu", "mish", "tanh", "sigmoid",
    "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "elu", "elu_", "celu", "selu", "softplus",
    "softsign", "tanhshrink", "logsigmoid", "dropout", "clamp", "clamp_min", "clamp_max",
)  # fmt: skip
# Traced calls land on whichever namespace implements them (F.gelu is torch._C._nn.gelu), so collect
# the objects themselves from every namespace that has them.
ELEMENTWISE_FUNCTIONS: frozenset[object] = frozenset(
    getattr(namespace, name)
    for name in _FUNCTION_NAMES
    for namespace in (torch, F, torch._C._nn, torch.special)
    if hasattr(namespace, name)
)
ELEMENTWISE_METHODS = frozenset(
    {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_max",
     "contiguous"}
)  # fmt: skip
#: Arithmetic that is elementwise when the other operand is a Python number.
SCALAR_OPS: frozenset[object] = frozenset(
    {operator.mul, operator.truediv, operator.add, operator.sub, operator.pow, operator.neg,
     torch.mul, torch.add, torch.sub, torch.div, torch.neg}
)  # fmt: skip
#: Elementwise arithmetic between two hidden tensors (a gated FFN multiplies two of them).
BINARY_OPS: frozenset[object] = frozenset(
    {operator.mul, operator.add, operator.sub, torch.mul, torch.add, torch.sub}
)  # fmt: skip
#: Of those, the ones whose result is zero when either side is zero.
ZERO_PRODUCT_OPS: frozenset[object] = frozenset({operator.mul, torch.mul})


@dataclass
class Chain:
    """Producers -> per-unit ops -> consumer: hidden units that can be removed one by one.

    Args:
        kind: ``"linear"`` or ``"conv"``.
        producers: qualified names of the layers whose outputs are the hidden units, in graph order.
        consumer: qualified name of the layer that reads them.
        producer_nodes: the producers' graph nodes, in the same order.
        between: the graph nodes between producers and consumer, in graph order; the last one (or
            the only producer, when empty) is the consumer's input.
        norms: qualified names of the BatchNorm modules among ``between``.
    """

    kind: str
    producers: list[str]
    consumer: str
    producer_nodes: list[fx.Node] = field(default_factory=list)
    between: list[fx.Node] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)


@dataclass
class GraphFindings:
    """What :func:`find_chains` learned from one trace."""

    chains: list[Chain]
    #: Multi-head attention modules whose heads may be removed (attention weights unused).
    attention: list[str]
    #: Why a layer's outputs (rows, filters, heads) cannot be removed, by module name.
    output_reasons: dict[str, str]
    #: Why a layer's inputs (columns, input channels) cannot be removed, by module name.
    input_reasons: dict[str, str]
    #: How often each module is called by the traced forward.
    calls: dict[str, int]


class _Tracer(fx.Tracer):
    """The default tracer, with attention slimmed earlier kept whole like ``nn.MultiheadAttention``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, SlimMultiheadAttention) or super().is_leaf_module(m, module_qualified_name)


def is_layer(module: nn.Module) -> TypeGuard[Layer]:
    """Whether ``module`` is exactly one of :data:`LINEAR` or :data:`CONVS` (a subclass's forward may differ)."""
    return type(module) in (*LINEAR, *CONVS)


def is_norm(module: nn.Module) -> TypeGuard[Norm]:
    """Whether ``module`` is exactly one of the BatchNormNd in :data:`NORMS`."""
    return type(module) in NORMS.values()


def layer_at(root: nn.Module, name: str) -> Layer:
    """The submodule ``name`` of ``root``, which must be a Linear or ConvNd."""
    module = root.get_submodule(name)
    if not isinstance(module, Layer):
        raise TypeError(f"{name} is a {type(module).__name__}, not a Linear or ConvNd")
    return module


def norm_at(root: nn.Module, name: str) -> Norm:
    """The submodule ``name`` of ``root``, which must be a BatchNormNd."""
    module = root.get_submodule(name)
    if not isinstance(module, Norm):
        raise TypeError(f"{name} is a {type(module).__name__}, not a BatchNormNd")
    return module


def trace(model: nn.Module) -> fx.Graph:
    """Symbolically trace ``model`` (torch.nn modules stay leaves).

    Raises:
        RuntimeError: when ``torch.fx`` cannot trace the forward, with its message and what to do.
    """
    try:
        return _Tracer().trace(model)
    except Exception as error:  # any tracing failure means the same thing to the user
        raise RuntimeError(
            f"slim could not trace {type(model).__name__}.forward with torch.fx ({type(error).__name__}: "
            f"{error}). slim finds chains from the traced graph, so the forward must be traceable: no "
            "control flow on tensor values or shapes. Slim a traceable submodule instead (e.g. the "
            "backbone or the blocks one by one)."
        ) from error


def describe(node: fx.Node, root: nn.Module) -> str:
    """A short human name for a graph node."""
    if node.op == "call_module":
        return f"{node.target} ({type(root.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the model output"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    return f"{node.op} {node.target}"


def _other_nodes(node: fx.Node, tensor: fx.Node) -> list[fx.Node]:
    """Nodes among ``node``'s arguments other than ``tensor``."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n is not tensor else None)
    return found


def _is_elementwise(node: fx.Node, tensor: fx.Node, root: nn.Module, kind: str) -> str | None:
    """``None`` when ``node`` maps ``tensor`` element by element (per channel); else why not."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        kind_ok = type(module) in ELEMENTWISE_MODULES or (kind == "conv" and type(module) in CHANNEL_DROPOUT)
        if not kind_ok:
            return "not an elementwise op"
        if node.args[:1] != (tensor,) or _other_nodes(node, tensor):
            return "it takes other tensors too"
        return None
    if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
        if node.args[:1] != (tensor,) or _other_nodes(node, tensor):
            return "it takes other tensors too"
        if node.target is F.dropout and (node.kwargs.get("training") or node.args[2:3] == (True,)):
            return "dropout with training=True is random even in eval mode"
        return None
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        if node.args[:1] != (tensor,) or _other_nodes(node, tensor):
            return "it takes other tensors too"
        return None
    if node.op == "call_function" and node.target in SCALAR_OPS:
        others = [a for a in (*node.args, *node.kwargs.values()) if a is not tensor]
        if all(isinstance(a, int | float) for a in others) and tensor in node.args:
            return None
        return "arithmetic with a tensor, not a number"
    return "not an elementwise op"


def _module_reason(root: nn.Module, name: str, calls: dict[str, int], shared: set[str]) -> str | None:
    """Why module ``name`` cannot be resized in place, or ``None``."""
    module = root.get_submodule(name)
    if calls.get(name, 0) != 1:
        return f"{name} is called {calls.get(name, 0)} times by the forward"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return f"{name} has hooks (e.g. torch.nn.utils.prune); make pruning permanent first"
    if name in shared:
        return f"{name} shares a parameter with another module (tied weights)"
    if isinstance(module, CONVS) and module.groups != 1:
        return f"{name} is a grouped convolution (groups={module.groups})"
    return None


def _shared_modules(root: nn.Module) -> set[str]:
    owners: dict[int, set[str]] = {}
    for module_name, module in root.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(module_name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def find_chains(root: nn.Module, graph: fx.Graph) -> GraphFindings:
    """Every removable-unit chain and multi-head attention in ``graph``, and why other layers are not.

    Chains come in the graph order of their consumers, so a chain is listed after every chain that
    feeds one of its producers (whose shrinking changes that producer's columns and bias).
    """
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    shared = _shared_modules(root)
    order = {node: index for index, node in enumerate(graph.nodes)}
    chains: list[Chain] = []
    attention: list[str] = []
    output_reasons: dict[str, str] = {}
    input_reasons: dict[str, str] = {}
    layers: list[fx.Node] = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        module = root.get_submodule(name)
        if type(module) is nn.MultiheadAttention:
            reason = _attention_reason(node, root, name, calls, shared)
            if reason is None:
                attention.append(name)
            else:
                output_reasons[name] = reason
        elif type(module) in (*LINEAR, *CONVS):
            layers.append(node)
            chain_or_reason = _gather(node, root, calls, shared, order)
            if isinstance(chain_or_reason, str):
                input_reasons[name] = chain_or_reason
            else:
                chains.append(chain_or_reason)
    producers = {name for chain in chains for name in chain.producers}
    for node in layers:
        name = str(node.target)
        if name not in producers:
            own = _module_reason(root, name, calls, shared)
            output_reasons[name] = own if own is not None else _forward_reason(node, root, input_reasons)
    return GraphFindings(chains, attention, output_reasons, input_reasons, calls)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The distinct graph nodes among ``node``'s arguments, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n not in found else None)
    return found


def _is_binary(node: fx.Node, inputs: list[fx.Node]) -> bool:
    """Elementwise arithmetic between two hidden tensors, any other operand a number."""
    if node.op != "call_function" or node.target not in BINARY_OPS or len(inputs) != 2:
        return False
    others = [a for a in (*node.args, *node.kwargs.values()) if not isinstance(a, fx.Node)]
    return all(isinstance(a, int | float) for a in others)


def _norm_reason(node: fx.Node, root: nn.Module, calls: dict[str, int], shared: set[str]) -> str | None:
    module = root.get_submodule(str(node.target))
    reason = _module_reason(root, str(node.target), calls, shared)
    if reason is None and not module.track_running_stats:
        reason = f"{node.target} has no running statistics (track_running_stats=False)"
    if reason is None and (len(node.args) != 1 or node.kwargs):
        reason = f"{node.target} takes other arguments"
    return reason


def _gather(
    consumer: fx.Node, root: nn.Module, calls: dict[str, int], shared: set[str], order: dict[fx.Node, int]
) -> Chain | str:
    """The chain that ends in ``consumer``, found by walking its input back to the producers; or why none."""
    name = str(consumer.target)
    layer = layer_at(root, name)
    kind = "linear" if type(layer) in LINEAR else "conv"
    reason = _module_reason(root, name, calls, shared)
    if reason is not None:
        return reason
    if len(consumer.args) != 1 or consumer.kwargs or not isinstance(consumer.args[0], fx.Node):
        return f"{name} is called with other arguments"
    producer_nodes: list[fx.Node] = []
    between: list[fx.Node] = []
    norms: list[str] = []
    seen: set[fx.Node] = set()

    def visit(node: fx.Node) -> str | None:
        if node in seen:
            return None
        seen.add(node)
        if node.op == "placeholder":
            return f"it reads {describe(node, root)} (input features are part of the model's interface)"
        if len(node.users) != 1:
            names = ", ".join(describe(u, root) for u in node.users)
            return f"the output of {describe(node, root)} has {len(node.users)} users ({names})"
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            if type(module) is type(layer):
                producer_nodes.append(node)
                return _module_reason(root, str(node.target), calls, shared)
            if kind == "conv" and type(module) is NORMS[type(layer)]:
                why = _norm_reason(node, root, calls, shared)
                if why is not None:
                    return why
                norms.append(str(node.target))
                between.append(node)
                return visit(node.args[0])  # type: ignore[arg-type]
        inputs = tensor_inputs(node)
        if len(inputs) == 1:
            why = _is_elementwise(node, inputs[0], root, kind)
            if why is not None:
                return f"it comes from {describe(node, root)}: {why}"
            between.append(node)
            return visit(inputs[0])
        if _is_binary(node, inputs):
            between.append(node)
            return visit(inputs[0]) or visit(inputs[1])
        return f"it comes from {describe(node, root)}, which is not a per-unit op"

    reason = visit(consumer.args[0])
    if reason is not None:
        return reason
    hidden = layer.weight.shape[1]
    producers = [str(n.target) for n in sorted(producer_nodes, key=order.__getitem__)]
    sizes = {p: layer_at(root, p).weight.shape[0] for p in producers}
    if any(size != hidden for size in sizes.values()):
        return f"its producers' output sizes {sizes} differ from its input size {hidden}"
    return Chain(
        kind,
        producers,
        name,
        sorted(producer_nodes, key=order.__getitem__),
        sorted(between, key=order.__getitem__),
        [
            str(n.target)
            for n in sorted((b for b in between if str(b.target) in norms), key=order.__getitem__)
        ],
    )


def _forward_reason(start: fx.Node, root: nn.Module, input_reasons: dict[str, str]) -> str:
    """Why the outputs of layer ``start`` are in no chain, following them forward."""
    layer = root.get_submodule(str(start.target))
    kind = "linear" if type(layer) in LINEAR else "conv"
    current = start
    while True:
        users = list(current.users)
        if len(users) != 1:
            names = ", ".join(describe(u, root) for u in users) or "nothing"
            return f"the output of {describe(current, root)} has {len(users)} users ({names})"
        user = users[0]
        if user.op == "call_module":
            module = root.get_submodule(str(user.target))
            if type(module) is type(layer):
                return f"{user.target} cannot take a smaller input: {input_reasons.get(str(user.target), 'unknown')}"
            if kind == "conv" and type(module) is NORMS[type(layer)]:
                current = user
                continue
        if user.op == "output":
            return "its output is a model output"
        inputs = tensor_inputs(user)
        if _is_binary(user, inputs):
            current = user
            continue
        why = _is_elementwise(user, current, root, kind)
        if why is not None:
            return f"the output of {describe(current, root)} feeds {describe(user, root)}: {why}"
        current = user


def _attention_reason(
    node: fx.Node, root: nn.Module, name: str, calls: dict[str, int], shared: set[str]
) -> str | None:
    """Why the heads of multi-head attention ``name`` cannot be removed, or ``None``."""
    reason = _module_reason(root, name, calls, shared)
    if reason is not None:
        return reason
    module = root.get_submodule(name)
    assert isinstance(module, nn.MultiheadAttention)
    out_proj = module.out_proj
    if out_proj._forward_hooks or out_proj._forward_pre_hooks or f"{name}.out_proj" in shared:
        return f"{name}.out_proj has hooks or shared parameters"
    if module.bias_k is not None or module.add_zero_attn:
        return f"{name} uses add_bias_kv or add_zero_attn"
    for user in node.users:
        is_item = user.op == "call_function" and user.target is operator.getitem
        if not is_item:
            return f"its output tuple goes to {describe(user, root)}, which may read the attention weights"
        if user.args[1] != 0 and user.users:
            # The weights are averaged over (or listed per) head: removing heads changes them.
            return "its attention weights are used, and removing heads would change them"
    return None

"""Targets: which weights are pruned, each with its layout, and why every other weight is not.

A target is one parameter tensor, whatever the modules that hold it: a weight shared by several
modules (an LM head tied to the input embedding) is one target, pruned and counted once, with the
other holders named as its aliases.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from lightning_prune.layouts import LAYOUT_RULES, STANDARD, Layout, prunable_weights

#: Module types pruned by default: every Linear-like layer (HF's Conv1D included) and convolutions.
DEFAULT_OP_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")

#: Why a weight is left dense; the keys of :attr:`Selection.left_out` values.
HEAD = "the head (skip_last_layer)"
EMBEDDING = "an embedding (skip_embeddings)"
OP_TYPE = "not in op_types"
EXCLUDED = "excluded"
NOT_INCLUDED = "not included"
NOT_A_LAYER = "not a layer weight"
NOT_A_PARAMETER = "computed from other parameters (torch.nn.utils.prune, parametrize)"


@dataclass(frozen=True)
class Target:
    """One pruned weight.

    Args:
        name: qualified module name, as in ``model.named_modules()``, followed by ``.<parameter>``
            when the parameter is not called ``weight`` (``attn.in_proj_weight``).
        module: the module that holds the weight.
        param_name: attribute name of the weight on ``module``.
        layout: how the stored weight maps to the standard ``(out, in, *kernel)`` layout.
        aliases: names of the other modules that hold the same tensor (tied weights).
    """

    name: str
    module: nn.Module
    param_name: str = "weight"
    layout: Layout = STANDARD
    aliases: tuple[str, ...] = ()

    @property
    def param(self) -> Tensor:
        param = getattr(self.module, self.param_name)
        assert isinstance(param, Tensor)
        return param


@dataclass
class Selection:
    """What :func:`select_targets` chose, and why every other weight of 2 or more dims was left out.

    Args:
        targets: the weights to prune, in module registration order.
        left_out: every other weight of the model with 2 or more dims: ``name -> (numel, reason)``.
    """

    targets: list[Target]
    left_out: dict[str, tuple[int, str]] = field(default_factory=dict)

    def left_out_share(self) -> float:
        """Fraction of the model's weights of 2 or more dims that are not targets."""
        left = sum(numel for numel, _ in self.left_out.values())
        total = left + sum(t.param.numel() for t in self.targets)
        return left / total if total else 0.0

    def left_out_by_reason(self) -> dict[str, list[str]]:
        """The left-out weights grouped by reason, in model order."""
        grouped: dict[str, list[str]] = {}
        for name, (_, reason) in self.left_out.items():
            grouped.setdefault(reason, []).append(name)
        return grouped


def compile_patterns(
    key: str, regexes: str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | None
) -> tuple[re.Pattern[str], ...]:
    """Compile the regexes given for ``key`` (``include``/``exclude``), raising on a bad one."""
    if regexes is None:
        return ()
    if isinstance(regexes, str | re.Pattern):
        regexes = [regexes]
    if not isinstance(regexes, Sequence):
        raise ValueError(f"{key}={regexes!r} must be a regex string or a list of them")
    compiled = []
    for regex in regexes:
        if isinstance(regex, re.Pattern):
            compiled.append(regex)
            continue
        if not isinstance(regex, str):
            raise ValueError(f"{key} entry {regex!r} must be a regex string")
        try:
            compiled.append(re.compile(regex))
        except re.error as error:
            raise ValueError(f"{key} entry {regex!r} is not a valid regex: {error}") from error
    return tuple(compiled)


def plain_name(name: str) -> str:
    """A module name without ``torch.compile``'s ``_orig_mod`` wrapper, as the user wrote the model."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def is_op_type(module: nn.Module, op_types: Sequence[str]) -> bool:
    """Whether ``module``'s class or a base class is named in ``op_types`` (``out_proj`` is a Linear)."""
    return any(cls.__name__ in op_types for cls in type(module).__mro__)


def is_embedding(name: str, module: nn.Module) -> bool:
    """An ``nn.Embedding``, or a module under a name with ``embed`` in it (HF patch embeddings, stems)."""
    return isinstance(module, nn.Embedding) or "embed" in name.lower()


@dataclass
class _Weight:
    """A prunable tensor and every module that holds it, in registration order."""

    holders: list[tuple[str, nn.Module, str, Layout]]

    @property
    def names(self) -> list[str]:
        return [name for name, _, _, _ in self.holders]


def model_weights(model: nn.Module) -> tuple[list[_Weight], _Weight | None, dict[str, int]]:
    """Every prunable weight (once, with its holders), the one the last layer holds, and every other
    parameter of 2 or more dims with its size."""
    weights: list[_Weight] = []
    by_id: dict[int, _Weight] = {}
    last = None
    for module_name, module in model.named_modules():
        for param_name, layout in prunable_weights(module):
            param = getattr(module, param_name)
            base = plain_name(module_name)
            name = base if param_name == "weight" else f"{base}.{param_name}".lstrip(".")
            holder = (name, module, param_name, layout)
            if id(param) in by_id:
                by_id[id(param)].holders.append(holder)
            else:
                by_id[id(param)] = _Weight([holder])
                weights.append(by_id[id(param)])
            last = by_id[id(param)]
    others = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        # What torch.nn.utils.prune and parametrize keep behind a computed weight is read through it.
        hidden = name.endswith("_orig") or ".parametrizations." in f".{name}"
        if param.dim() >= 2 and not hidden and id(param) not in by_id and id(param) not in seen:
            seen.add(id(param))
            others[plain_name(name)] = param.numel()
    return weights, last, others


def check_op_types(model: nn.Module, op_types: Sequence[str]) -> None:
    """Raise for an op type that names no ``torch.nn`` class, no registered layout and no class in the model."""
    classes_in_model = {cls.__name__ for module in model.modules() for cls in type(module).__mro__}
    for op_type in op_types:
        known = isinstance(getattr(nn, op_type, None), type) or op_type in LAYOUT_RULES
        if not known and op_type not in classes_in_model:
            raise ValueError(
                f"op_types entry {op_type!r} names neither a torch.nn module class nor a class used in "
                f"the model; accepted: class names such as {list(DEFAULT_OP_TYPES)}"
            )


def select_targets(
    model: nn.Module,
    *,
    include: Sequence[re.Pattern[str]] = (),
    exclude: Sequence[re.Pattern[str]] = (),
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    skip_last_layer: bool = True,
    skip_embeddings: bool = True,
) -> Selection:
    """Pick the weights to prune, in module registration order, and say why the others are not.

    A weight is a target when a module holding it has a class (or base class) named in
    ``op_types``; it is not the model's last layer in registration order (the head) when
    ``skip_last_layer``, nor an embedding when ``skip_embeddings`` (see :func:`is_embedding`); at
    least one ``include`` regex finds one of its names (``re.search``; no ``include`` means all);
    and no ``exclude`` regex finds any of them. A tied weight is one target: skipping the head also
    leaves dense the embedding it is tied to.

    Raises:
        ValueError: an op type that names neither a ``torch.nn`` class, a registered layout nor a
            class in the model; an include/exclude regex that matches no candidate; an empty selection.
    """
    check_op_types(model, op_types)
    weights, head, others = model_weights(model)
    left_out: dict[str, tuple[int, str]] = {}
    candidates: list[tuple[_Weight, tuple[str, nn.Module, str, Layout]]] = []
    for weight in weights:
        holders = [h for h in weight.holders if is_op_type(h[1], op_types)]
        tensor = getattr(weight.holders[0][1], weight.holders[0][2])
        numel = tensor.numel()
        if not isinstance(tensor, nn.Parameter):
            left_out[weight.names[0]] = (numel, NOT_A_PARAMETER)
        elif not holders:
            types = sorted({type(h[1]).__name__ for h in weight.holders})
            left_out[weight.names[0]] = (numel, f"{OP_TYPE} ({', '.join(types)})")
        else:
            candidates.append((weight, holders[0]))
    for name, numel in others.items():
        left_out[name] = (numel, NOT_A_LAYER)
    if not candidates:
        raise ValueError(f"op_types={list(op_types)} matches no module with a weight in the model")
    names = [name for weight, _ in candidates for name in weight.names]
    for key, regexes in (("include", include), ("exclude", exclude)):
        for regex in regexes:
            if not any(regex.search(name) for name in names):
                raise ValueError(
                    f"{key} regex {regex.pattern!r} matches no candidate module; candidates are {names}"
                )
    chosen = []
    for weight, (name, module, param_name, layout) in candidates:
        numel = getattr(module, param_name).numel()
        reason = _reason_left_out(weight, head, include, exclude, skip_last_layer, skip_embeddings)
        if reason is not None:
            left_out[name] = (numel, reason)
            continue
        aliases = tuple(n for n in weight.names if n != name)
        chosen.append(Target(name, module, param_name, layout, aliases))
    if not chosen:
        raise ValueError(
            f"include={[r.pattern for r in include]}, exclude={[r.pattern for r in exclude]}, "
            f"skip_last_layer={skip_last_layer} and skip_embeddings={skip_embeddings} leave no module to "
            f"prune; candidates are {names}"
        )
    order = {name: i for i, name in enumerate(w.names[0] for w in weights)}
    ordered = dict(sorted(left_out.items(), key=lambda item: order.get(item[0], len(order))))
    return Selection(chosen, ordered)


def _reason_left_out(
    weight: _Weight,
    head: _Weight | None,
    include: Sequence[re.Pattern[str]],
    exclude: Sequence[re.Pattern[str]],
    skip_last_layer: bool,
    skip_embeddings: bool,
) -> str | None:
    names = weight.names
    if skip_last_layer and weight is head:
        tied = f", its weight tied to {names[:-1]}" if len(names) > 1 else ""
        return f"{HEAD}{tied}"
    if any(r.search(name) for r in exclude for name in names):
        return EXCLUDED
    if include and not any(r.search(name) for r in include for name in names):
        return NOT_INCLUDED
    # An include regex picks embeddings too: it overrides the default.
    embedding = any(is_embedding(name, module) for name, module, _, _ in weight.holders)
    if skip_embeddings and embedding and not include:
        return EMBEDDING
    return None

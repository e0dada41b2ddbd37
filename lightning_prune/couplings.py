"""Couplings: structures that span slices of several weights and can only go as one.

An attention head is its query, key and value output rows and the matching input columns of the
output projection; an FFN hidden unit is a row of the up (and gate) projection and the matching
column of the down projection. Zeroing a head's rows in one layer alone removes nothing: only the
whole coupled group does, and then the head or unit can be cut out of the model (``export.slim``).

A :class:`Coupling` lists its :class:`Member` slices: ``units`` consecutive runs of ``width``
indices along the output (``"out"``) or input (``"in"``) dimension of a weight, read in the
standard ``(out, in, *kernel)`` layout of ``layouts.py`` (so a Hugging Face ``Conv1D``, stored
``(in, out)``, is read transposed). Couplings are found by *recipes*: a function per module class
(by name, as layouts are registered) or per attribute shape (``q_proj``/``k_proj``/``v_proj``/
``o_proj`` with a ``head_dim``), returning the couplings the module holds. Built-in recipes
(``coupling_recipes.py``) cover ``nn.MultiheadAttention`` and Hugging Face Llama/Mistral/Qwen-style,
GPT-2, BERT and ViT attention and FFNs. A model they miss gets one of its own in a few lines::

    from lightning_prune.couplings import heads, register_coupling, units

    @register_coupling("MyBlock")
    def _my_block(block):
        return [heads(block.wq, block.wk, block.wv, block.wo, head_dim=block.head_dim),
                units([block.fc1], block.fc2)]

Grouped-query attention: a unit of a head coupling is one key/value head **with all the query heads
that read it** (``num_key_value_groups`` of them), so every pruned layer stays a valid GQA layer with
the same number of query heads per key/value head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lightning_prune.layouts import Layout, prunable_weights

#: What a coupling's units are; the pattern names that select them are in ``coupled.py``.
KINDS = ("head", "ffn")
DIMS = {"out": 0, "in": 1}


@dataclass(frozen=True)
class Member:
    """One weight's share of a coupling: ``units`` runs of ``width`` indices along ``dim``, from ``offset``.

    Args:
        module: the module holding the weight.
        dim: ``"out"`` (output rows/filters) or ``"in"`` (input columns/channels), in the standard
            ``(out, in, *kernel)`` layout.
        width: indices per unit along ``dim`` (a head's ``head_dim`` rows; 1 for an FFN unit).
        offset: index of the first unit's first index (the key block of a fused q/k/v weight).
        param_name: the weight's attribute name on ``module``.
        role: a short name for reports (``"q"``, ``"up"``, ``"down"``).
    """

    module: nn.Module
    dim: str
    width: int = 1
    offset: int = 0
    param_name: str = "weight"
    role: str = ""

    @property
    def axis(self) -> int:
        """0 for ``"out"``, 1 for ``"in"``."""
        return DIMS[self.dim]


@dataclass(frozen=True)
class Coupling:
    """Units that each span a slice of every member weight, pruned and removed as one.

    Args:
        units: how many units (heads, key/value groups, hidden units).
        members: the slices of each weight; every unit has one run in each.
        kind: ``"head"``, ``"ffn"`` or a name of the user's.
        name: qualified name of the module that holds the structure (set by :func:`find_couplings`).
        heads_per_unit: query heads in one unit (grouped-query attention: a key/value head and the
            query heads that read it); 1 otherwise.
    """

    units: int
    members: tuple[Member, ...]
    kind: str = "ffn"
    name: str = ""
    heads_per_unit: int = 1

    def describe(self, names: dict[int, str]) -> str:
        """Its structure as text (saved in checkpoints, compared on resume); ``names``: id(param) -> target."""
        parts = [
            f"{m.role or m.param_name}={names.get(id(_param(m)), '?')}[{m.dim} {m.offset}+{m.width}/unit]"
            for m in self.members
        ]
        return f"{self.kind}: {self.units} units of {self.heads_per_unit} head(s); {', '.join(parts)}"


def _param(member: Member) -> Tensor:
    value = getattr(member.module, member.param_name)
    if not isinstance(value, Tensor):
        raise ValueError(f"{type(member.module).__name__}.{member.param_name} is not a tensor")
    return value


def layout_of(member: Member) -> Layout:
    """The layout of the member's weight (``layouts.py``)."""
    for name, layout in prunable_weights(member.module):
        if name == member.param_name:
            return layout
    raise ValueError(
        f"{type(member.module).__name__}.{member.param_name} is not a prunable weight "
        "(no layout registered for it in layouts.py)"
    )


# ---------------------------------------------------------------------------- builders
def _out_size(module: nn.Module, param_name: str = "weight") -> int:
    member = Member(module, "out", param_name=param_name)
    return layout_of(member).standard_shape(tuple(_param(member).shape))[0]


def _in_size(module: nn.Module, param_name: str = "weight") -> int:
    member = Member(module, "in", param_name=param_name)
    return layout_of(member).standard_shape(tuple(_param(member).shape))[1]


def heads(
    q: nn.Module,
    k: nn.Module,
    v: nn.Module,
    o: nn.Module,
    *,
    head_dim: int,
) -> Coupling:
    """Attention heads of separate q, k, v and output projections (Linear-like layers).

    The number of query and key/value heads is read from the weights (``out / head_dim``); with
    fewer key/value heads than query heads (grouped-query attention) a unit is one key/value head
    and its ``num_heads / num_kv_heads`` query heads.

    Raises:
        ValueError: when the sizes do not divide into heads of ``head_dim``, or the output
            projection does not read the query heads' width.
    """
    q_out, k_out, v_out, o_in = _out_size(q), _out_size(k), _out_size(v), _in_size(o)
    if head_dim < 1 or q_out % head_dim or k_out % head_dim or k_out != v_out or o_in != q_out:
        raise ValueError(
            f"heads: q, k, v out {q_out}, {k_out}, {v_out} and o in {o_in} do not split into heads of "
            f"head_dim={head_dim} (k and v alike, o reading q's width)"
        )
    num_heads, num_kv = q_out // head_dim, k_out // head_dim
    if num_kv < 1 or num_heads % num_kv:
        raise ValueError(f"heads: {num_heads} query heads do not split evenly over {num_kv} key/value heads")
    per_kv = num_heads // num_kv
    return Coupling(
        num_kv,
        (
            Member(q, "out", head_dim * per_kv, role="q"),
            Member(k, "out", head_dim, role="k"),
            Member(v, "out", head_dim, role="v"),
            Member(o, "in", head_dim * per_kv, role="o"),
        ),
        kind="head",
        heads_per_unit=per_kv,
    )


def fused_heads(qkv: nn.Module, o: nn.Module, *, head_dim: int, param_name: str = "weight") -> Coupling:
    """Attention heads whose q, k and v projections are one layer, stacked along its outputs
    (GPT-2's ``c_attn``, ``nn.MultiheadAttention``'s ``in_proj_weight``), with output projection ``o``.

    Raises:
        ValueError: when the stacked outputs are not three blocks of ``o``'s input width in heads.
    """
    stacked, inner = _out_size(qkv, param_name), _in_size(o)
    if head_dim < 1 or stacked != 3 * inner or inner % head_dim:
        raise ValueError(
            f"fused_heads: {stacked} stacked outputs are not 3 blocks of o's {inner} inputs in heads of "
            f"head_dim={head_dim}"
        )
    return Coupling(
        inner // head_dim,
        (
            Member(qkv, "out", head_dim, 0, param_name, "q"),
            Member(qkv, "out", head_dim, inner, param_name, "k"),
            Member(qkv, "out", head_dim, 2 * inner, param_name, "v"),
            Member(o, "in", head_dim, role="o"),
        ),
        kind="head",
    )


def units(producers: Sequence[nn.Module], consumer: nn.Module, *, kind: str = "ffn") -> Coupling:
    """Hidden units: output ``j`` of every producer (up, and gate for SwiGLU) with input ``j`` of ``consumer``.

    Raises:
        ValueError: when a producer's outputs are not the consumer's inputs.
    """
    hidden = _in_size(consumer)
    sizes = [_out_size(p) for p in producers]
    if not producers or any(size != hidden for size in sizes):
        raise ValueError(f"units: producers emit {sizes} but the consumer reads {hidden} inputs")
    roles = ["up", "gate"] if len(producers) <= 2 else [f"producer{i}" for i in range(len(producers))]
    members = [Member(p, "out", role=role) for p, role in zip(producers, roles, strict=False)]
    return Coupling(hidden, (*members, Member(consumer, "in", role="down")), kind=kind)


# ---------------------------------------------------------------------------- recipes
#: A recipe gives the couplings a module holds (maybe none); it may raise ValueError with why not.
Recipe = Callable[[nn.Module], list[Coupling]]
#: Recipes by module class name (``register_coupling("LlamaAttention")``).
CLASS_RECIPES: dict[str, Recipe] = {}
#: Recipes tried on modules of any unregistered class, by what they look for (attribute names).
SHAPE_RECIPES: dict[str, Recipe] = {}


def register_coupling(*class_names: str) -> Callable[[Recipe], Recipe]:
    """Decorator: the function gives the couplings of modules of these class names (subclasses too).

    Example::

        @register_coupling("MyAttention")
        def _mine(module):
            return [heads(module.wq, module.wk, module.wv, module.wo, head_dim=module.head_dim)]
    """

    def register(recipe: Recipe) -> Recipe:
        for class_name in class_names:
            CLASS_RECIPES[class_name] = recipe
        return recipe

    return register


def register_shape_recipe(description: str) -> Callable[[Recipe], Recipe]:
    """Decorator: a recipe tried on every module whose class has no registered recipe; it returns
    ``[]`` for modules that do not have its shape. ``description`` says what it looks for."""

    def register(recipe: Recipe) -> Recipe:
        SHAPE_RECIPES[description] = recipe
        return recipe

    return register


def _class_recipe(module: nn.Module) -> Recipe | None:
    for cls in type(module).__mro__:
        recipe = CLASS_RECIPES.get(cls.__name__)
        if recipe is not None:
            return recipe
    return None


@dataclass
class Found:
    """What :func:`find_couplings` found: the couplings, and the recipes that refused a module."""

    couplings: list[Coupling]
    refused: dict[str, str]
    classes: list[str]


def find_couplings(model: nn.Module, kinds: Sequence[str]) -> Found:
    """Every coupling of ``kinds`` in ``model``, in module order, each named after its module.

    A module whose class has a registered recipe uses it; any other module is offered to every shape
    recipe. A module inside one already coupled is not looked at again (its parent's recipe took it).
    """
    couplings: list[Coupling] = []
    refused: dict[str, str] = {}
    claimed: set[int] = set()
    for name, module in model.named_modules():
        recipe = _class_recipe(module)
        recipes = [recipe] if recipe is not None else list(SHAPE_RECIPES.values())
        for candidate in recipes:
            try:
                found = candidate(module)
            except ValueError as error:
                refused[name] = str(error)
                continue
            for coupling in found:
                if coupling.kind not in kinds:
                    continue
                params = {id(_param(m)) for m in coupling.members}
                if params & claimed:
                    continue  # a parent's recipe already took these weights
                claimed |= params
                couplings.append(replace(coupling, name=name or type(module).__name__))
    classes = sorted({type(m).__name__ for m in model.modules()})
    return Found(couplings, refused, classes)


def check_member(coupling: Coupling, member: Member) -> None:
    """Raise ``ValueError`` unless the member's runs fit inside its weight."""
    shape = layout_of(member).standard_shape(tuple(_param(member).shape))
    end = member.offset + coupling.units * member.width
    if member.dim not in DIMS:
        raise ValueError(f"coupling {coupling.name}: member dim={member.dim!r} is not one of {list(DIMS)}")
    if member.width < 1 or member.offset < 0 or end > shape[member.axis]:
        raise ValueError(
            f"coupling {coupling.name}: {coupling.units} units of {member.width} from {member.offset} "
            f"along {member.dim} do not fit {member.role or member.param_name} of shape {tuple(shape)}"
        )


# ---------------------------------------------------------------------------- slices of scores and masks
def unit_view(standard: Tensor, member: Member, units: int) -> Tensor:
    """The member's slice of a standard-layout tensor as ``(units, elements per unit)`` (a copy
    for ``"in"`` members)."""
    part = standard.narrow(member.axis, member.offset, units * member.width)
    if member.axis == 1:
        part = part.transpose(0, 1)
    return part.reshape(units, -1)


def mark_units(keep: Tensor, member: Member, pruned: Tensor) -> None:
    """Set ``keep`` (standard layout, bool) to ``False`` over the runs of the ``pruned`` units."""
    span = pruned.repeat_interleave(member.width)
    part = keep.narrow(member.axis, member.offset, span.numel())
    if member.axis == 0:
        part[span] = False
    else:
        part[:, span] = False


def unit_counts(masks: Sequence[Tensor], coupling: Coupling, index: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(wholly masked, partly masked)`` per unit."""
    whole = torch.ones(coupling.units, dtype=torch.bool)
    some = torch.zeros(coupling.units, dtype=torch.bool)
    for member, i in zip(coupling.members, index, strict=True):
        view = unit_view(masks[i], member, coupling.units).cpu()
        whole &= ~view.any(dim=1)
        some |= ~view.all(dim=1)
    return whole, some & ~whole

"""Coupled patterns: prune whole attention heads and FFN hidden units across the weights they span.

``pattern="head"`` (or INC's name ``"mha"``) prunes attention heads, ``pattern="ffn"`` FFN hidden
units, ``pattern="head+ffn"`` both in one ranking. The Pruner hands such a pattern its targets; the
pattern finds the couplings (``couplings.py``) and from then on each coupling is one *layer* of the
selection (``thresholds.select_groups``) whose groups are its units:

- **score**: a unit's cost reduces its members' element scores: ``reduce="sum"`` adds every score
  of every weight of the unit; ``"mean"`` averages the members' mean scores, so that each weight
  (the few key rows of a grouped-query unit, its many query rows) counts the same.
- **select**: global or local scope as for any pattern; sparsity counts the coupled weights, so
  with local scope it is the share of each layer's heads (units) pruned.
- **commit**: the pruned units' runs become each member's mask; the masks are per weight as for any
  pattern, so the step hook, DDP broadcast, checkpoints and reports need nothing new.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_prune import coupling_recipes  # noqa: F401  (registers the built-in recipes)
from lightning_prune.couplings import (
    CLASS_RECIPES,
    KINDS,
    SHAPE_RECIPES,
    Coupling,
    check_member,
    find_couplings,
    mark_units,
    unit_counts,
    unit_view,
)
from lightning_prune.files import write_atomically
from lightning_prune.messages import warn
from lightning_prune.patterns import PATTERNS, Pattern
from lightning_prune.targets import Target
from lightning_prune.thresholds import LayerGroups

if TYPE_CHECKING:
    from lightning_prune.options import PruningOptions

REDUCES = ("sum", "mean")
#: Why a target is not pruned by a coupled pattern (``Pruner.left_out``).
NOT_COUPLED = "not part of a coupled unit of the pattern"


class CoupledPattern(Pattern):
    """Whole heads and/or FFN units, each spanning slices of several weights, pruned as one.

    Args:
        kinds: what to prune: ``("head",)``, ``("ffn",)`` or both.
        reduce: ``"sum"`` of every element score of a unit, or ``"mean"`` of its members' mean scores.
    """

    def __init__(self, kinds: Sequence[str] = ("head",), reduce: str = "mean") -> None:
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not kinds or any(kind not in KINDS for kind in kinds):
            raise ValueError(f"kinds={list(kinds)!r}: each must be one of {list(KINDS)}")
        if reduce not in REDUCES:
            raise ValueError(f"reduce={reduce!r} is not one of {list(REDUCES)}")
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.reduce = reduce

    def __str__(self) -> str:
        return "+".join(self.kinds)

    def check_options(self, options: PruningOptions) -> None:
        """Refuse what has no meaning for units spread over several weights."""
        for key, value in (("progressive", options.progressive), ("regularizer", options.regularizer)):
            if value is not None:
                raise ValueError(
                    f"{key}={value!r} works on groups inside one weight; pattern {str(self)!r} prunes units "
                    f"spread over several weights: use {key}=None with it"
                )

    def _refuse(self) -> ValueError:
        return ValueError(
            f"pattern {str(self)!r} ranks whole units spread over several weights, not groups inside one "
            "weight: scope='row', progressive pruning and group lasso do not apply to it; use "
            "scope='global' or 'local'"
        )

    # A coupled pattern has no groups inside one weight; the Pruner asks its couplings instead.
    def group_view(self, t: Tensor) -> Tensor:
        raise self._refuse()

    def from_group_view(self, groups: Tensor, shape: torch.Size) -> Tensor:
        raise self._refuse()

    def group_costs(self, scores: Tensor) -> Tensor:
        raise self._refuse()

    def pruned_elements(self, pruned_groups: Tensor, scores: Tensor) -> Tensor:
        raise self._refuse()

    def group_size(self, shape: torch.Size) -> int:
        return 1  # any weight can take part; whether it does is the couplings' business

    def couple(
        self, model: nn.Module, targets: list[Target], left_out: dict[str, tuple[int, str]]
    ) -> CoupledLayers:
        """The couplings of ``model`` whose every member is among ``targets``.

        Targets in no coupling are added to ``left_out``.

        Raises:
            ValueError: when none is found, naming the modules looked at and why each candidate was not used.
        """
        found = find_couplings(model, self.kinds)
        module_names = {id(m): n for n, m in model.named_modules()}
        by_param = {id(t.param): i for i, t in enumerate(targets)}
        kept: list[Coupling] = []
        dropped: dict[str, str] = {}
        for coupling in found.couplings:
            reason = _coupling_error(coupling, by_param, module_names)
            if reason is None:
                kept.append(coupling)
            else:
                dropped[coupling.name] = reason
        if not kept:
            what = " or ".join({"head": "attention heads", "ffn": "FFN units"}[k] for k in self.kinds)
            refused = f"; recipes refused {dict(list(found.refused.items())[:6])}" if found.refused else ""
            raise ValueError(
                f"pattern={str(self)!r} found no {what} to prune: looked at the model's "
                f"{len(found.classes)} module classes {found.classes}; "
                f"found but not selected: {dropped or 'none'}{refused}. Built-in recipes know class names "
                f"{sorted(CLASS_RECIPES)} and the attribute shapes {sorted(SHAPE_RECIPES)}; "
                "declare your own with lightning_prune.couplings.register_coupling (docs/extending.md)"
            )
        partial = {
            c.name: dropped[c.name]
            for c in found.couplings
            if c.name in dropped and any(id(_member_param(m)) in by_param for m in c.members)
        }
        if partial:  # some of its weights were selected: the user may expect them pruned
            warn(
                f"lightning_prune: pattern {str(self)!r} leaves {len(partial)} structure(s) dense because not all "
                f"of their weights are targets: {partial}"
            )
        used = {id(_member_param(m)) for c in kept for m in c.members}
        members = [t for t in targets if id(t.param) in used]
        for target in targets:
            if id(target.param) not in used:
                left_out[target.name] = (target.param.numel(), f"{NOT_COUPLED} {str(self)!r}")
        return CoupledLayers(kept, members, self.reduce)


def _member_param(member: Any) -> Tensor:
    value = getattr(member.module, member.param_name)
    assert isinstance(value, Tensor)
    return value


def _coupling_error(coupling: Coupling, by_param: dict[int, int], module_names: dict[int, str]) -> str | None:
    """Why ``coupling`` cannot be pruned with these targets, or ``None``."""
    spans: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for member in coupling.members:
        try:
            check_member(coupling, member)
        except ValueError as error:
            return str(error)
        name = module_names.get(id(member.module), type(member.module).__name__)
        if id(_member_param(member)) not in by_param:
            return f"its {member.role or 'member'} {name} is not a target (include/exclude, op_types, skip_last_layer, frozen)"
        key = (by_param[id(_member_param(member))], member.axis)
        start, end = member.offset, member.offset + coupling.units * member.width
        for other_start, other_end in spans.get(key, []):
            if start < other_end and other_start < end:
                return f"two of its members overlap in {name}"
        spans.setdefault(key, []).append((start, end))
    axes: dict[int, int] = {}
    for target, axis in spans:
        if axes.setdefault(target, axis) != axis:
            return "one weight is a member along both its rows and its columns"
    return None


class CoupledLayers:
    """The couplings a Pruner prunes, seen by the engine as selection layers of units.

    Args:
        couplings: the couplings, in module order.
        targets: every member weight, in model order (the Pruner's targets).
        reduce: how member scores make a unit's cost (see :class:`CoupledPattern`).
    """

    def __init__(self, couplings: list[Coupling], targets: list[Target], reduce: str) -> None:
        self.couplings = couplings
        self.targets = targets
        self.reduce = reduce
        position = {id(t.param): i for i, t in enumerate(targets)}
        #: Per coupling, the target index of each member.
        self.index = [[position[id(_member_param(m))] for m in c.members] for c in couplings]

    def layer_groups(self, standards: Sequence[Tensor]) -> list[LayerGroups]:
        """One :class:`LayerGroups` per coupling from the targets' standard-layout element scores."""
        layers = []
        for coupling, index in zip(self.couplings, self.index, strict=True):
            parts = [
                unit_view(standards[i], m, coupling.units)
                for m, i in zip(coupling.members, index, strict=True)
            ]
            if self.reduce == "sum":
                costs = torch.stack([p.sum(dim=1, dtype=torch.float64) for p in parts]).sum(0)
            else:
                costs = torch.stack([p.double().mean(dim=1) for p in parts]).mean(0)
            size = sum(p.shape[1] for p in parts)
            layers.append(LayerGroups(costs.float(), size, size * coupling.units))
        return layers

    def keeps(self, selected: Sequence[Tensor], standards: Sequence[Tensor]) -> list[Tensor]:
        """Standard-layout keep masks of every target for the selected (pruned) units of each coupling."""
        keeps = [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in standards]
        for coupling, index, pruned in zip(self.couplings, self.index, selected, strict=True):
            for member, i in zip(coupling.members, index, strict=True):
                mark_units(keeps[i], member, pruned.to(keeps[i].device))
        return keeps

    def describe(self) -> dict[str, str]:
        """Each coupling's structure as text: saved with the state, compared on resume."""
        names = {id(t.param): t.name for t in self.targets}
        return {c.name: c.describe(names) for c in self.couplings}

    def check_masks(self, masks: Sequence[Tensor]) -> None:
        """Raise ``ValueError`` when a unit is partly masked (a mask that no coupled event could make).

        Args:
            masks: the targets' masks as stored (not standard layout).
        """
        standard = [t.layout.to_standard(m) for t, m in zip(self.targets, masks, strict=True)]
        for coupling, index in zip(self.couplings, self.index, strict=True):
            _, partly = unit_counts(standard, coupling, index)
            if bool(partly.any()):
                units = partly.nonzero().squeeze(1).tolist()
                raise ValueError(
                    f"pruning state: the masks of {coupling.name} prune units {units} only in part; the "
                    f"{coupling.kind} pattern prunes whole units (the state is from another model or was edited)"
                )

    def report(self, masks: Sequence[Tensor]) -> UnitReport:
        """Heads and units pruned per coupling, from the targets' masks (stored layout)."""
        standard = [t.layout.to_standard(m) for t, m in zip(self.targets, masks, strict=True)]
        rows = []
        for coupling, index in zip(self.couplings, self.index, strict=True):
            whole, _ = unit_counts(standard, coupling, index)
            rows.append(
                UnitRow(
                    coupling.name,
                    coupling.kind,
                    coupling.units,
                    int(whole.sum()),
                    coupling.heads_per_unit,
                    tuple(whole.nonzero().squeeze(1).tolist()),
                )
            )
        return UnitReport(tuple(rows))


@dataclass(frozen=True)
class UnitRow:
    """Units pruned in one coupling.

    Args:
        name: the module holding the structure.
        kind: ``"head"`` or ``"ffn"``.
        units: units (key/value groups under grouped-query attention, heads, hidden units) before.
        pruned: units pruned.
        heads_per_unit: query heads per unit (1 unless grouped-query attention).
        pruned_units: indices of the pruned units.
    """

    name: str
    kind: str
    units: int
    pruned: int
    heads_per_unit: int
    pruned_units: tuple[int, ...]

    def __str__(self) -> str:
        kept = self.units - self.pruned
        if self.kind != "head":
            return f"{self.name}: {self.units} -> {kept} units ({self.pruned} pruned)"
        per = self.heads_per_unit
        pruned_heads = [u * per + j for u in self.pruned_units for j in range(per)]
        text = f"{self.name}: {self.units * per} -> {kept * per} heads"
        if per > 1:
            text += f" ({self.units} -> {kept} key/value heads, {per} query heads each)"
        shown = pruned_heads if len(pruned_heads) <= 16 else [*pruned_heads[:16], "..."]
        return f"{text}; pruned heads {shown}"


@dataclass(frozen=True)
class UnitReport:
    """Heads and FFN units pruned per layer (see :meth:`CoupledLayers.report`)."""

    rows: tuple[UnitRow, ...]

    def __str__(self) -> str:
        return "\n".join(["lightning_prune: heads and units pruned", *(f"  {row}" for row in self.rows)])

    def to_csv(self, path: str) -> None:
        """One row per coupling: name, kind, units, pruned, heads_per_unit, pruned_units (space separated)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["name", "kind", "units", "pruned", "heads_per_unit", "pruned_units"])
        for row in self.rows:
            writer.writerow(
                [
                    row.name,
                    row.kind,
                    row.units,
                    row.pruned,
                    row.heads_per_unit,
                    " ".join(map(str, row.pruned_units)),
                ]
            )
        write_atomically(path, buffer.getvalue())


def _head(**options: Any) -> Pattern:
    return CoupledPattern(("head",), **options)


PATTERNS.add("head", _head)
PATTERNS.add("mha", _head)  # Intel Neural Compressor's name for it
PATTERNS.add("ffn", lambda **options: CoupledPattern(("ffn",), **options))
PATTERNS.add("head+ffn", lambda **options: CoupledPattern(("head", "ffn"), **options))

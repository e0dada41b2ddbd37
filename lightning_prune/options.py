"""What to prune and how far: the options shared by the callback and the Pruner, checked in one place."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_prune.allocation import check_allocation
from lightning_prune.checks import check_fraction, check_int
from lightning_prune.criteria import Criterion, parse_criterion
from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.progressive import Progressive, check_progressive_pattern, parse_progressive
from lightning_prune.regrowth import check_regrow
from lightning_prune.regularizers import Regularizer, parse_regularizer
from lightning_prune.targets import DEFAULT_OP_TYPES, compile_patterns

REWIND_EVENTS = ("every", "first", "last")
SCOPES = ("global", "local", "row")


@dataclass(frozen=True, init=False)
class PruningOptions:
    """What the callback or a :class:`~lightning_prune.pruner.Pruner` prunes, and how far.

    Values come in any config form (names, mappings, objects) and are kept normalised: strings are
    parsed into strategy objects here, so a config file and Python code give the same result, and
    every bad value raises at construction with the key, the value and what is accepted. The
    callback's signature and :class:`~lightning_prune.config.PruningConfig` repeat these arguments;
    ``tests/test_options.py`` keeps all three alike.

    Args:
        target_sparsity: final fraction of zeros among the targeted weights, in ``[0, 1)``.
        pattern: ``"1x1"``, ``"NxM"``, ``"channelx1"``, ``"1xchannel"``, ``"N:M"``, a registered name,
            a Pattern, or a mapping with ``name``/``_target_`` and options.
        criterion: a registered criterion name, a Criterion object, or a mapping with
            ``name``/``_target_`` and options (``{"name": "snip_momentum", "alpha": 0.9}``).
        scope: ``"global"`` ranks all targets together; ``"local"`` prunes each layer to the target;
            ``"row"`` prunes each output row of each layer to the target (Wanda's comparison group).
        include: a regex or list of regexes (``re.search``) over qualified module names; only
            matches are pruned.
        exclude: a regex or list of regexes over qualified module names that are never pruned.
        op_types: module class names whose weights are pruned (subclasses count).
        skip_last_layer: leave the model's last layer in registration order (the head) dense, and
            the embedding it is tied to, if any.
        skip_embeddings: leave embeddings dense: ``nn.Embedding`` and modules under a name with
            ``embed`` in it (patch embeddings, stems); an ``include`` regex overrides this.
        min_sparsity_per_layer: least sparsity of any targeted layer.
        max_sparsity_per_layer: most sparsity of any targeted layer.
        progressive: ease newly pruned structured groups in over several steps: ``True`` for the
            default :class:`~lightning_prune.progressive.Progressive`, such an object, or a mapping
            of its arguments.
        regularizer: ``"group_lasso"``, a Regularizer object, a mapping, or ``None``.
        regularizer_coeff: strength of a regularizer given by name (its default when ``None``).
        rewind: after every event, put the kept weights back to their values at this optimizer step
            (0: initialization, the lottery ticket hypothesis; later: weight rewinding); ``None`` off.
            It must not come after the first event.
        rewind_resample: with ``rewind``, draw the kept weights anew from each layer's
            initialization (``reset_parameters``) instead of restoring the saved ones.
        rewind_events: which events rewind: ``"every"`` (iterative magnitude pruning with
            rewinding), ``"first"`` or ``"last"`` (retrain the final mask from the rewound weights,
            as Renda et al. 2020 compare).
        allocation: how an event's sparsity is shared among the layers: ``"scope"`` (the scope's
            ranking decides) or ``"erk"`` (each layer's share by the Erdős-Rényi-Kernel rule of
            RigL, then pruned by its own scores); see :mod:`lightning_prune.allocation`.
        regrow: at every event before the last, revive this fraction of each layer's live groups
            from its pruned ones, those with the largest gradient, and prune as many more of the
            lowest-scoring live ones (decayed by a half cosine along the window); ``0`` never
            revives. See :mod:`lightning_prune.regrowth`.
    """

    target_sparsity: float
    pattern: Pattern
    criterion: Criterion
    scope: str
    include: tuple[re.Pattern[str], ...]
    exclude: tuple[re.Pattern[str], ...]
    op_types: tuple[str, ...]
    skip_last_layer: bool
    skip_embeddings: bool
    min_sparsity_per_layer: float
    max_sparsity_per_layer: float
    progressive: Progressive | None
    regularizer: Regularizer | None
    rewind: int | None
    rewind_resample: bool
    rewind_events: str
    allocation: str
    regrow: float

    def __init__(
        self,
        target_sparsity: float = 0.9,
        pattern: str | int | Pattern | Mapping[str, Any] = "4x1",
        criterion: str | Criterion | Mapping[str, Any] = "magnitude",
        scope: str = "global",
        include: str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | None = None,
        exclude: str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | None = None,
        op_types: str | Sequence[str | type] = DEFAULT_OP_TYPES,
        skip_last_layer: bool = True,
        skip_embeddings: bool = True,
        min_sparsity_per_layer: float = 0.0,
        max_sparsity_per_layer: float = 0.98,
        progressive: bool | Progressive | Mapping[str, Any] | None = False,
        regularizer: str | Regularizer | Mapping[str, Any] | None = None,
        regularizer_coeff: float | None = None,
        rewind: int | None = None,
        rewind_resample: bool = False,
        rewind_events: str = "every",
        allocation: str = "scope",
        regrow: float = 0.0,
    ) -> None:
        set_ = object.__setattr__  # frozen: normalised once, here
        set_(
            self, "target_sparsity", check_fraction("target_sparsity", target_sparsity, upper_inclusive=False)
        )
        if isinstance(pattern, str) and pattern.strip().isdigit() and int(pattern) >= 60:
            # A str-typed config field (OmegaConf, Hydra) turned YAML's base-60 reading of an
            # unquoted N:M into text: parse it as the number it was, for the same pointed error.
            pattern = int(pattern)
        set_(self, "pattern", parse_pattern(pattern))
        set_(self, "criterion", parse_criterion(criterion))
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is not one of {list(SCOPES)}")
        if scope == "row":
            _check_row_scope(self.pattern)
        set_(self, "scope", scope)
        set_(self, "include", compile_patterns("include", include))
        set_(self, "exclude", compile_patterns("exclude", exclude))
        set_(self, "op_types", _op_types(op_types))
        for key, value in (("skip_last_layer", skip_last_layer), ("skip_embeddings", skip_embeddings)):
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} must be true or false")
            set_(self, key, value)
        low = check_fraction("min_sparsity_per_layer", min_sparsity_per_layer, upper_inclusive=True)
        high = check_fraction("max_sparsity_per_layer", max_sparsity_per_layer, upper_inclusive=True)
        if low > high:
            raise ValueError(
                f"min_sparsity_per_layer={low} is above max_sparsity_per_layer={high}; need min <= max"
            )
        set_(self, "min_sparsity_per_layer", low)
        set_(self, "max_sparsity_per_layer", high)
        set_(self, "progressive", parse_progressive(progressive))
        check_progressive_pattern(self.progressive, self.pattern)
        set_(self, "regularizer", parse_regularizer(regularizer, regularizer_coeff))  # coeff folded in
        if self.regularizer is not None:
            self.regularizer.check_pattern(self.pattern)
        set_(self, "rewind", check_int("rewind", rewind, minimum=0, none_means="no rewinding"))
        if not isinstance(rewind_resample, bool):
            raise ValueError(f"rewind_resample={rewind_resample!r} must be true or false")
        if rewind_resample and self.rewind is None:
            raise ValueError(
                "rewind_resample=True resamples at each rewind, but rewind is null; set rewind=0 too"
            )
        set_(self, "rewind_resample", rewind_resample)
        if rewind_events not in REWIND_EVENTS:
            raise ValueError(f"rewind_events={rewind_events!r} is not one of {list(REWIND_EVENTS)}")
        set_(self, "rewind_events", rewind_events)
        set_(self, "allocation", check_allocation(allocation, self.pattern))
        regrow = check_regrow(regrow, pattern=self.pattern, scope=scope, progressive=self.progressive)
        set_(self, "regrow", regrow)
        target = self.target_sparsity
        if not low <= target <= high:
            raise ValueError(
                f"target_sparsity={target} is outside [min_sparsity_per_layer, max_sparsity_per_layer] = "
                f"[{low}, {high}]; no layer assignment can reach it"
            )
        if target > self.pattern.max_sparsity + 1e-9:
            raise ValueError(
                f"target_sparsity={target} is above {self.pattern.max_sparsity:g}, the most that pattern "
                f"{str(self.pattern)!r} can reach (1 - N/M); use target_sparsity <= {self.pattern.max_sparsity:g}"
            )
        self.criterion.check_options(self)  # what this criterion cannot be combined with
        self.pattern.check_options(self)  # and this pattern (heads and units: no progressive, no lasso)

    def settings(self) -> dict[str, str]:
        """The options that decide which weights are pruned (not which layers are targets), as text."""
        return {
            "target_sparsity": repr(self.target_sparsity),
            "pattern": _describe(self.pattern),
            "criterion": repr(self.criterion),
            "scope": repr(self.scope),
            "min_sparsity_per_layer": repr(self.min_sparsity_per_layer),
            "max_sparsity_per_layer": repr(self.max_sparsity_per_layer),
            "progressive": repr(self.progressive),
            "regularizer": repr(self.regularizer),
            "rewind": repr(self.rewind),
            "rewind_resample": repr(self.rewind_resample),
            "rewind_events": repr(self.rewind_events),
            # Recorded only when set, so that checkpoints from before these options still resume.
            **({"allocation": repr(self.allocation)} if self.allocation != "scope" else {}),
            **({"regrow": repr(self.regrow)} if self.regrow else {}),
        }


def _check_row_scope(pattern: Pattern) -> None:
    """The ``"row"`` scope ranks the groups within each row: refuse a pattern with one group per row
    (``"1xchannel"``), which would prune whole layers. Probed on a meta weight: no memory, no compute."""
    probe = torch.empty(64, 64, device="meta")
    if pattern.tiling_error(probe.shape) is not None:
        return  # a pattern of other sizes: its groups are checked against each layer instead
    groups = pattern.group_view(probe).shape[:-1]
    if math.prod(groups[1:]) == 1:
        raise ValueError(
            f"scope='row' ranks the groups within each output row, but pattern {str(pattern)!r} has one "
            "group per row; use scope='local' or 'global' with it"
        )


def _describe(pattern: Pattern) -> str:
    # A pattern's repr shows its string only; its other settings (reduce) change results too.
    fields = ", ".join(f"{key}={value!r}" for key, value in sorted(vars(pattern).items()))
    return f"{type(pattern).__name__}({fields})"


def _op_types(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"op_types={value!r} must be a non-empty list of module class names")
    names = []
    for entry in value:
        name = entry.__name__ if isinstance(entry, type) else entry
        if not isinstance(name, str):
            raise ValueError(f"op_types entry {entry!r} must be a module class name such as 'Linear'")
        names.append(name)
    return tuple(names)

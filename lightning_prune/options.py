"""What to prune and how far: the options shared by the callback and the Pruner, checked in one place."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_prune.checks import check_fraction
from lightning_prune.criteria import Criterion, parse_criterion
from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.progressive import Progressive, check_progressive_pattern, parse_progressive
from lightning_prune.regularizers import Regularizer, parse_regularizer
from lightning_prune.targets import DEFAULT_OP_TYPES, compile_patterns

SCOPES = ("global", "local")


@dataclass(frozen=True)
class PruningOptions:
    """What the callback or a :class:`~lightning_prune.pruner.Pruner` prunes, and how far.

    Strings are parsed into strategy objects here, so a config file and Python code give the same
    result, and every bad value raises at construction with the key, the value and what is accepted.

    Args:
        target_sparsity: final fraction of zeros among the targeted weights, in ``[0, 1)``.
        pattern: ``"1x1"``, ``"NxM"``, ``"channelx1"``, ``"1xchannel"``, ``"N:M"`` or a Pattern.
        criterion: a registered criterion name or a Criterion object.
        scope: ``"global"`` ranks all targets together; ``"local"`` prunes each layer to the target.
        include: regexes (``re.search``) over qualified module names; only matches are pruned.
        exclude: regexes over qualified module names that are never pruned.
        op_types: module class names whose weights are pruned (subclasses count).
        skip_last_layer: leave the model's last layer in registration order (the head) dense, and
            the embedding it is tied to, if any.
        skip_embeddings: leave embeddings dense: ``nn.Embedding`` and modules under a name with
            ``embed`` in it (patch embeddings, stems); an ``include`` regex overrides this.
        min_sparsity_per_layer: least sparsity of any targeted layer.
        max_sparsity_per_layer: most sparsity of any targeted layer.
        progressive: ease newly pruned structured groups in over several steps: ``True`` for the
            default :class:`~lightning_prune.progressive.Progressive`, or such an object.
        regularizer: ``"group_lasso"``, a Regularizer object, or ``None``.
        regularizer_coeff: strength of a regularizer given by name (its default when ``None``).
    """

    target_sparsity: float = 0.9
    pattern: Pattern = field(default="4x1")  # type: ignore[assignment]
    criterion: Criterion = field(default="magnitude")  # type: ignore[assignment]
    scope: str = "global"
    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    skip_last_layer: bool = True
    skip_embeddings: bool = True
    min_sparsity_per_layer: float = 0.0
    max_sparsity_per_layer: float = 0.98
    progressive: Progressive | None = None
    regularizer: Regularizer | None = None
    regularizer_coeff: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(
            self,
            "target_sparsity",
            check_fraction("target_sparsity", self.target_sparsity, upper_inclusive=False),
        )
        pattern = self.pattern
        if isinstance(pattern, str) and pattern.strip().isdigit() and int(pattern) >= 60:
            # A str-typed config field (OmegaConf, Hydra) turned YAML's base-60 reading of an
            # unquoted N:M into text: parse it as the number it was, for the same pointed error.
            pattern = int(pattern)  # type: ignore[assignment]
        set_(self, "pattern", parse_pattern(pattern))
        set_(self, "criterion", parse_criterion(self.criterion))
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r} is not one of {list(SCOPES)}")
        set_(self, "include", _compiled("include", self.include))
        set_(self, "exclude", _compiled("exclude", self.exclude))
        set_(self, "op_types", _op_types(self.op_types))
        for key in ("skip_last_layer", "skip_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} must be true or false")
        low = check_fraction("min_sparsity_per_layer", self.min_sparsity_per_layer, upper_inclusive=True)
        high = check_fraction("max_sparsity_per_layer", self.max_sparsity_per_layer, upper_inclusive=True)
        set_(self, "min_sparsity_per_layer", low)
        set_(self, "max_sparsity_per_layer", high)
        if low > high:
            raise ValueError(
                f"min_sparsity_per_layer={low} is above max_sparsity_per_layer={high}; need min <= max"
            )
        set_(self, "progressive", parse_progressive(self.progressive))
        check_progressive_pattern(self.progressive, self.pattern)
        set_(self, "regularizer", parse_regularizer(self.regularizer, self.regularizer_coeff))
        set_(self, "regularizer_coeff", None)  # folded into the regularizer object
        if self.regularizer is not None:
            self.regularizer.check_pattern(self.pattern)
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
        }


def _describe(pattern: Pattern) -> str:
    # A pattern's repr shows its string only; its other settings (reduce) change results too.
    fields = ", ".join(f"{key}={value!r}" for key, value in sorted(vars(pattern).items()))
    return f"{type(pattern).__name__}({fields})"


def _compiled(key: str, value: object) -> tuple[re.Pattern[str], ...]:
    if isinstance(value, tuple) and all(isinstance(v, re.Pattern) for v in value):
        return value
    return compile_patterns(key, value)  # type: ignore[arg-type]


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

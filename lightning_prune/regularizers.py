"""Regularizers: push whole groups of weights toward zero so structured pruning removes less signal.

Group lasso adds ``coeff * sum_g ||w_g||_2`` over the pattern's groups (rows, columns, NxM blocks).
Rather than adding that term to the loss, whose gradient ``coeff * w_g / ||w_g||`` never lands a
group exactly on zero and is rescaled by adaptive optimizers, we apply its proximal operator right
after each optimizer step::

    w_g <- w_g * max(0, 1 - lr * coeff / ||w_g||_2)

With plain SGD this is exactly proximal gradient descent on ``loss + coeff * sum_g ||w_g||_2``; with
Adam and friends it is the decoupled form, as AdamW is to L2 weight decay. A group whose norm is
below ``lr * coeff`` becomes exactly zero, and weak groups shrink relatively faster than strong ones.
For the unstructured pattern each weight is its own group and this is the L1 soft threshold.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from lightning_prune.patterns import Pattern
from lightning_prune.registry import Registry, build_strategy
from lightning_prune.value import ValueObject

_TINY = 1e-12


class Regularizer(ValueObject, ABC):
    """Acts on the targeted weights right after each optimizer step inside the pruning window."""

    name: ClassVar[str] = ""

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise ``ValueError`` if this regularizer cannot serve ``pattern``."""

    @abstractmethod
    def apply(self, weight: Tensor, lr: float, pattern: Pattern) -> None:
        """Update ``weight`` in place after an optimizer step taken with learning rate ``lr``."""


class GroupLasso(Regularizer):
    """Proximal group lasso over the pattern's groups.

    Args:
        coeff: strength of the penalty ``coeff * sum_g ||w_g||_2``; ``> 0``.
    """

    name = "group_lasso"

    def __init__(self, coeff: float = 1e-4) -> None:
        if isinstance(coeff, bool) or not isinstance(coeff, int | float) or not coeff > 0:
            raise ValueError(f"regularizer_coeff={coeff!r} must be a number > 0")
        self.coeff = float(coeff)

    def check_pattern(self, pattern: Pattern) -> None:
        if not pattern.removes_whole_groups:
            raise ValueError(
                f"regularizer='group_lasso' shrinks whole groups, but pattern {str(pattern)!r} keeps N of "
                "every M weights and removes no group whole; use it with '1x1', 'NxM' or a channel pattern"
            )

    @torch.no_grad()
    def apply(self, weight: Tensor, lr: float, pattern: Pattern) -> None:
        groups = pattern.group_view(weight)
        norms = groups.float().square().sum(dim=-1, keepdim=True).sqrt_()
        factor = (1.0 - lr * self.coeff / norms.clamp_min(_TINY)).clamp_min_(0.0)
        weight.copy_(pattern.from_group_view(groups * factor.to(groups.dtype), weight.shape))


#: Regularizers by name: ``regularizer="group_lasso"`` in any config.
REGULARIZERS: Registry[Regularizer] = Registry("regularizer")

R = TypeVar("R", bound=type[Regularizer])


def register_regularizer(cls: R) -> R:
    """Class decorator: make ``cls`` selectable by its ``name`` from configs (its coefficient argument
    is ``coeff``, which ``regularizer_coeff`` sets)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    REGULARIZERS.add(cls.name, cls)
    return cls


register_regularizer(GroupLasso)


def parse_regularizer(spec: object, coeff: float | None) -> Regularizer | None:
    """Turn ``regularizer``/``regularizer_coeff`` from a config into a :class:`Regularizer` or ``None``."""
    if spec is None:
        if coeff is not None:
            raise ValueError(
                f"regularizer_coeff={coeff!r} is set but regularizer is null; set regularizer too"
            )
        return None
    if isinstance(spec, Regularizer):
        if coeff is not None:
            raise ValueError(
                f"regularizer_coeff={coeff!r} is set next to a {type(spec).__name__} object; "
                "give the coefficient to the object"
            )
        return spec
    if isinstance(spec, str) and coeff is not None:
        return REGULARIZERS.build(spec, coeff=coeff)
    return build_strategy(spec, Regularizer, REGULARIZERS, "regularizer")

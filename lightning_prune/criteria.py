"""Criteria: how important each weight is, as an element score (higher is kept).

A criterion holds configuration only. Any running state (accumulated scores) lives in a buffer that
the :class:`~lightning_prune.pruner.Pruner` owns, checkpoints and hands back, so one criterion object
can serve several runs and its state is never shared by accident.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor


class Criterion(ABC):
    """Scores weights; subclasses that need gradients accumulate them into a buffer.

    The Pruner calls :meth:`init_buffer` once per target, :meth:`accumulate` before every real
    optimizer step (gradients unscaled and synchronised), :meth:`score` at each pruning event and
    :meth:`after_event` right after it.
    """

    #: Registry name, used by configs: ``criterion="magnitude"``.
    name: ClassVar[str] = ""
    #: Whether scores need gradients (the Pruner then calls :meth:`accumulate` each step).
    needs_gradients: ClassVar[bool] = False

    def init_buffer(self, param: Tensor) -> Tensor | None:
        """A score buffer for ``param``, or ``None`` when the criterion keeps no state."""
        return None

    def accumulate(self, buffer: Tensor | None, param: Tensor) -> None:  # noqa: B027 - optional hook
        """Fold ``param.grad`` into ``buffer``; called before each real optimizer step."""

    @abstractmethod
    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        """Element scores shaped like ``param`` (float32; higher is more important)."""

    def after_event(self, buffer: Tensor | None) -> None:  # noqa: B027 - optional hook
        """Called after each pruning event, e.g. to reset ``buffer``."""

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make ``cls`` selectable by its ``name`` from configs."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    CRITERIA[cls.name] = cls
    return cls


@register_criterion
class MagnitudeCriterion(Criterion):
    """``|W|``: the smallest weights go first. Keeps no buffer."""

    name = "magnitude"

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        return param.detach().abs().float()


def parse_criterion(spec: str | Criterion) -> Criterion:
    """Turn a criterion name from a config into a :class:`Criterion`; objects pass through.

    Raises:
        ValueError: naming the value and the registered names.
    """
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, str) and spec.strip().lower() in CRITERIA:
        return CRITERIA[spec.strip().lower()]()
    raise ValueError(f"criterion={spec!r} is not one of {sorted(CRITERIA)} or a Criterion object")

"""Criteria: how important each weight is, as an element score (higher is kept).

A criterion holds configuration only. Any running state (accumulated scores) lives in a buffer that
the :class:`~lightning_prune.pruner.Pruner` owns, checkpoints and hands back, so one criterion object
can serve several runs and its state is never shared by accident.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from lightning_prune.checks import check_int
from lightning_prune.value import ValueObject

SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Criterion(ValueObject, ABC):
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

    def accumulate(self, buffer: Tensor | None, param: Tensor, finite: Tensor) -> None:
        """Fold ``param.grad`` into ``buffer``; called before each real optimizer step.

        Args:
            buffer: this criterion's buffer for ``param``.
            param: the weight, with ``.grad`` unscaled and synchronised across ranks.
            finite: 0-d bool tensor, ``False`` when any targeted gradient of this step is not finite
                (an AMP step the gradient scaler will skip); such a step must add nothing.
        """

    @abstractmethod
    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        """Element scores shaped like ``param``: a new float32 tensor (the Pruner edits it in place)."""

    def after_event(self, buffer: Tensor | None) -> None:
        """Called after each pruning event, e.g. to reset ``buffer``."""


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


class AccumulatingCriterion(Criterion):
    """``Score_n = alpha * Score_{n-1} + beta * term(W_n, G_n)`` on every real optimizer step.

    Args:
        alpha: factor on the running score at each step.
        beta: factor on the new term at each step.
        reset_after_event: zero the score after each pruning event, so that each event ranks on the
            gradients seen since the previous one; otherwise scores carry across events.
        init_batches: when an event falls at step 0 (pruning at initialization), score on the
            gradients of this many training batches first, without stepping the optimizer.
        score_dtype: ``"float32"`` or ``"bfloat16"`` (half the memory, for large models).
    """

    needs_gradients = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        reset_after_event: bool = True,
        init_batches: int = 1,
        score_dtype: str = "float32",
    ) -> None:
        for key, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{self.name} {key}={value!r} must be a number")
        if not isinstance(reset_after_event, bool):
            raise ValueError(f"{self.name} reset_after_event={reset_after_event!r} must be true or false")
        init_batches = check_int(f"{self.name} init_batches", init_batches, minimum=1)  # type: ignore[assignment]
        if score_dtype not in SCORE_DTYPES:
            raise ValueError(f"{self.name} score_dtype={score_dtype!r} is not one of {sorted(SCORE_DTYPES)}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.reset_after_event = reset_after_event
        self.init_batches = init_batches
        self.score_dtype = score_dtype

    @abstractmethod
    def term(self, weight: Tensor, grad: Tensor) -> Tensor:
        """This step's contribution, shaped like ``weight``."""

    def init_buffer(self, param: Tensor) -> Tensor:
        return torch.zeros_like(
            param, dtype=SCORE_DTYPES[self.score_dtype], memory_format=torch.contiguous_format
        )

    def accumulate(self, buffer: Tensor | None, param: Tensor, finite: Tensor) -> None:
        assert buffer is not None
        if param.grad is None:
            return
        # Branch-free, so no host sync per step: a skipped step scales by 1 and adds 0.
        term = self.term(param.detach(), param.grad).float().masked_fill_(~finite, 0.0)
        if self.alpha != 1.0:
            buffer.mul_(torch.where(finite, self.alpha, 1.0).to(buffer.dtype))
        buffer.add_(term.to(buffer.dtype), alpha=self.beta)

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        assert buffer is not None
        return buffer.to(torch.float32, copy=True)

    def after_event(self, buffer: Tensor | None) -> None:
        if self.reset_after_event and buffer is not None:
            buffer.zero_()


@register_criterion
class GradientCriterion(AccumulatingCriterion):
    """``|G|``, summed over the steps since the last event: weights the loss is sensitive to stay."""

    name = "gradient"

    def term(self, weight: Tensor, grad: Tensor) -> Tensor:
        return grad.abs()


@register_criterion
class SnipCriterion(AccumulatingCriterion):
    """``|W * G|`` (Lee et al. 2019, SNIP), summed over the steps since the last event.

    As a one-shot at step 0 it scores on ``init_batches`` batches before training, as in the paper.
    """

    name = "snip"

    def term(self, weight: Tensor, grad: Tensor) -> Tensor:
        return (weight * grad).abs()


@register_criterion
class SnipMomentumCriterion(AccumulatingCriterion):
    """``Score_n = alpha * Score_{n-1} + beta * |W_n * G_n|``, kept across events.

    Defaults ``alpha=1.0, beta=0.9`` follow our method description; ``alpha=0.9, beta=1.0`` gives
    the decaying variant some tools use.
    """

    name = "snip_momentum"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.9,
        reset_after_event: bool = False,
        init_batches: int = 1,
        score_dtype: str = "float32",
    ) -> None:
        super().__init__(alpha, beta, reset_after_event, init_batches, score_dtype)

    def term(self, weight: Tensor, grad: Tensor) -> Tensor:
        return (weight * grad).abs()


@register_criterion
class MovementCriterion(AccumulatingCriterion):
    """Movement pruning (Sanh et al. 2020): ``Score = -sum_t W_t * G_t``, kept across events.

    A weight scores high when training moves it away from zero, whatever its size: the criterion
    of choice when fine-tuning a pretrained network, where magnitude mostly reflects pretraining.
    """

    name = "movement"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        reset_after_event: bool = False,
        init_batches: int = 1,
        score_dtype: str = "float32",
    ) -> None:
        super().__init__(alpha, beta, reset_after_event, init_batches, score_dtype)

    def term(self, weight: Tensor, grad: Tensor) -> Tensor:
        return -(weight * grad)


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

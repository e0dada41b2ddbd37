"""Criteria: how important each weight is, as an element score (higher is kept).

A criterion holds configuration only. Its running state (accumulated scores, activation statistics)
lives in a tensor the :class:`~lightning_prune.pruner.Pruner` owns, checkpoints and hands back, so
one criterion object can serve several runs and its state is never shared by accident.

The lifecycle, for each target (a weight with its module and layout)::

    needs                  what scores are made of besides the weight: "gradients", "activations"
    supports(target)       why this target cannot be scored (the Pruner leaves it dense), or None
    init_state(target)     the state tensor (or None), once
    accumulate(state, ..)  after each backward, before the real optimizer step ("gradients")
    observe(state, ..)     the module's inputs, from forward hooks that exist only while the
                           Pruner is calibrating ("activations")
    score(state, param)    element scores at each pruning event
    after_event(state)     right after each event

A criterion that ``reconstructs`` (SparseGPT, :class:`ReconstructingCriterion`) chooses its masks
and writes corrected weights itself, one layer at a time, from a statistic of that layer's inputs;
it prunes once, through :func:`lightning_prune.calibration.calibrate_and_prune`, instead of
score -> select -> commit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

from lightning_prune.checks import check_int
from lightning_prune.registry import Registry, build_strategy
from lightning_prune.value import ValueObject

if TYPE_CHECKING:
    from lightning_prune.options import PruningOptions
    from lightning_prune.patterns import Pattern
    from lightning_prune.targets import Target

SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GRADIENTS = "gradients"
ACTIVATIONS = "activations"


class Criterion(ValueObject, ABC):
    """Scores weights from the weight itself and what :attr:`needs` declares.

    Subclasses implement :meth:`score`; those that need gradients or activations keep a state
    (:meth:`init_state`) that :meth:`accumulate` or :meth:`observe` fill.
    """

    #: Registry name, used by configs: ``criterion="magnitude"``.
    name: ClassVar[str] = ""
    #: What scores are made of besides the weight: ``{"gradients"}``, ``{"activations"}`` or none.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Chooses masks and writes corrected weights itself (see :class:`ReconstructingCriterion`).
    reconstructs: ClassVar[bool] = False

    @property
    def needs_gradients(self) -> bool:
        """Whether :meth:`accumulate` must see the gradients of every real optimizer step."""
        return GRADIENTS in self.needs

    @property
    def needs_activations(self) -> bool:
        """Whether :meth:`observe` must see layer inputs while the Pruner calibrates."""
        return ACTIVATIONS in self.needs

    @property
    def calibrates(self) -> bool:
        """Whether it prunes once from calibration data (Wanda, SparseGPT) rather than while training."""
        return self.needs_activations or self.reconstructs

    def supports(self, target: Target) -> str | None:
        """Why ``target`` cannot be scored by this criterion (it is then left dense), or ``None``."""
        return None

    def check_options(self, options: PruningOptions) -> None:
        """Refuse settings this criterion cannot serve, when the options are built (before training).

        Raises:
            ValueError: naming the key, its value and what is accepted.
        """

    def init_state(self, target: Target) -> Tensor | None:
        """The state tensor for ``target``, or ``None`` when the criterion keeps none."""
        return self.init_buffer(target.param)

    def init_buffer(self, param: Tensor) -> Tensor | None:
        """A state shaped from the weight alone (what :meth:`init_state` gives by default)."""
        return None

    def accumulate(self, buffer: Tensor | None, param: Tensor, finite: Tensor) -> None:
        """Fold ``param.grad`` into the state; called before each real optimizer step.

        Args:
            buffer: this criterion's state for ``param``.
            param: the weight, with ``.grad`` unscaled and synchronised across ranks.
            finite: 0-d bool tensor, ``False`` when any targeted gradient of this step is not finite
                (an AMP step the gradient scaler will skip); such a step must add nothing.
        """

    def observe(self, state: Tensor | None, target: Target, inputs: tuple[Any, ...]) -> None:
        """Fold one forward call's ``inputs`` to ``target.module`` into the state (while calibrating)."""

    @abstractmethod
    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        """Element scores shaped like ``param``: a new float32 tensor (the Pruner edits it in place)."""

    def after_event(self, buffer: Tensor | None) -> None:
        """Called after each pruning event, e.g. to reset the state."""


class ReconstructingCriterion(Criterion):
    """Prunes each layer from a statistic of its inputs and writes the corrected weights itself.

    The engine (:func:`lightning_prune.calibration.calibrate_and_prune`) takes the targets in the
    order the model calls them; for each, it builds :meth:`layer_state`, runs the calibration
    batches through the model (earlier layers already pruned) with :meth:`observe` on that layer's
    inputs, sums the state over DDP ranks, and calls :meth:`reconstruct`. Only one layer's state
    exists at a time. The masks the Pruner keeps afterwards are the weights' new zeros.
    """

    # Its inputs are gathered by the one-shot routine, layer by layer, not by Pruner.calibrating().
    needs = frozenset()
    reconstructs = True

    def init_state(self, target: Target) -> Tensor | None:
        return None  # nothing is kept across events or checkpointed: see layer_state

    @abstractmethod
    def layer_state(self, target: Target) -> Tensor:
        """A fresh statistic of ``target``'s inputs (a sum: DDP ranks add theirs up)."""

    @abstractmethod
    def reconstruct(
        self, state: Tensor, target: Target, keep: Tensor, sparsity: float, pattern: Pattern
    ) -> Tensor:
        """Prune ``target`` to ``sparsity`` in ``pattern`` and write its corrected weight in place.

        Args:
            state: :meth:`layer_state` after the calibration batches, summed over ranks.
            target: the layer; its weight is overwritten.
            keep: the current mask in the standard ``(out, in, *kernel)`` layout (``False`` stays pruned).
            sparsity: fraction of the layer's weights to prune.
            pattern: the shape the zeros take.

        Returns:
            The new keep mask in the standard layout; the weight is zero wherever it is ``False``.
        """

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        raise RuntimeError(
            f"criterion {self.name!r} chooses masks and corrects the weights from calibration data in one "
            "pass; prune with lightning_prune.prune_once(model, loader, ...), calibrate_and_prune(pruner, "
            "batches), or the callback one-shot at step 0 (start_step=0, end_step=0)"
        )


#: Criteria by name: ``criterion="snip_momentum"`` in any config.
CRITERIA: Registry[Criterion] = Registry("criterion", forgiving=True)

C = TypeVar("C", bound=type[Criterion])


def register_criterion(cls: C) -> C:
    """Class decorator: make ``cls`` selectable by its ``name`` from Python, YAML, LightningCLI and Hydra."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    CRITERIA.add(cls.name, cls)
    return cls


@register_criterion
class MagnitudeCriterion(Criterion):
    """``|W| ** power``: the smallest weights go first. Keeps no buffer.

    The power changes nothing for single weights; for groups summed by a pattern
    (``ChannelPattern(reduce="sum")``) ``power=2`` ranks channels by their L2 norm, as
    ``torch.nn.utils.prune.ln_structured(n=2)`` does, and ``power=1`` by their L1 norm.

    Args:
        power: exponent on ``|W|``, greater than 0.
    """

    name = "magnitude"

    def __init__(self, power: float = 1.0) -> None:
        if isinstance(power, bool) or not isinstance(power, int | float) or not power > 0:
            raise ValueError(f"magnitude power={power!r} must be a number > 0")
        self.power = float(power)

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        score = param.detach().abs().float()
        return score if self.power == 1.0 else score.pow_(self.power)


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

    needs = frozenset({GRADIENTS})

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


@register_criterion
class WandaCriterion(Criterion):
    """``|W_ij| * ||X_j||_2`` (Sun et al. 2023, Wanda): the weight times the L2 norm of its input
    channel over the calibration data.

    The paper compares weights within each output row: ``scope="row"``; ``"local"`` compares within
    each layer (as torchao's ``WandaSparsifier`` does) and ``"global"`` across layers. N:M patterns
    keep the N best of every M inputs, whatever the scope.

    The norms are gathered by forward hooks that exist only while the Pruner calibrates (for the
    callback: ``calibration_batches`` batches before an event due at the start of fit); an event
    with no calibration behind it is an error. The state is the sum of squared inputs per input
    channel; under DDP each rank's sum is added up when calibration ends. Layers whose input is one
    tensor with the channels on a known axis are supported: Linear, Hugging Face Conv1D,
    convolutions without groups.

    Args:
        init_batches: batches to calibrate on when the callback's or :func:`prune_once`'s
            ``calibration_batches`` is not given (the paper used 128 sequences).
    """

    name = "wanda"
    needs = frozenset({ACTIVATIONS})

    def __init__(self, init_batches: int = 128) -> None:
        self.init_batches = check_int(f"{self.name} init_batches", init_batches, minimum=1)

    def supports(self, target: Target) -> str | None:
        if isinstance(target.module, torch.nn.Embedding):
            return "an embedding's input is token ids, not activations"
        if target.layout.row_blocks > 1 or target.layout.groups > 1:
            return f"layout {target.layout.name!r}: its input channels do not map onto one weight axis"
        return None

    def init_state(self, target: Target) -> Tensor:
        # Sum of squared inputs per input channel, shaped to broadcast against the stored weight.
        param = target.param
        shape = [1] * param.dim()
        shape[1] = target.layout.standard_shape(tuple(param.shape))[1]
        standard = torch.zeros(shape, dtype=torch.float32, device=param.device)
        return target.layout.from_standard(standard).contiguous()

    def observe(self, state: Tensor | None, target: Target, inputs: tuple[Any, ...]) -> None:
        assert state is not None
        x = inputs[0].detach()
        weight_dims = target.param.dim()
        # Linear-like layers take (..., in); convolutions (N, C, *spatial) or unbatched (C, *spatial).
        channel = x.dim() - 1 if weight_dims == 2 else (1 if x.dim() == weight_dims else 0)
        others = [d for d in range(x.dim()) if d != channel]
        state.view(-1).add_(x.float().square().sum(dim=others))

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        assert buffer is not None
        return param.detach().abs().float() * buffer.sqrt()


def parse_criterion(spec: object) -> Criterion:
    """Turn a criterion from a config into a :class:`Criterion`: a registered name, an object, or a
    mapping with ``name`` or ``_target_`` and the class's options (see :func:`build_strategy`).

    Raises:
        ValueError: naming the value and the registered names.
    """
    return build_strategy(spec, Criterion, CRITERIA, "criterion")

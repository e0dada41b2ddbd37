"""Criteria: hand-computed scores, buffer lifecycle, non-finite steps, and criteria under Lightning."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    TinyModule,
    fit_resumable,
    make_trainer,
    pruned_weights,
    pruning_state,
    tiny_loader,
    zero_fraction,
)
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn

from lightning_prune import (
    GradientCriterion,
    MagnitudeCriterion,
    MovementCriterion,
    Pruner,
    PruningCallback,
    PruningOptions,
    Schedule,
    SnipCriterion,
    SnipMomentumCriterion,
)
from lightning_prune.criteria import AccumulatingCriterion

GRADIENT_CRITERIA = ["gradient", "snip", "snip_momentum", "movement"]
ACCUMULATING_CLASSES = [GradientCriterion, SnipCriterion, SnipMomentumCriterion, MovementCriterion]
TRUE = torch.tensor(True)
FALSE = torch.tensor(False)

# One weight/gradient pair with hand-computed terms.
W = [[1.0, -2.0], [0.5, -0.25]]
G = [[-3.0, 0.5], [4.0, 2.0]]
# W * G = [[-3, -1], [2, -0.5]]
ABS_G = [[3.0, 0.5], [4.0, 2.0]]
ABS_WG = [[3.0, 1.0], [2.0, 0.5]]
MINUS_WG = [[3.0, 1.0], [-2.0, 0.5]]

# Three steps, each with its own weight and gradient. |W_n * G_n| and |G_n| by hand:
W_STEPS = [[1.0, -2.0, 0.5], [0.5, 1.0, -1.0], [2.0, -0.5, 4.0]]
G_STEPS = [[2.0, 1.5, -4.0], [-2.0, 2.0, 0.5], [1.0, 4.0, 0.25]]
#   |W1 G1| = [2, 3, 2]      |W2 G2| = [1, 2, 0.5]      |W3 G3| = [2, 2, 1]
#   |G1|    = [2, 1.5, 4]    |G2|    = [2, 2, 0.5]      |G3|    = [1, 4, 0.25]


def _param(weight: list[Any], grad: list[Any] | None = None) -> Tensor:
    param = torch.tensor(weight, requires_grad=True)
    if grad is not None:
        param.grad = torch.tensor(grad)
    return param


def _run_steps(criterion: AccumulatingCriterion) -> list[list[float]]:
    """Feed the three (W_n, G_n) steps to ``criterion``; the buffer after each step."""
    param = _param(W_STEPS[0])
    buffer = criterion.init_buffer(param)
    seen = []
    for weight, grad in zip(W_STEPS, G_STEPS, strict=True):
        param.data = torch.tensor(weight)
        param.grad = torch.tensor(grad)
        criterion.accumulate(buffer, param, TRUE)
        seen.append(buffer.tolist())
    return seen


def _small_model(seed: int = 0) -> nn.Sequential:
    # Two targets (0 and 2); the head (3) is skipped as the last layer.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))


def _set_grads(pruner: Pruner, grads: list[Tensor | None]) -> None:
    for target, grad in zip(pruner.targets, grads, strict=True):
        target.param.grad = grad


# ====================================================================== unit: terms
def test_magnitude_scores_abs_weight_and_keeps_no_buffer() -> None:
    criterion = MagnitudeCriterion()
    param = _param(W, G)
    assert criterion.init_buffer(param) is None
    assert not criterion.needs_gradients
    score = criterion.score(None, param)
    assert score.dtype == torch.float32
    assert score.tolist() == [[1.0, 2.0], [0.5, 0.25]]
    pruner = Pruner(_small_model(), Schedule(5, 5), PruningOptions(criterion="magnitude", pattern="1x1"))
    assert pruner.buffers == [None, None]
    pruner.accumulate_scores()  # a no-op that must not fail on missing grads
    assert pruner.gradient_steps == 0


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        (GradientCriterion(), ABS_G),
        (SnipCriterion(), ABS_WG),
        (MovementCriterion(), MINUS_WG),
        (SnipMomentumCriterion(beta=1.0), ABS_WG),
    ],
    ids=["gradient", "snip", "movement", "snip_momentum"],
)
def test_one_step_term(criterion: AccumulatingCriterion, expected: list[list[float]]) -> None:
    param = _param(W, G)
    buffer = criterion.init_buffer(param)
    assert buffer.shape == param.shape and buffer.dtype == torch.float32 and not buffer.any()
    criterion.accumulate(buffer, param, TRUE)
    score = criterion.score(buffer, param)
    assert score.dtype == torch.float32
    assert score.tolist() == expected


def test_movement_ranks_a_weight_moving_away_from_zero_higher() -> None:
    # Under SGD a weight moves by -lr * G. w=+1, g=-3 grows (away from zero); w=+0.5, g=+4 shrinks.
    param = _param(W, G)
    criterion = MovementCriterion()
    buffer = criterion.init_buffer(param)
    criterion.accumulate(buffer, param, TRUE)
    score = criterion.score(buffer, param)
    assert score[0, 0] > 0 > score[1, 0]
    # Snip would rank the shrinking weight above a growing one (|2| > |1|); movement does not.
    assert score[1, 0] < score[0, 1]


def test_snip_momentum_defaults_three_steps() -> None:
    criterion = SnipMomentumCriterion()
    assert (criterion.alpha, criterion.beta) == (1.0, 0.9)
    # S1 = 0.9*[2,3,2]; S2 = S1 + 0.9*[1,2,0.5]; S3 = S2 + 0.9*[2,2,1]
    expected = [[1.8, 2.7, 1.8], [2.7, 4.5, 2.25], [4.5, 6.3, 3.15]]
    for got, want in zip(_run_steps(criterion), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-6)


def test_snip_momentum_decaying_variant_three_steps() -> None:
    criterion = SnipMomentumCriterion(alpha=0.9, beta=1.0)
    # S1 = [2,3,2]; S2 = 0.9*S1 + [1,2,0.5] = [2.8,4.7,2.3]; S3 = 0.9*S2 + [2,2,1]
    expected = [[2.0, 3.0, 2.0], [2.8, 4.7, 2.3], [4.52, 6.23, 3.07]]
    for got, want in zip(_run_steps(criterion), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-6)


def test_gradient_criterion_custom_alpha_beta_three_steps() -> None:
    criterion = GradientCriterion(alpha=0.5, beta=2.0)
    # S1 = 2*[2,1.5,4] = [4,3,8]; S2 = 0.5*S1 + 2*[2,2,0.5] = [6,5.5,5]; S3 = 0.5*S2 + 2*[1,4,0.25]
    expected = [[4.0, 3.0, 8.0], [6.0, 5.5, 5.0], [5.0, 10.75, 3.0]]
    for got, want in zip(_run_steps(criterion), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-6)


def test_default_snip_and_gradient_sum_without_decay() -> None:
    # alpha = beta = 1: plain sums of the terms.
    assert _run_steps(SnipCriterion())[-1] == pytest.approx([5.0, 7.0, 3.5])
    assert _run_steps(GradientCriterion())[-1] == pytest.approx([5.0, 7.5, 4.75])
    # Movement: -(W G) per step = [-2, 3, 2], [1, -2, 0.5], [-2, 2, -1]
    assert _run_steps(MovementCriterion())[-1] == pytest.approx([-3.0, 3.0, 1.5])


# ====================================================================== reset vs keep
@pytest.mark.parametrize(
    ("criterion", "resets"),
    [
        (GradientCriterion(), True),
        (SnipCriterion(), True),
        (SnipMomentumCriterion(), False),
        (MovementCriterion(), False),
        (GradientCriterion(reset_after_event=False), False),
        (SnipCriterion(reset_after_event=False), False),
        (SnipMomentumCriterion(reset_after_event=True), True),
        (MovementCriterion(reset_after_event=True), True),
    ],
    ids=repr,
)
def test_after_event_resets_or_keeps(criterion: AccumulatingCriterion, resets: bool) -> None:
    param = _param(W, G)
    buffer = criterion.init_buffer(param)
    criterion.accumulate(buffer, param, TRUE)
    before = buffer.clone()
    assert before.abs().sum() > 0
    criterion.after_event(buffer)
    if resets:
        assert not buffer.any()
    else:
        assert torch.equal(buffer, before)


def test_pruner_resets_snip_buffers_but_keeps_snip_momentum() -> None:
    results = {}
    for name in ("snip", "snip_momentum"):
        pruner = Pruner(
            _small_model(), Schedule(5, 5), PruningOptions(criterion=name, pattern="1x1", target_sparsity=0.5)
        )
        _set_grads(pruner, [torch.randn(8, 8), torch.randn(8, 8)])
        pruner.accumulate_scores()
        assert all(b.abs().sum() > 0 for b in pruner.buffers)
        pruner.prune(0.5)
        assert pruner.sparsity == 0.5
        results[name] = pruner.buffers
    assert all(not b.any() for b in results["snip"])
    assert all(b.abs().sum() > 0 for b in results["snip_momentum"])


@pytest.mark.parametrize("name", ["snip_momentum", "movement"])
def test_prune_does_not_write_into_kept_score_buffers(name: str) -> None:
    pruner = Pruner(
        _small_model(), Schedule(5, 5), PruningOptions(criterion=name, pattern="1x1", target_sparsity=0.5)
    )
    torch.manual_seed(1)
    _set_grads(pruner, [torch.randn(8, 8), torch.randn(8, 8)])
    pruner.accumulate_scores()
    pruner.prune(0.25)
    kept = [b.clone() for b in pruner.buffers]
    pruner.prune(0.5)  # the second event ranks with the first event's pruned weights masked
    for buffer, before in zip(pruner.buffers, kept, strict=True):
        assert torch.isfinite(buffer).all(), "score buffers must stay finite"
        assert torch.equal(buffer, before), "an event must not change a kept score buffer"


# ====================================================================== non-finite gradients
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_step_adds_nothing_and_does_not_decay(bad: float) -> None:
    criterion = SnipMomentumCriterion(alpha=0.9, beta=1.0)
    pruner = Pruner(_small_model(), Schedule(5, 5), PruningOptions(criterion=criterion, pattern="1x1"))
    weights = [t.param.detach().clone() for t in pruner.targets]
    torch.manual_seed(2)
    first = [torch.randn(8, 8), torch.randn(8, 8)]
    _set_grads(pruner, first)
    pruner.accumulate_scores()
    after_first = [(w * g).abs() for w, g in zip(weights, first, strict=True)]
    for buffer, want in zip(pruner.buffers, after_first, strict=True):
        torch.testing.assert_close(buffer, want)

    # Target 0 finite, target 1 has one bad entry: nothing is added anywhere, nothing decays.
    poisoned = torch.randn(8, 8)
    poisoned[3, 5] = bad
    _set_grads(pruner, [torch.randn(8, 8) * 100, poisoned])
    pruner.accumulate_scores()
    for buffer, want in zip(pruner.buffers, after_first, strict=True):
        torch.testing.assert_close(buffer, want)

    # A later finite step accumulates as usual: 0.9 * S + |W G|.
    third = [torch.randn(8, 8), torch.randn(8, 8)]
    _set_grads(pruner, third)
    pruner.accumulate_scores()
    for buffer, prev, w, g in zip(pruner.buffers, after_first, weights, third, strict=True):
        torch.testing.assert_close(buffer, 0.9 * prev + (w * g).abs())
        assert torch.isfinite(buffer).all()


def test_non_finite_in_first_target_also_blocks_the_others() -> None:
    pruner = Pruner(_small_model(), Schedule(5, 5), PruningOptions(criterion="gradient", pattern="1x1"))
    bad = torch.ones(8, 8)
    bad[0, 0] = float("inf")
    _set_grads(pruner, [bad, torch.ones(8, 8)])
    pruner.accumulate_scores()
    assert all(not b.any() for b in pruner.buffers)


def test_target_without_grad_is_skipped() -> None:
    pruner = Pruner(_small_model(), Schedule(5, 5), PruningOptions(criterion="snip", pattern="1x1"))
    weight = pruner.targets[0].param.detach().clone()
    grad = torch.randn(8, 8)
    _set_grads(pruner, [grad, None])
    pruner.accumulate_scores()
    torch.testing.assert_close(pruner.buffers[0], (weight * grad).abs())
    assert not pruner.buffers[1].any()
    assert pruner.gradient_steps == 1
    _set_grads(pruner, [None, None])  # no gradient at all: nothing happens, nothing is counted
    pruner.accumulate_scores()
    assert pruner.gradient_steps == 1
    torch.testing.assert_close(pruner.buffers[0], (weight * grad).abs())


# ====================================================================== score dtype
def test_bfloat16_buffers_take_half_the_memory_and_rank_like_float32() -> None:
    param = _param([[1.0] * 8] * 8)
    f32, bf16 = SnipCriterion(), SnipCriterion(score_dtype="bfloat16")
    b32, b16 = f32.init_buffer(param), bf16.init_buffer(param)
    assert (b32.dtype, b16.dtype) == (torch.float32, torch.bfloat16)
    assert b16.numel() * b16.element_size() * 2 == b32.numel() * b32.element_size()

    # Well separated scores: the integers 1..128 shuffled over both layers, all exact in bf16.
    torch.manual_seed(3)
    order = torch.randperm(64).float().add(1).view(8, 8)
    masks = []
    for dtype in ("float32", "bfloat16"):
        model = _small_model()
        for target_index in (0, 2):
            model[target_index].weight.data.fill_(1.0)
        pruner = Pruner(
            model, Schedule(5, 5), PruningOptions(criterion=SnipCriterion(score_dtype=dtype), pattern="1x1")
        )
        assert all(b.dtype == getattr(torch, dtype) for b in pruner.buffers)
        _set_grads(pruner, [2 * order - 1, 2 * order.T])
        pruner.accumulate_scores()
        scores = [
            pruner.options.criterion.score(b, t.param)
            for b, t in zip(pruner.buffers, pruner.targets, strict=True)
        ]
        assert all(s.dtype == torch.float32 for s in scores)
        assert torch.equal(scores[0].flatten().argsort(), order.flatten().argsort())
        pruner.prune(0.5)
        masks.append([m.clone() for m in pruner.masks])
    for a, b in zip(*masks, strict=True):
        assert torch.equal(a, b)


# ====================================================================== argument checks
@pytest.mark.parametrize("cls", ACCUMULATING_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": "x"}, r"alpha='x'"),
        ({"beta": True}, r"beta=True"),
        ({"init_batches": 0}, r"init_batches=0"),
        ({"init_batches": 1.5}, r"init_batches=1.5"),
        ({"score_dtype": "float16"}, r"score_dtype='float16'"),
        ({"reset_after_event": "no"}, r"reset_after_event='no'"),
    ],
)
def test_invalid_arguments_name_the_argument(
    cls: type[AccumulatingCriterion], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_criterion_names_select_the_classes_with_their_defaults() -> None:
    options = PruningOptions(criterion=" Snip_Momentum ")
    assert options.criterion == SnipMomentumCriterion()
    assert (options.criterion.alpha, options.criterion.beta, options.criterion.reset_after_event) == (
        1.0,
        0.9,
        False,
    )
    assert PruningOptions(criterion="movement").criterion == MovementCriterion()
    assert PruningOptions(criterion="gradient").criterion.reset_after_event is True
    with pytest.raises(ValueError, match=r"criterion='snipp'"):
        PruningOptions(criterion="snipp")


# ====================================================================== Pruner with plain PyTorch
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_gradient_criterion_before_any_gradient_raises_a_clear_error() -> None:
    options = PruningOptions(criterion="snip", pattern="1x1", target_sparsity=0.5)
    model = _mlp()
    pruner = Pruner(model, Schedule(0, 0), options)
    with pytest.raises(RuntimeError, match=r"'snip'.*needs gradients") as info:
        pruner.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert "backward" in str(info.value) and "step >= 1" in str(info.value)
    assert pruner.events == []

    model = _mlp()
    pruner = Pruner(model, Schedule(0, 0), options)
    _loss(model, next(iter(tiny_loader()))).backward()
    pruner.accumulate_scores()
    pruner.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert [e.step for e in pruner.events] == [0]
    assert pruner.sparsity == 0.5
    assert zero_fraction([model[0].weight, model[2].weight]) == pytest.approx(0.5, abs=1e-3)


def test_retrying_attach_after_the_no_gradient_error_counts_each_step_once() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(
        model, Schedule(0, 0), PruningOptions(criterion="snip", pattern="1x1", target_sparsity=0.5)
    )
    with pytest.raises(RuntimeError, match="needs gradients"):
        pruner.attach(optimizer)
    batch = next(iter(tiny_loader()))
    _loss(model, batch).backward()
    pruner.accumulate_scores()
    pruner.attach(optimizer)
    assert pruner.sparsity == 0.5
    optimizer.step()
    # One step counted once; no scoring after the (only) event: nothing would use it.
    assert (pruner.step, pruner.gradient_steps) == (1, 1)


def test_attach_accumulates_in_the_step_pre_hook() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model, Schedule(100, 100), PruningOptions(criterion="snip", pattern="1x1"))
    pruner.attach(optimizer)
    expected = [torch.zeros_like(t.param) for t in pruner.targets]
    steps = 0
    for batch in tiny_loader(batches=6):
        optimizer.zero_grad()
        _loss(model, batch).backward()
        for total, target in zip(expected, pruner.targets, strict=True):
            total += (target.param.detach() * target.param.grad).abs()  # W_n before the step
        optimizer.step()
        steps += 1
    assert pruner.step == pruner.gradient_steps == steps == 6
    for buffer, want in zip(pruner.buffers, expected, strict=True):
        assert buffer.abs().sum() > 0
        torch.testing.assert_close(buffer, want)

    # Without the pre-hook nothing reaches the criterion unless the caller feeds it.
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, Schedule(100, 100), PruningOptions(criterion="snip", pattern="1x1"))
    pruner.attach(optimizer, accumulate_before_step=False)
    _loss(model, next(iter(tiny_loader()))).backward()
    optimizer.step()
    assert (pruner.step, pruner.gradient_steps) == (1, 0)
    assert all(not b.any() for b in pruner.buffers)


def test_grad_scaler_skipped_step_moves_neither_steps_nor_scores() -> None:
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, Schedule(100, 100), PruningOptions(criterion="snip", pattern="1x1"))
    pruner.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = iter(tiny_loader(batches=3))

    def step(poison: bool) -> list[Tensor]:
        optimizer.zero_grad()
        scaler.scale(_loss(model, next(batches))).backward()
        scale = scaler.get_scale()
        if poison:
            model[2].weight.grad[0, 0] = float("inf")
        # What the criterion should see: unscaled gradients, weights before the step.
        terms = [(t.param.detach() * t.param.grad / scale).abs() for t in pruner.targets]
        scaler.step(optimizer)
        scaler.update()
        return terms

    first = step(poison=False)
    assert (pruner.step, pruner.gradient_steps) == (1, 1)
    for buffer, want in zip(pruner.buffers, first, strict=True):
        torch.testing.assert_close(buffer, want)
    buffers = [b.clone() for b in pruner.buffers]
    weights = [p.detach().clone() for p in model.parameters()]

    step(poison=True)
    assert scaler.get_scale() == 2.0**9, "the scaler must have skipped the step"
    assert (pruner.step, pruner.gradient_steps) == (1, 1)
    for buffer, before in zip(pruner.buffers, buffers, strict=True):
        assert torch.equal(buffer, before)
    for param, before in zip(model.parameters(), weights, strict=True):
        assert torch.equal(param, before)

    third = step(poison=False)
    assert (pruner.step, pruner.gradient_steps) == (2, 2)
    for buffer, a, b in zip(pruner.buffers, first, third, strict=True):
        torch.testing.assert_close(buffer, a + b)


# ====================================================================== Lightning
class MaskHolds(pl.Callback):
    """After every batch, every weight the pruner masks must be exactly zero."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        pruner = self.pruning.pruner
        for target, mask in zip(pruner.targets, pruner.masks, strict=True):
            assert not target.param[~mask].any(), f"{target.name} has non-zero pruned weights"
        self.checked += 1


def _fit(
    criterion: Any,
    pattern: str,
    target: float,
    *,
    max_steps: int = 20,
    module: type[pl.LightningModule] = TinyModule,
    start_step: int | None = None,
    end_step: int = 20,
    frequency: int = 5,
    **trainer_kwargs: Any,
) -> tuple[pl.LightningModule, PruningCallback, pl.Trainer, MaskHolds]:
    pl.seed_everything(0)
    model = module()
    pruning = PruningCallback(
        criterion=criterion,
        pattern=pattern,
        target_sparsity=target,
        start_step=start_step,
        end_step=end_step,
        frequency=frequency,
        verbose=False,
    )
    holds = MaskHolds(pruning)
    trainer = make_trainer([pruning, holds], max_steps=max_steps, **trainer_kwargs)
    trainer.fit(model, tiny_loader())
    return model, pruning, trainer, holds


@pytest.mark.slow
@pytest.mark.parametrize(("pattern", "target"), [("4x1", 0.75), ("2:4", 0.5)])
@pytest.mark.parametrize("criterion", ["magnitude", *GRADIENT_CRITERIA])
def test_each_criterion_reaches_the_target_under_lightning(
    criterion: str, pattern: str, target: float
) -> None:
    _, pruning, trainer, holds = _fit(criterion, pattern, target)
    pruner = pruning.pruner
    assert type(pruner.options.criterion).name == criterion
    assert trainer.global_step == pruner.step == 20
    assert [e.step for e in pruner.events] == [5, 10, 15, 20]
    assert holds.checked == 20
    weights = pruned_weights(pruning)
    total = sum(w.numel() for w in weights)
    assert zero_fraction(weights) == pytest.approx(target, abs=4 / total)
    assert pruner.sparsity == pytest.approx(target, abs=4 / total)
    if pattern == "2:4":
        for mask in pruner.masks:
            assert ((~mask).view(mask.shape[0], -1, 4).sum(-1) == 2).all()
    if criterion == "magnitude":
        assert pruner.gradient_steps == 0 and pruner.buffers == [None, None]
    else:
        assert pruner.gradient_steps == trainer.global_step


@pytest.mark.slow
def test_different_criteria_give_different_masks() -> None:
    masks = {}
    for criterion in ["magnitude", *GRADIENT_CRITERIA]:
        _, pruning, _, _ = _fit(criterion, "4x1", 0.75)
        masks[criterion] = torch.cat([m.flatten() for m in pruning.pruner.masks])
    assert not torch.equal(masks["snip"], masks["magnitude"])
    for a, b in itertools.combinations(masks, 2):
        assert not torch.equal(masks[a], masks[b]), f"{a} and {b} pruned the same weights"


class FirstBatch(pl.Callback):
    """Records the state of the model and the pruner when the first training batch starts."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.seen: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.seen is not None:
            return
        pruner = self.pruning.pruner
        self.seen = {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "grads": [p.grad for p in pl_module.parameters()],
            "optimizer_state": len(trainer.optimizers[0].state),
            "zeros": zero_fraction(pruned_weights(self.pruning)),
            "gradient_steps": pruner.gradient_steps,
            "step": pruner.step,
            "masks": [m.clone() for m in pruner.masks],
        }


def test_snip_at_initialization() -> None:
    pl.seed_everything(0)
    model = TinyModule()
    reference = copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruning = PruningCallback(
        criterion=SnipCriterion(init_batches=3),
        pattern="1x1",
        target_sparsity=0.5,
        start_step=0,
        end_step=0,
        verbose=False,
    )
    first = FirstBatch(pruning)
    trainer = make_trainer([pruning, first], max_steps=5)
    trainer.fit(model, tiny_loader())
    pruner, seen = pruning.pruner, first.seen

    assert [e.step for e in pruner.events] == [0]
    assert seen["step"] == 0 and seen["zeros"] == pytest.approx(0.5, abs=1e-3)
    assert seen["gradient_steps"] == 3
    assert trainer.global_step == 5
    assert pruner.gradient_steps == 3, "after the one-shot, no step is scored: no event would use it"
    assert all(g is None for g in seen["grads"]), "init scoring must clear its gradients"
    assert seen["optimizer_state"] == 0, "init scoring must not step the optimizer"
    masks = dict(zip(["net.0.weight", "net.2.weight"], seen["masks"], strict=True))
    for name, before in initial.items():
        now = seen["params"][name]
        if name in masks:
            assert torch.equal(now[masks[name]], before[masks[name]]), name
            assert not now[~masks[name]].any(), name
        else:
            assert torch.equal(now, before), name

    # The mask by hand: |W * G| summed over the first three batches, lowest half over both layers.
    layers = [reference.net[0], reference.net[2]]
    scores = [torch.zeros_like(layer.weight) for layer in layers]
    for batch in itertools.islice(tiny_loader(), 3):
        reference.zero_grad()
        _loss(reference, batch).backward()
        for score, layer in zip(scores, layers, strict=True):
            score += (layer.weight.detach() * layer.weight.grad).abs()
    flat = torch.cat([s.flatten() for s in scores])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[flat.argsort()[: flat.numel() // 2]] = False
    ordered = flat.sort().values
    assert ordered[flat.numel() // 2] > ordered[flat.numel() // 2 - 1], "a tie would make the test ambiguous"
    sizes = [s.numel() for s in scores]
    for mask, want, score in zip(pruner.masks, keep.split(sizes), scores, strict=True):
        assert torch.equal(mask, want.view_as(score))


def test_snip_at_initialization_with_more_init_batches_than_data() -> None:
    pruning = PruningCallback(
        criterion=SnipCriterion(init_batches=11), pattern="1x1", target_sparsity=0.5, start_step=0, end_step=0
    )
    with pytest.raises(ValueError, match=r"init_batches=11.*10 training batches"):
        make_trainer([pruning], max_steps=2).fit(TinyModule(), tiny_loader(batches=10))


class ManualTiny(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(_loss(self, batch))
        optimizer.step()


def test_manual_optimization_with_event_at_step_zero_is_refused() -> None:
    pruning = PruningCallback(criterion="snip", pattern="1x1", target_sparsity=0.5, start_step=0, end_step=0)
    with pytest.raises(ValueError, match="manual optimization"):
        make_trainer([pruning], max_steps=3).fit(ManualTiny(), tiny_loader())


def test_manual_optimization_with_later_start_works() -> None:
    _, pruning, trainer, holds = _fit(
        "snip", "1x1", 0.5, max_steps=12, module=ManualTiny, start_step=2, end_step=10, frequency=4
    )
    pruner = pruning.pruner
    assert trainer.global_step == pruner.step == 12
    assert pruner.gradient_steps == 10, "scored up to the last event (step 10), not after"
    assert [e.step for e in pruner.events] == [6, 10]
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.5, abs=1e-3)
    assert holds.checked == 12


def test_gradient_accumulation_scores_once_per_optimizer_step() -> None:
    _, pruning, trainer, _ = _fit(
        "snip", "4x1", 0.5, max_steps=8, accumulate_grad_batches=2, start_step=2, end_step=6, frequency=2
    )
    assert trainer.global_step == pruning.pruner.step == 8
    assert pruning.pruner.gradient_steps == 6, "scored once per optimizer step up to the last event"
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.5, abs=4 / 1536)


class Frozen(TinyModule):
    """Learning rate 0: the weights stay put, so the expected scores can be computed by hand."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:end_step resolves")
def test_gradient_accumulation_scores_the_accumulated_gradient() -> None:
    pl.seed_everything(0)
    model = Frozen()
    reference = copy.deepcopy(model)
    pruning = PruningCallback(criterion="snip", pattern="1x1", start_step=100, end_step=100, verbose=False)
    trainer = make_trainer([pruning], max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(model, tiny_loader(batches=10))
    assert trainer.global_step == pruning.pruner.gradient_steps == 5

    # One term per optimizer step, from the gradient of the mean loss over its two batches.
    layers = [reference.net[0], reference.net[2]]
    expected = [torch.zeros_like(layer.weight) for layer in layers]
    batches = list(tiny_loader(batches=10))
    for a, b in zip(batches[0::2], batches[1::2], strict=True):
        reference.zero_grad()
        (_loss(reference, a) / 2).backward()
        (_loss(reference, b) / 2).backward()
        for total, layer in zip(expected, layers, strict=True):
            total += (layer.weight.detach() * layer.weight.grad).abs()
    for buffer, want in zip(pruning.pruner.buffers, expected, strict=True):
        torch.testing.assert_close(buffer, want)


@pytest.mark.slow
@pytest.mark.parametrize("score_dtype", ["float32", "bfloat16"])
def test_bf16_autocast_with_snip_momentum(score_dtype: str) -> None:
    criterion = SnipMomentumCriterion(score_dtype=score_dtype)
    _, pruning, trainer, holds = _fit(criterion, "4x1", 0.75, precision="bf16-mixed")
    pruner = pruning.pruner
    assert pruner.gradient_steps == trainer.global_step == 20
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.75, abs=4 / 1536)
    assert holds.checked == 20
    for buffer, mask in zip(pruner.buffers, pruner.masks, strict=True):
        assert buffer.dtype == getattr(torch, score_dtype)
        live = buffer[mask]
        assert torch.isfinite(live).all() and (live > 0).any()


@pytest.mark.slow
def test_snip_momentum_scores_survive_a_resume(tmp_path: Path) -> None:
    straight_model, straight, _ = fit_resumable(
        tmp_path / "straight", max_epochs=4, criterion="snip_momentum"
    )
    fit_resumable(tmp_path / "stopped", max_epochs=2, criterion="snip_momentum")
    checkpoint = tmp_path / "stopped" / "epoch=1.ckpt"
    state = pruning_state(checkpoint)
    assert state["gradient_steps"] == 20
    assert all(b.abs().nan_to_num(posinf=0.0).sum() > 0 for b in state["buffers"].values())

    resumed_model, resumed, _ = fit_resumable(
        tmp_path / "resumed", max_epochs=4, ckpt_path=str(checkpoint), criterion="snip_momentum"
    )
    assert straight is not None and resumed is not None

    assert resumed.pruner.step == straight.pruner.step == 40
    assert resumed.pruner.gradient_steps == straight.pruner.gradient_steps == 30  # up to the last event
    assert resumed.pruner.events == straight.pruner.events
    for a, b in zip(straight.pruner.masks, resumed.pruner.masks, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.pruner.buffers, resumed.pruner.buffers, strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


class InfOnSecondBatch(TinyModule):
    """Puts an inf into one weight's gradient on the second batch, so the GradScaler skips that step."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer

    def on_after_backward(self) -> None:
        if self.trainer.fit_loop.epoch_loop.batch_progress.current.ready == 2:
            self.net[self.layer].weight.grad[0, 0] = float("inf")


def _fit_with_scaler(layer: int) -> tuple[PruningCallback, torch.amp.GradScaler]:
    pl.seed_everything(0)
    pruning = PruningCallback(
        criterion=GradientCriterion(reset_after_event=False),
        pattern="1x1",
        target_sparsity=0.5,
        start_step=3,
        end_step=3,
        verbose=False,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    amp = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    make_trainer([pruning], max_steps=3, plugins=[amp]).fit(InfOnSecondBatch(layer), tiny_loader())
    return pruning, scaler


def test_lightning_scaler_skipped_step_with_inf_in_a_target_adds_nothing() -> None:
    pruning, scaler = _fit_with_scaler(layer=2)  # net.2 is pruned
    assert scaler.get_scale() < 2.0**8
    assert pruning.pruner.step == 2
    for buffer in pruning.pruner.buffers:
        assert buffer.isfinite().all() and buffer.abs().sum() > 0


def test_lightning_scaler_skipped_step_adds_nothing_wherever_the_inf_is() -> None:
    in_target, _ = _fit_with_scaler(layer=2)
    in_head, scaler = _fit_with_scaler(layer=4)  # net.4, the head, is not pruned
    assert scaler.get_scale() < 2.0**8
    assert in_head.pruner.step == in_target.pruner.step == 2
    # The same steps were taken with the same weights; the skipped one must count for neither.
    for a, b in zip(in_target.pruner.buffers, in_head.pruner.buffers, strict=True):
        torch.testing.assert_close(a, b)

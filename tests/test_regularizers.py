"""Group lasso: the proximal formula by hand, its effect, its relation to the loss penalty, its window.

Expected values are worked out by hand or from ``w_g * max(0, 1 - lr * coeff / ||w_g||)`` with group
norms taken along explicit dims, never through the package's pattern helpers.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, pruned_weights, tiny_loader
from torch import Tensor, nn

from lightning_prune import GroupLasso, PruningCallback
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import parse_pattern
from lightning_prune.pruner import Pruner
from lightning_prune.schedules import Schedule

LR, COEFF = 0.25, 2.0  # lr * coeff = 0.5


def _apply(weight: Tensor, pattern: str, lr: float = LR, coeff: float = COEFF) -> Tensor:
    w = weight.clone()
    GroupLasso(coeff).apply(w, lr, parse_pattern(pattern))
    return w


# ---------------------------------------------------------------------------- the formula by hand
def test_rows_of_linear_weight() -> None:
    w = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0], [0.1, 0.0, 0.0, 0.0]])  # norms 5, 3, 0.1
    expected = torch.tensor(
        [
            [2.7, 3.6, 0.0, 0.0],  # * (1 - 0.5 / 5)
            [5 / 6, 5 / 3, 5 / 3, 0.0],  # * (1 - 0.5 / 3)
            [0.0, 0.0, 0.0, 0.0],  # norm 0.1 < 0.5
        ]
    )
    out = _apply(w, "1xchannel")
    torch.testing.assert_close(out, expected)
    assert (out[2] == 0).all(), "a row below lr * coeff must be exactly zero"


def test_columns_of_linear_weight() -> None:
    # Column norms 5, 2, 0.1, 3.
    w = torch.tensor([[3.0, 0.0, 0.1, 2.0], [4.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 2.0]])
    expected = torch.tensor([[2.7, 0.0, 0.0, 5 / 3], [3.6, 0.0, 0.0, 5 / 6], [0.0, 1.5, 0.0, 5 / 3]])
    out = _apply(w, "channelx1")
    torch.testing.assert_close(out, expected)
    assert (out[:, 2] == 0).all()


def test_two_by_two_blocks_of_linear_weight() -> None:
    # Blocks (rows 0-1 | 2-3) x (cols 0-1 | 2-3): norms 5, 0.1 / 2, 3.
    w = torch.tensor(
        [
            [3.0, 0.0, 0.1, 0.0],
            [0.0, 4.0, 0.0, 0.0],
            [1.0, 1.0, 2.0, 1.0],
            [1.0, 1.0, 2.0, 0.0],
        ]
    )
    expected = torch.tensor(
        [
            [2.7, 0.0, 0.0, 0.0],
            [0.0, 3.6, 0.0, 0.0],
            [0.75, 0.75, 5 / 3, 5 / 6],
            [0.75, 0.75, 5 / 3, 0.0],
        ]
    )
    out = _apply(w, "2x2")
    torch.testing.assert_close(out, expected)
    assert (out[:2, 2:] == 0).all()


def test_unstructured_is_l1_soft_threshold() -> None:
    w = torch.tensor([[1.0, -0.2, 0.5], [-3.0, 0.7, -0.6]])
    expected = torch.tensor([[0.5, 0.0, 0.0], [-2.5, 0.2, -0.1]])  # sign(w) * max(|w| - 0.5, 0)
    out = _apply(w, "1x1")
    torch.testing.assert_close(out, expected)
    assert out[0, 1] == 0 and out[0, 2] == 0


def _conv_weight() -> Tensor:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2, 2)
    w[1] *= 0.05  # filter 1: norm well below 0.5
    w[:, 2] *= 0.05  # input channel 2 across filters: also small
    return w


def _shrink(group: Tensor, threshold: float = LR * COEFF) -> Tensor:
    return group * max(0.0, 1.0 - threshold / float(group.norm()))


def test_conv_output_channels() -> None:
    w = _conv_weight()
    expected = torch.stack([_shrink(w[f]) for f in range(4)])
    out = _apply(w, "1xchannel")
    torch.testing.assert_close(out, expected)
    assert (out[1] == 0).all() and (out[0] != 0).any()


def test_conv_input_channels() -> None:
    w = _conv_weight()
    expected = torch.stack([_shrink(w[:, c]) for c in range(3)], dim=1)
    out = _apply(w, "channelx1")
    torch.testing.assert_close(out, expected)
    assert (out[:, 2] == 0).all() and (out[:, 0] != 0).any()


def test_conv_blocks_span_filters_at_one_kernel_position() -> None:
    w = _conv_weight()
    expected = w.clone()
    for o in range(0, 4, 2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    expected[o : o + 2, c, i, j] = _shrink(w[o : o + 2, c, i, j])
    torch.testing.assert_close(_apply(w, "2x1"), expected)


def test_apply_is_in_place_on_a_parameter() -> None:
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0], [0.1, 0.0, 0.0, 0.0]]))
    weight = layer.weight
    GroupLasso(COEFF).apply(layer.weight, LR, parse_pattern("1xchannel"))
    assert layer.weight is weight
    torch.testing.assert_close(layer.weight.detach()[0], torch.tensor([2.7, 3.6, 0.0, 0.0]))


# ---------------------------------------------------------------------------- what it does to training
def test_weak_rows_shrink_faster_and_reach_zero_first() -> None:
    # Rows of norms 0.45, 1, 2, 4; zero gradient, so only the regularizer moves them.
    directions = nn.functional.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    norms0 = torch.tensor([0.45, 1.0, 2.0, 4.0])
    layer = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(directions * norms0.unsqueeze(1))
    model = nn.Sequential(layer)
    lr, coeff = 0.1, 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    options = PruningOptions(
        target_sparsity=0.0,
        pattern="1xchannel",
        skip_last_layer=False,
        regularizer="group_lasso",
        regularizer_coeff=coeff,
    )
    pruner = Pruner(model, Schedule(start_step=0, end_step=100, frequency=50), options)
    pruner.attach(optimizer)

    first_zero: dict[int, int] = {}
    ratios = []
    for step in range(1, 13):
        before = layer.weight.detach().norm(dim=1)
        layer.weight.grad = torch.zeros_like(layer.weight)
        optimizer.step()
        after = layer.weight.detach().norm(dim=1)
        if step <= 3:
            ratios.append(after / before)
            # Each step takes lr * coeff off every row's norm.
            torch.testing.assert_close(after, norms0 - step * lr * coeff, rtol=0, atol=1e-5)
        for row in range(4):
            if row not in first_zero and (layer.weight[row] == 0).all():
                first_zero[row] = step
    for ratio in ratios:
        assert (ratio.diff() > 0).all(), f"relative shrinkage must be strongest for weak rows: {ratio}"
    # Row 0 (0.45) hits zero exactly at step 5, row 1 (1.0) by step 11, the strong ones not yet.
    assert first_zero[0] == 5
    assert first_zero[1] in (10, 11)
    assert 2 not in first_zero and 3 not in first_zero
    assert (layer.weight[2:].norm(dim=1) > 0.5).all()


def _row_norms(w: Tensor) -> Tensor:
    return w.norm(dim=1)


def _column_norms(w: Tensor) -> Tensor:
    return w.norm(dim=0)


def _block_norms(w: Tensor) -> Tensor:
    out, inp = w.shape
    return w.reshape(out // 2, 2, inp // 2, 2).permute(0, 2, 1, 3).reshape(out // 2, inp // 2, 4).norm(dim=-1)


def _prox_vs_penalty_error(
    pattern: str, norms: object, lr: float, coeff: float
) -> tuple[float, float, float]:
    """Max |prox step - SGD step on loss + penalty|, the second-order bound, and the penalty's size."""
    torch.manual_seed(0)
    w0 = 2.0 * torch.randn(6, 8)
    x, y = torch.randn(16, 8), torch.randn(16, 6)

    def loss_of(w: Tensor) -> Tensor:
        return nn.functional.mse_loss(x @ w.T, y)

    # (a) one SGD step on loss + coeff * sum_g ||w_g||.
    a = w0.clone().requires_grad_(True)
    (loss_of(a) + coeff * norms(a).sum()).backward()  # type: ignore[operator]
    sgd_penalty = (a - lr * a.grad).detach()
    # (b) one SGD step on the loss, then the proximal operator.
    b = w0.clone().requires_grad_(True)
    loss_of(b).backward()
    grad = b.grad.detach().clone()
    prox = (b - lr * grad).detach()
    GroupLasso(coeff).apply(prox, lr, parse_pattern(pattern))

    error = float((prox - sgd_penalty).abs().max())
    # |w/|w| - v/|v|| <= 2 |w - v| / |w| per group, with w - v = lr * grad: the error is lr^2-small.
    smallest = float(norms(w0).min())  # type: ignore[operator]
    bound = lr * coeff * 2 * lr * float(grad.norm()) / smallest
    penalty_size = float((sgd_penalty - (w0 - lr * grad)).abs().max())
    return error, bound, penalty_size


@pytest.mark.parametrize(
    ("pattern", "norms"), [("1xchannel", _row_norms), ("channelx1", _column_norms), ("2x2", _block_norms)]
)
def test_proximal_step_matches_sgd_on_the_penalty_to_second_order(pattern: str, norms: object) -> None:
    lr, coeff = 0.01, 1.0
    error, bound, penalty_size = _prox_vs_penalty_error(pattern, norms, lr, coeff)
    assert penalty_size > 1e-3, "the penalty must move the weights by more than the tolerance"
    assert error <= bound + 1e-6
    assert error < 0.05 * penalty_size, "a wrong factor or sign would be of the penalty's size"
    # Second order: a quarter of the lr gives about a sixteenth of the error.
    small_error, _, _ = _prox_vs_penalty_error(pattern, norms, lr / 4, coeff)
    assert small_error < error / 8


# ---------------------------------------------------------------------------- through the Pruner
def test_pruner_uses_each_param_groups_current_lr_and_stops_after_end_step() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(8, 6, bias=False), nn.Linear(6, 4, bias=False)
    model = nn.Sequential(first, second)
    coeff = 0.5
    optimizer = torch.optim.SGD(
        [{"params": [first.weight], "lr": 0.1}, {"params": [second.weight], "lr": 0.02}]
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    options = PruningOptions(
        target_sparsity=0.5,
        pattern="1xchannel",
        scope="local",
        skip_last_layer=False,
        regularizer="group_lasso",
        regularizer_coeff=coeff,
    )
    pruner = Pruner(model, Schedule(start_step=0, end_step=3, frequency=3), options)
    pruner.attach(optimizer)
    layers = [first, second]

    for step in range(1, 7):
        before = [layer.weight.detach().clone() for layer in layers]
        lrs = [group["lr"] for group in optimizer.param_groups]
        for layer in layers:
            layer.weight.grad = torch.zeros_like(layer.weight)
        optimizer.step()
        scheduler.step()
        for layer, w, lr, mask in zip(layers, before, lrs, pruner.masks, strict=True):
            if step <= 3:
                factor = (1 - lr * coeff / w.norm(dim=1, keepdim=True)).clamp_min(0)
                expected = w * factor * mask
                assert not torch.allclose(expected, w), "the shrink must be visible"
            else:
                expected = w  # past end_step: zero gradient, no regularizer, nothing moves
            torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert [e.step for e in pruner.events] == [3]
    assert pruner.layer_sparsity() == {"0": 0.5, "1": 0.5}


# ---------------------------------------------------------------------------- through the callback
class SGDModule(TinyModule):
    """TinyModule with plain SGD and a per-step decaying learning rate."""

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.SGD(self.parameters(), lr=0.2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.25 * s))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ProxOracle(pl.Callback):
    """Checks every step's update of the pruned weights: SGD, then prox up to end_step, then masks."""

    def __init__(self, pruning: PruningCallback, coeff: float | None, end_step: int) -> None:
        self.pruning, self.coeff, self.end_step = pruning, coeff, end_step
        self.before: list[tuple[Tensor, Tensor]] = []
        self.lr = 0.0
        self.lrs: list[float] = []
        self.checked: list[int] = []
        self.prox_moved: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        targets = self.pruning.pruner.targets
        self.before = [(t.param.detach().clone(), t.param.grad.detach().clone()) for t in targets]
        self.lr = optimizer.param_groups[0]["lr"]
        self.lrs.append(self.lr)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        pruner = self.pruning.pruner
        step = pruner.step
        for target, mask, (w, g) in zip(pruner.targets, pruner.masks, self.before, strict=True):
            sgd = w - self.lr * g
            expected = sgd
            if self.coeff is not None and step <= self.end_step:
                factor = (1 - self.lr * self.coeff / sgd.norm(dim=1, keepdim=True)).clamp_min(0)
                expected = sgd * factor
                self.prox_moved.append(float(((expected - sgd) * mask).abs().max()))
            torch.testing.assert_close(
                target.param.detach(), expected * mask, rtol=1e-5, atol=1e-6, msg=f"step {step}"
            )
        self.checked.append(step)


@pytest.mark.slow
@pytest.mark.parametrize("coeff", [0.05, None])
def test_callback_regularizes_up_to_end_step_with_the_current_lr(coeff: float | None) -> None:
    pl.seed_everything(0)
    model = SGDModule()
    extra = {} if coeff is None else {"regularizer": "group_lasso", "regularizer_coeff": coeff}
    pruning = PruningCallback(
        pattern="1xchannel",
        target_sparsity=0.5,
        start_step=0,
        end_step=10,
        frequency=5,
        verbose=False,
        **extra,
    )
    oracle = ProxOracle(pruning, coeff, end_step=10)
    trainer = make_trainer([pruning, oracle], max_epochs=2)
    trainer.fit(model, tiny_loader())

    assert oracle.checked == list(range(1, 21))
    assert len(set(oracle.lrs)) == 20, "the lr must change every step for this test to tell"
    if coeff is not None:
        assert pruning.options.regularizer == GroupLasso(coeff)
        assert min(oracle.prox_moved) > 1e-4, "the regularizer's shrink must be visible on kept rows"
    weights = pruned_weights(pruning)
    # Whole rows are zero, half of the weights within one row.
    for w in weights:
        assert int((w == 0).sum()) == int((w == 0).all(dim=1).sum()) * w.shape[1]
    numel = sum(w.numel() for w in weights)
    assert abs(sum(int((w == 0).sum()) for w in weights) - numel / 2) <= 32


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regularizer": "ridge"}, r"regularizer='ridge'"),
        ({"regularizer": "group_lasso", "regularizer_coeff": 0}, r"regularizer_coeff=0\b"),
        ({"regularizer": "group_lasso", "regularizer_coeff": -1}, r"regularizer_coeff=-1"),
        ({"regularizer": "group_lasso", "regularizer_coeff": "x"}, r"regularizer_coeff='x'"),
        ({"regularizer": "group_lasso", "regularizer_coeff": True}, r"regularizer_coeff=True"),
        ({"regularizer": "group_lasso", "regularizer_coeff": float("nan")}, r"regularizer_coeff=nan"),
        ({"regularizer_coeff": 0.1}, r"regularizer_coeff=0\.1.*regularizer"),
        ({"regularizer": GroupLasso(0.1), "regularizer_coeff": 0.2}, r"regularizer_coeff=0\.2.*GroupLasso"),
        ({"regularizer": 3}, r"regularizer=3"),
        ({"regularizer": "group_lasso", "pattern": "2:4", "target_sparsity": 0.5}, r"group_lasso.*'2:4'"),
    ],
)
def test_bad_regularizer_input_raises(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PruningOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        PruningCallback(**kwargs, verbose=False)  # type: ignore[arg-type]


def test_good_regularizer_input() -> None:
    assert PruningOptions(regularizer="group_lasso").regularizer == GroupLasso(1e-4)
    assert PruningOptions(regularizer="group_lasso", regularizer_coeff=3).regularizer == GroupLasso(3.0)
    assert PruningOptions(regularizer=GroupLasso(0.5)).regularizer == GroupLasso(0.5)
    assert PruningOptions(regularizer=None).regularizer is None
    assert PruningOptions(regularizer="group_lasso", pattern="1x1").regularizer == GroupLasso(1e-4)
    with pytest.raises(ValueError, match=r"regularizer_coeff=0\b"):
        GroupLasso(0)

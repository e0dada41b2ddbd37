"""One-shot pruning from calibration data with Lightning: the callback's event at step 0 followed by
fine-tuning with the masks held, and prune_lightning_module for a trained module without training.
Expected results come from the engine run by hand on the same batches, or from direct sums."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, tiny_loader
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruningCallback, prune_once
from lightning_prune.oneshot import prune_lightning_module


class WeightsAtStart(pl.Callback):
    """The pruned weights as training starts (after the callback's event at step 0)."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = [p.detach().clone() for p in pl_module.parameters()]


class Modes(TinyModule):
    """Records whether each training_step ran in training mode and with gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return super().training_step(batch, batch_idx)


def test_sparsegpt_at_step_zero_then_fine_tunes_with_its_masks_held() -> None:
    torch.manual_seed(0)
    model = Modes()
    by_hand = copy.deepcopy(model.net)
    loader = tiny_loader()
    expected = prune_once(
        by_hand, list(loader)[:4], criterion="sparsegpt", pattern="2:4", target_sparsity=0.5
    )  # the engine on the same 4 batches
    pruning = PruningCallback(
        criterion="sparsegpt", pattern="2:4", target_sparsity=0.5, start_step=0, end_step=0,
        calibration_batches=4, verbose=False, save_report=False,
    )  # fmt: skip
    start = WeightsAtStart()
    make_trainer([pruning, start], max_steps=5).fit(model, loader)
    pruner = pruning.pruner
    assert pruner is not None and [e.step for e in pruner.events] == [0]
    # The event: what the engine gives on the same batches, corrected weights included.
    for name, weight in zip(
        ["net.0.weight", "net.2.weight"], [by_hand[0].weight, by_hand[2].weight], strict=True
    ):
        index = [n for n, _ in model.named_parameters()].index(name)
        torch.testing.assert_close(start.weights[index], weight.detach())
    for mask, hand in zip(pruner.masks, expected.masks, strict=True):
        assert torch.equal(mask, hand)
    # Calibration: 1 pass to find the order, 1 per layer, 4 batches each; eval mode, no gradients.
    assert model.seen[: 1 + 2 * 4] == [(False, False)] * 9
    assert model.seen[9:] == [(True, True)] * 5, "training resumes in training mode"
    # Fine-tuning moved the kept weights and kept the pruned ones at zero.
    for target, mask in zip(pruner.targets, pruner.masks, strict=True):
        assert torch.equal(target.param == 0, ~mask)
    assert not torch.equal(start.weights[0], model.net[0].weight.detach())


def test_wanda_calibrates_on_the_given_loader_not_the_training_one() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 16, generator=generator) * torch.linspace(0.1, 3.0, 16)
    calibration = DataLoader(TensorDataset(x, torch.zeros(24, dtype=torch.long)), batch_size=8)
    pruning = PruningCallback(
        criterion="wanda", pattern="1x1", target_sparsity=0.5, scope="row", start_step=0, end_step=0,
        calibration_batches=2, calibration_data=calibration, verbose=False, save_report=False,
    )  # fmt: skip
    model = TinyModule()
    make_trainer([pruning], max_steps=1).fit(model, tiny_loader())
    pruner = pruning.pruner
    assert pruner is not None and pruner.calibration_calls == 2
    torch.testing.assert_close(pruner.buffers[0].view(-1), x[:16].square().sum(dim=0))  # 2 batches of 8
    for mask in pruner.masks:
        assert (mask.sum(dim=1) == mask.shape[1] // 2).all(), "every output row at 50%"


def test_the_callback_refuses_bad_calibration_settings_before_training() -> None:
    with pytest.raises(ValueError, match=r"calibration_batches=0 must be an int >= 1"):
        PruningCallback(criterion="wanda", start_step=0, end_step=0, calibration_batches=0)
    with pytest.raises(ValueError, match=r"calibration_data=3 must be a DataLoader or an iterable"):
        PruningCallback(criterion="wanda", start_step=0, end_step=0, calibration_data=3)
    with pytest.raises(
        ValueError, match=r"set start_step=0 and end_step=0 \(got start_step=10, end_step=10\)"
    ):
        PruningCallback(criterion="sparsegpt", pattern="1x1", start_step=10, end_step=10)
    with pytest.raises(ValueError, match=r"'sparsegpt'.*start_step=0 and end_step=0.*end_step=None"):
        PruningCallback(criterion="sparsegpt", pattern="2:4", target_sparsity=0.5)
    with pytest.raises(ValueError, match=r"'wanda' prunes once, before training.*end_step=0.9"):
        PruningCallback(criterion="wanda", pattern="1x1", end_step=0.9)  # it would find no data mid-run


class TinyData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.stages: list[str] = []

    def setup(self, stage: str) -> None:
        self.stages.append(stage)

    def train_dataloader(self) -> DataLoader:
        return tiny_loader()


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_prune_lightning_module_prunes_a_trained_module_without_a_trainer(criterion: str) -> None:
    torch.manual_seed(0)
    model = Modes()
    by_hand = copy.deepcopy(model.net)
    data = TinyData()
    options: dict[str, Any] = {"criterion": criterion, "pattern": "2:4", "target_sparsity": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # self.log without a trainer would warn: it is muted
        pruner = prune_lightning_module(model, data, calibration_batches=3, **options)
    expected = prune_once(by_hand, list(tiny_loader())[:3], **options)
    assert data.stages == ["fit"]
    assert {seen for seen in model.seen} == {(False, False)}
    assert model.training, "the module's own mode comes back"
    for got, hand in zip([model.net[0], model.net[2]], [by_hand[0], by_hand[2]], strict=True):
        torch.testing.assert_close(got.weight, hand.weight)
    for mask, hand_mask in zip(pruner.masks, expected.masks, strict=True):
        assert torch.equal(mask, hand_mask)
    assert pruner.sparsity == 0.5


def test_prune_lightning_module_takes_a_plain_loader_too() -> None:
    model = TinyModule()
    pruner = prune_lightning_module(
        model, tiny_loader(), criterion="wanda", pattern="1x1", target_sparsity=0.5
    )
    assert pruner.calibration_calls == 10, "all 10 batches there are, fewer than the 128 by default"
    assert isinstance(model.net[0], nn.Linear) and pruner.sparsity == 0.5

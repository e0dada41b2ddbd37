"""PruningCallback under Lightning on CPU: sparsity reached, masks kept, steps counted right, logging."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, pruned_weights, tiny_loader, zero_fraction
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn

from lightning_prune import PruningCallback


class MaskWatcher(pl.Callback):
    """After every batch, checks that every weight the pruner masks is exactly zero."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.checked = 0
        self.first_batch_zeros: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.first_batch_zeros is None:
            self.first_batch_zeros = zero_fraction(pruned_weights(self.pruning))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        pruner = self.pruning.pruner
        assert pruner is not None
        for target, mask in zip(pruner.targets, pruner.masks, strict=True):
            assert not target.param[~mask].any(), f"{target.name} has non-zero pruned weights"
        self.checked += 1


@pytest.mark.slow
def test_default_callback_reaches_target_and_leaves_head_dense() -> None:
    pl.seed_everything(0)
    model = TinyModule()
    keys_before = list(model.state_dict())
    pruning = PruningCallback(verbose=False)
    watcher = MaskWatcher(pruning)
    trainer = make_trainer([pruning, watcher], max_epochs=4)
    trainer.fit(model, tiny_loader())

    assert [t.name for t in pruning.pruner.targets] == ["net.0", "net.2"]
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.9, abs=0.01)
    assert not (model.net[4].weight == 0).any(), "the head must stay dense"
    # Default window: events up to 9/10 of the 40 steps, about 20 of them.
    events = pruning.pruner.events
    assert events[-1].step == 36 and len(events) >= 15
    assert [e.target_sparsity for e in events] == sorted(e.target_sparsity for e in events)
    # Masks held after every one of the 40 steps, though Adam keeps moving pruned weights.
    assert watcher.checked == 40
    # A plain model: same state_dict keys, no hooks, no parametrizations.
    assert list(model.state_dict()) == keys_before
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not hasattr(module, "parametrizations")


def test_one_shot_at_step_zero_prunes_before_the_first_step() -> None:
    pruning = PruningCallback(target_sparsity=0.5, pattern="1x1", start_step=0, end_step=0, verbose=False)
    watcher = MaskWatcher(pruning)
    make_trainer([pruning, watcher], max_steps=5).fit(TinyModule(), tiny_loader())
    assert watcher.first_batch_zeros == pytest.approx(0.5, abs=0.01)
    assert [e.step for e in pruning.pruner.events] == [0]


def test_two_four_ends_with_every_group_of_four_holding_two_zeros() -> None:
    pruning = PruningCallback(target_sparsity=0.5, pattern="2:4", end_step=6, frequency=2)
    make_trainer([pruning], max_steps=8).fit(TinyModule(), tiny_loader())
    for weight in pruned_weights(pruning):
        assert ((weight.view(weight.shape[0], -1, 4) == 0).sum(-1) == 2).all()


def test_local_scope_equal_layer_sparsity() -> None:
    pruning = PruningCallback(target_sparsity=0.75, pattern="1x1", scope="local", end_step=6, frequency=2)
    make_trainer([pruning], max_steps=8).fit(TinyModule(), tiny_loader())
    assert pruning.pruner.layer_sparsity() == {"net.0": 0.75, "net.2": 0.75}


def test_gradient_accumulation_counts_optimizer_steps_not_batches() -> None:
    pruning = PruningCallback(target_sparsity=0.5, pattern="1x1", start_step=2, end_step=4, frequency=2)
    trainer = make_trainer([pruning], max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(TinyModule(), tiny_loader(batches=10))
    assert trainer.global_step == 5
    assert pruning.pruner.step == 5
    assert [e.step for e in pruning.pruner.events] == [4]


class TwoOptimizerModule(pl.LightningModule):
    """Manual optimization with one optimizer per sub-network, as in GAN training."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.b = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss = nn.functional.cross_entropy(self.b(self.a(x)), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.a.parameters(), 1e-2), torch.optim.SGD(
            self.b.parameters(), 0.1, momentum=0.9
        )


def test_manual_optimization_with_two_optimizers() -> None:
    pruning = PruningCallback(target_sparsity=0.8, pattern="1x1", start_step=0, end_step=12, frequency=4)
    module = TwoOptimizerModule()
    trainer = make_trainer([pruning], max_epochs=1)
    trainer.fit(module, tiny_loader(batches=10))
    # Lightning counts every optimizer step; so does the pruner.
    assert pruning.pruner.step == trainer.global_step == 20
    assert [t.name for t in pruning.pruner.targets] == ["a.0", "a.2", "b.0"]
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.8, abs=0.01)
    for target, mask in zip(pruning.pruner.targets, pruning.pruner.masks, strict=True):
        assert not target.param[~mask].any()


def test_steps_skipped_by_the_grad_scaler_are_not_counted() -> None:
    class InfOnSecondBatch(TinyModule):
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            if self.trainer.fit_loop.epoch_loop.batch_progress.current.ready == 2:
                self.net[0].weight.grad.fill_(float("inf"))

    pruning = PruningCallback(target_sparsity=0.5, pattern="1x1", start_step=1, end_step=3, frequency=1)
    # Lightning turns precision="16-mixed" into bf16 on CPU; the plugin keeps a real GradScaler.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    amp = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = make_trainer([pruning], max_steps=5, plugins=[amp])
    trainer.fit(InfOnSecondBatch(), tiny_loader())
    # Each skipped step halves the scale (no growth within 2000 steps); fp16 may overflow more than once.
    skipped = round(math.log2(2.0**8 / scaler.get_scale()))
    assert skipped >= 1
    assert trainer.global_step == 5
    assert pruning.pruner.step == 5 - skipped, "steps the scaler skipped must not count"


def test_events_are_logged_to_the_trainer_loggers(tmp_path: Path) -> None:
    pruning = PruningCallback(target_sparsity=0.6, pattern="4x1", start_step=0, end_step=9, frequency=3)
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer([pruning], max_steps=12, logger=logger, log_every_n_steps=50)
    trainer.fit(TinyModule(), tiny_loader())
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [r for r in rows if r.get("pruning/sparsity")]
    assert [int(r["step"]) for r in logged] == [3, 6, 9]
    assert float(logged[-1]["pruning/target_sparsity"]) == pytest.approx(0.6)
    assert float(logged[-1]["pruning/sparsity"]) == pytest.approx(zero_fraction(pruned_weights(pruning)))
    for name in ("net.0", "net.2"):
        assert logged[-1][f"pruning/sparsity/{name}"] != ""
    assert trainer.progress_bar_metrics["sparsity"] == pytest.approx(pruning.pruner.sparsity)


@pytest.mark.slow
def test_plain_pytorch_loop_without_lightning() -> None:
    from lightning_prune import Pruner, PruningOptions, Schedule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model, Schedule(start_step=0, end_step=20, frequency=5), PruningOptions(pattern="4x1"))
    pruner.attach(optimizer)
    for x, y in tiny_loader(batches=30):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert pruner.step == 30
    assert [e.step for e in pruner.events] == [5, 10, 15, 20]
    assert zero_fraction([model[0].weight, model[2].weight]) == pytest.approx(0.9, abs=0.01)
    pruner.detach()
    model[0].weight.data.fill_(1.0)
    optimizer.step()
    assert (model[0].weight != 0).all(), "detach removes the hooks"


def test_nan_weights_are_pruned_first_with_a_warning() -> None:
    from lightning_prune import Pruner, PruningOptions, Schedule

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[0, :3] = float("nan")
    pruner = Pruner(model, Schedule(1, 1), PruningOptions(target_sparsity=0.25, pattern="1x1"))
    with pytest.warns(UserWarning, match=r"0 has NaN scores"):
        pruner.prune(0.25)
    assert not pruner.masks[0][0, :3].any(), "NaN weights go first"
    assert not model[0].weight.isnan().any()
    assert pruner.sparsity == 0.25

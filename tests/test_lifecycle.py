"""The training lifecycle as users run it: resume with other settings, dense checkpoints, second fits,
validate-then-fit, fine-tuning callbacks that unfreeze layers, frozen targets under gradient criteria,
tampered checkpoints and NaN weights. Each test names the root cause it guards."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    SCHEDULE,
    TinyModule,
    make_trainer,
    pruned_weights,
    tiny_loader,
    zero_fraction,
)
from helpers import fit_resumable as fit
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from lightning_prune import Pruner, PruningCallback, PruningOptions, Schedule


# --------------------------------------------------------------------------- 1. settings on resume
@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "parts"),
    [
        ({"target_sparsity": 0.7}, ("target_sparsity", "0.8", "0.7")),
        ({"scope": "local"}, ("scope", "'global'", "'local'")),
        ({"criterion": "snip_momentum"}, ("criterion", "MagnitudeCriterion", "SnipMomentumCriterion")),
        ({"frequency": 10}, ("frequency", "5", "10")),
        ({"sparsity_curve": "cos"}, ("sparsity_curve", "'exp'", "'cos'")),
        ({"max_sparsity_per_layer": 0.9}, ("max_sparsity_per_layer", "0.98", "0.9")),
    ],
    ids=lambda value: str(value),
)
def test_resume_with_a_setting_that_changes_the_result_is_refused_naming_it(
    tmp_path: Path, change: dict[str, Any], parts: tuple[str, ...]
) -> None:
    fit(tmp_path / "a", max_epochs=2)
    with pytest.raises(ValueError, match=".*".join(re.escape(p) for p in parts)):
        fit(tmp_path / "b", max_epochs=4, ckpt_path=tmp_path / "a" / "epoch=1.ckpt", **change)


@pytest.mark.slow
def test_resume_with_other_reporting_settings_is_accepted(tmp_path: Path) -> None:
    fit(tmp_path / "a", max_epochs=2)
    _, pruning, _ = fit(
        tmp_path / "b", max_epochs=4, ckpt_path=tmp_path / "a" / "epoch=1.ckpt", save_report=False
    )
    assert pruning is not None and [e.step for e in pruning.pruner.events] == [5, 10, 15, 20, 25, 30]


@pytest.mark.slow
def test_resume_with_a_longer_run_keeps_the_checkpoint_window_and_says_so(
    tmp_path: Path, messages: list[str]
) -> None:
    # The default window is a fraction of training: a longer resumed run would move it. The
    # checkpoint's window stays (events done are not redone, the target is reached where planned).
    window = {"start_step": None, "end_step": None, "frequency": None}
    fit(tmp_path / "a", max_epochs=2, **window)  # 20 steps: window 0 -> 18 every 1
    _, pruning, _ = fit(tmp_path / "b", max_epochs=4, ckpt_path=tmp_path / "a" / "epoch=1.ckpt", **window)
    assert pruning is not None
    assert (pruning.pruner.schedule.start_step, pruning.pruner.schedule.end_step) == (0, 18)
    assert [e.step for e in pruning.pruner.events] == list(range(1, 19))
    assert any("keeps the checkpoint's pruning window (steps 0->18 every 1)" in m for m in messages)


def test_stable_state_key_is_independent_of_the_settings() -> None:
    assert PruningCallback(target_sparsity=0.5).state_key == PruningCallback(pattern="1x1").state_key


# --------------------------------------------------------------------------- 2. the trainer's step
@pytest.mark.slow
def test_callback_added_to_a_dense_checkpoint_follows_the_schedule_from_the_trainer_step(
    tmp_path: Path,
) -> None:
    fit(tmp_path / "dense", max_epochs=2, dense=True)  # global_step 20, no pruning state
    _, pruning, trainer = fit(tmp_path / "b", max_epochs=4, ckpt_path=tmp_path / "dense" / "epoch=1.ckpt")
    assert pruning is not None
    assert pruning.pruner.step == trainer.global_step == 40
    # The events before step 20 were missed: one catch-up event at 20 to the schedule's sparsity there.
    assert [e.step for e in pruning.pruner.events] == [20, 25, 30]
    schedule = pruning.pruner.schedule
    assert pruning.pruner.events[0].target_sparsity == pytest.approx(schedule.sparsity_at(20, 0.8))
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.8, abs=0.01)


@pytest.mark.slow
def test_second_fit_on_the_same_trainer_continues_the_pruning_state(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TinyModule()
    pruning = PruningCallback(**SCHEDULE, verbose=False)
    trainer = make_trainer([pruning], max_epochs=4)
    trainer.fit(model, tiny_loader(batches=10))
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.8, abs=0.01)
    trainer.fit_loop.max_epochs = 5
    trainer.fit(model, tiny_loader(batches=10))
    assert trainer.global_step == pruning.pruner.step == 50
    assert [e.step for e in pruning.pruner.events] == [5, 10, 15, 20, 25, 30]
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.8, abs=0.01)


@pytest.mark.slow
def test_reused_callback_resumes_the_second_checkpoint_into_the_new_model(tmp_path: Path) -> None:
    fit(tmp_path / "a", max_epochs=2)
    checkpoint = tmp_path / "a" / "epoch=1.ckpt"
    pruning = PruningCallback(**SCHEDULE, verbose=False)
    first = TinyModule()
    make_trainer([pruning], max_epochs=3).fit(first, tiny_loader(batches=10), ckpt_path=checkpoint)
    second = TinyModule()
    trainer = make_trainer([pruning], max_epochs=3)
    trainer.fit(second, tiny_loader(batches=10), ckpt_path=checkpoint)
    assert pruning.pruner.step == trainer.global_step == 30
    assert [t.module for t in pruning.pruner.targets] == [second.net[0], second.net[2]]
    assert [e.step for e in pruning.pruner.events] == [5, 10, 15, 20, 25, 30]
    assert zero_fraction([second.net[0].weight, second.net[2].weight]) == pytest.approx(0.8, abs=0.01)


@pytest.mark.slow
def test_validate_from_a_checkpoint_then_fit_does_not_leak_the_checkpoint_state(tmp_path: Path) -> None:
    fit(tmp_path / "a", max_epochs=2)
    pruning = PruningCallback(**SCHEDULE, verbose=False)
    trainer = make_trainer([pruning], max_epochs=1, limit_val_batches=1)
    model = TinyModule()
    trainer.validate(model, tiny_loader(batches=2), ckpt_path=tmp_path / "a" / "epoch=1.ckpt", verbose=False)
    trainer.fit(model, tiny_loader(batches=10))  # a new run from step 0, no checkpoint
    assert pruning.pruner.step == trainer.global_step == 10
    assert [e.step for e in pruning.pruner.events] == [5, 10]


# --------------------------------------------------------------------------- 3. unfrozen layers
class UnfreezeAtEpochOne(BaseFinetuning):
    """Freezes net.0 at the start, adds it to the optimizer at epoch 1 (Lightning's fine-tuning recipe)."""

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=1e-2, initial_denom_lr=1.0)


class TrainsWhatRequiresGrad(TinyModule):
    """The fine-tuning recipe: the optimizer starts with the trainable parameters only."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class MaskHolds(pl.Callback):
    """Counts batches after which a pruned weight of any target is not exactly zero."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning, self.broken, self.checked = pruning, 0, 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        pruner = self.pruning.pruner
        assert pruner is not None
        self.checked += 1
        self.broken += sum(
            bool(t.param.detach()[~m].ne(0).any()) for t, m in zip(pruner.targets, pruner.masks, strict=True)
        )


@pytest.mark.slow
def test_masks_hold_on_layers_a_finetuning_callback_adds_to_the_optimizer_later() -> None:
    pl.seed_everything(0)
    pruning = PruningCallback(target_sparsity=0.6, pattern="1x1", start_step=0, end_step=0, verbose=False)
    watcher = MaskHolds(pruning)
    trainer = make_trainer([UnfreezeAtEpochOne(), pruning, watcher], max_epochs=3)
    model = TrainsWhatRequiresGrad()
    trainer.fit(model, tiny_loader(batches=10))
    assert watcher.checked == 30 and watcher.broken == 0
    first = model.net[0].weight.detach()
    assert (first == 0).float().mean() == pytest.approx(pruning.pruner.layer_sparsity()["net.0"])


# --------------------------------------------------------------------------- 4. frozen targets
class FrozenFirstLayer(TinyModule):
    def __init__(self, frozen: tuple[int, ...] = (0,)) -> None:
        super().__init__()
        for index in frozen:
            self.net[index].requires_grad_(False)


def test_gradient_criterion_leaves_frozen_targets_out_and_names_them() -> None:
    pruning = PruningCallback(target_sparsity=0.5, pattern="1x1", criterion="snip", end_step=6, frequency=2)
    model = FrozenFirstLayer()
    before = model.net[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"snip.*net\.0.*requires_grad=False"):
        make_trainer([pruning], max_steps=8).fit(model, tiny_loader())
    assert [t.name for t in pruning.pruner.targets] == ["net.2"]
    assert torch.equal(model.net[0].weight, before), "a frozen layer is left as it is"
    assert zero_fraction([model.net[2].weight]) == pytest.approx(0.5, abs=0.01)


def test_gradient_criterion_with_every_target_frozen_is_refused_before_training() -> None:
    pruning = PruningCallback(target_sparsity=0.5, pattern="1x1", criterion="snip", end_step=6, frequency=2)
    trainer = make_trainer([pruning], max_steps=8)
    with pytest.raises(ValueError, match=r"criterion 'snip'.*gradients.*requires_grad=False.*net\.0.*net\.2"):
        trainer.fit(FrozenFirstLayer(frozen=(0, 2)), tiny_loader())
    assert trainer.global_step == 0


# --------------------------------------------------------------------------- 5. checkpoint state
def _pruner(step: int = 10) -> tuple[Pruner, dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    pruner = Pruner(model, Schedule(0, 20, 5), PruningOptions(target_sparsity=0.5, pattern="4x1"))
    pruner.step = step
    pruner.prune(0.3)
    return pruner, pruner.state_dict()


def _fresh() -> Pruner:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    return Pruner(model, Schedule(0, 20, 5), PruningOptions(target_sparsity=0.5, pattern="4x1"))


def _tampered(edit: Any) -> dict[str, Any]:
    _, state = _pruner()
    edit(state)
    return state


@pytest.mark.parametrize(
    ("edit", "parts"),
    [
        (
            lambda s: s["masks"].update({"0": torch.ones(1, 16, dtype=torch.bool)}),
            ("'0'", "(1, 16)", "(32, 16)"),
        ),
        (lambda s: s["masks"].update({"0": torch.ones(32, 16)}), ("'0'", "float32", "bool")),
        (lambda s: s.update(step=3), ("step=3", "event at step 10")),
        (lambda s: s.update(version=99), ("version=99", "supported")),
        (lambda s: s.pop("events"), ("'events'", "missing")),
        (lambda s: s["masks"].pop("2"), ("targets differ", "'2'")),
        (lambda s: s.update(step=-1), ("step=-1",)),
    ],
    ids=[
        "broadcastable shape",
        "dtype",
        "step behind events",
        "version",
        "missing key",
        "missing layer",
        "negative step",
    ],
)
def test_tampered_or_foreign_state_is_refused_naming_the_layer_or_key(
    edit: Any, parts: tuple[str, ...]
) -> None:
    pruner = _fresh()
    masks_before = [m.clone() for m in pruner.masks]
    with pytest.raises(ValueError, match=".*".join(re.escape(p) for p in parts)):
        pruner.load_state_dict(_tampered(edit))
    assert all(torch.equal(a, b) for a, b in zip(masks_before, pruner.masks, strict=True)), "nothing applied"


@pytest.mark.slow
def test_state_saved_before_a_checkpoint_step_it_cannot_have_reached_is_refused(tmp_path: Path) -> None:
    fit(tmp_path / "a", max_epochs=2)
    checkpoint = tmp_path / "a" / "epoch=1.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    (key,) = [k for k in saved["callbacks"] if k.startswith("PruningCallback")]
    saved["callbacks"][key]["step"] = 25  # more steps than the trainer took (20)
    torch.save(saved, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match=r"step=25.*global_step 20"):
        fit(tmp_path / "b", max_epochs=4, ckpt_path=tmp_path / "tampered.ckpt")


# --------------------------------------------------------------------------- 6. NaN in pruned weights
class WritesNaN(torch.optim.SGD):
    """An optimizer whose step leaves NaN in the whole first weight, as a diverging update would."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        result = super().step(closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pruned_weights_are_exact_zeros_after_a_step_that_wrote_nan(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4)).to(dtype)
    pruner = Pruner(
        model, Schedule(1, 1), PruningOptions(target_sparsity=0.5, pattern="1x1", skip_last_layer=False)
    )
    optimizer = WritesNaN(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    for _ in range(3):
        model(torch.randn(4, 16, dtype=dtype)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    weight, mask = model[0].weight.detach(), pruner.masks[0]
    assert (~mask).sum() > 0
    assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))
    assert not weight[~mask].signbit().any(), "+0.0, not -0.0"
    assert weight[mask].isnan().all(), "kept weights are left as the optimizer wrote them"


# --------------------------------------------------------------------------- obscure edges
def test_a_fit_without_training_batches_does_not_fail() -> None:
    pruning = PruningCallback(verbose=False)
    trainer = make_trainer([pruning], max_epochs=1, limit_train_batches=0)
    trainer.fit(TinyModule(), tiny_loader())
    assert trainer.global_step == 0 and pruning.pruner is None


class TwoOptimizers(pl.LightningModule):
    """Manual optimization stepping two optimizers per batch, as GAN training does."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.b = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.b(self.a(x)), y))
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.a.parameters(), 1e-2), torch.optim.Adam(self.b.parameters(), 1e-2)


@pytest.mark.slow
def test_default_window_under_manual_optimization_counts_every_optimizer() -> None:
    pruning = PruningCallback(target_sparsity=0.8, pattern="1x1", verbose=False)
    trainer = make_trainer([pruning], max_epochs=2)
    trainer.fit(TwoOptimizers(), tiny_loader(batches=10))
    assert trainer.global_step == 40
    assert pruning.pruner.schedule.end_step == 36, "9/10 of the 40 optimizer steps, not of 20 batches"
    assert zero_fraction(pruned_weights(pruning)) == pytest.approx(0.8, abs=0.01)


def test_manual_optimization_that_steps_less_than_assumed_is_told() -> None:
    class StepsOneOfTwo(TwoOptimizers):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            opt_a, _ = self.optimizers()  # type: ignore[misc]
            opt_a.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self.b(self.a(x)), y))
            opt_a.step()

    pruning = PruningCallback(target_sparsity=0.8, pattern="1x1", verbose=False)
    with pytest.warns(UserWarning, match=r"2 optimizer steps per batch.*1 in the first batch.*int"):
        make_trainer([pruning], max_epochs=1).fit(StepsOneOfTwo(), tiny_loader(batches=10))


def test_numpy_integers_are_accepted_where_ints_are() -> None:
    np = pytest.importorskip("numpy")
    pruning = PruningCallback(
        start_step=np.int64(0), end_step=np.int64(6), frequency=np.int32(2), verbose=False
    )
    make_trainer([pruning], max_steps=8).fit(TinyModule(), tiny_loader())
    assert [e.step for e in pruning.pruner.events] == [2, 4, 6]


def test_unquoted_n_m_read_as_text_gets_the_base_60_hint() -> None:
    # OmegaConf (from_config, Hydra) turns YAML's base-60 124 into the string '124' for a str field.
    from omegaconf import OmegaConf

    config = OmegaConf.create("pattern: 2:4\ntarget_sparsity: 0.5")
    with pytest.raises(ValueError, match=r"pattern=124.*quote it.*\"2:4\""):
        PruningCallback.from_config(config)


def test_monitor_typo_fails_at_the_sanity_check() -> None:
    trainer = make_trainer(
        [PruningCallback(monitor="val_ac", verbose=False)],
        max_epochs=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
    )
    with pytest.raises(ValueError, match=r"monitor=\['val_ac'\].*did you mean 'val_acc'"):
        trainer.fit(TinyModule(), tiny_loader(), tiny_loader(seed=1))
    assert trainer.global_step == 0, "refused before any training step"


def _user_cli(args: list[str]) -> Any:
    from lightning.pytorch.cli import LightningCLI

    from lightning_prune.demo import DigitsClassifier, DigitsDataModule

    return LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        run=False,
        save_config_callback=None,
        args=[*args, "--trainer.logger=false"],
    )


def test_unquoted_n_m_in_a_lightning_cli_yaml_gets_the_base_60_hint(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_prune.PruningCallback\n"
        "      init_args: {target_sparsity: 0.5, pattern: 2:4}\n"
    )
    with pytest.raises(ValueError, match=r"pattern=124.*quote it.*\"2:4\""):
        _user_cli(["--config", str(config)])


def test_a_single_regex_is_accepted_from_python_the_cli_and_a_config_alike() -> None:
    cli = _user_cli(
        ["--trainer.callbacks+=lightning_prune.PruningCallback", "--trainer.callbacks.include=net.1"]
    )
    (from_cli,) = [c for c in cli.trainer.callbacks if isinstance(c, PruningCallback)]
    from_python = PruningCallback(include="net.1")
    from_config = PruningCallback.from_config({"include": "net.1"})
    assert from_cli.options.include == from_python.options.include == from_config.options.include
    assert [r.pattern for r in from_python.options.include] == ["net.1"]


def test_a_plain_loop_that_ends_before_the_schedule_says_so_when_detached() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    pruner = Pruner(model, Schedule(0, 50, 10), PruningOptions(target_sparsity=0.5, pattern="1x1"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    for _ in range(23):
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with pytest.warns(UserWarning, match=r"stopped at step 23 with 2 of the schedule's 5 events.*step 50"):
        pruner.detach()

"""Rewinding (lottery ticket, weight rewinding, resampling): every event puts the kept weights back to
the same saved values, across resumes; and what Lightning's ModelPruning does instead."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, fit_resumable, make_trainer, tiny_loader
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_prune import Pruner, PruningCallback, PruningOptions, Schedule


def _train(model: nn.Module, pruner: Pruner, steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``steps`` SGD steps; the targets' weights and masks right after every event."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner.attach(optimizer)
    after_events = []
    for _ in range(steps):
        events = len(pruner.events)
        model(torch.randn(8, 16)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if len(pruner.events) > events:
            after_events.append(
                [
                    (t.param.detach().clone(), m.clone())
                    for t, m in zip(pruner.targets, pruner.masks, strict=True)
                ]
            )
    return after_events


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("rewind", [0, 3])
def test_every_event_puts_the_kept_weights_back_to_the_same_step(rewind: int) -> None:
    model = _model()
    options = PruningOptions(target_sparsity=0.6, pattern="1x1", rewind=rewind)
    pruner = Pruner(model, Schedule(start_step=0, end_step=9, frequency=3), options)
    reference = _model()  # a twin trained `rewind` steps on the same batches: the weights to expect
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    torch.manual_seed(1)
    for _ in range(rewind):
        reference(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    expected = [reference[0].weight.detach().clone(), reference[2].weight.detach().clone()]
    torch.manual_seed(1)
    after_events = _train(model, pruner, 12)
    assert len(after_events) == 3, "events at steps 3, 6, 9"
    for weights in after_events:  # every rewind restores the same values, not the trained ones
        for (weight, mask), want in zip(weights, expected, strict=True):
            assert torch.equal(weight[mask], want[mask])
            assert not weight[~mask].any()


@pytest.mark.parametrize(("events", "rewound"), [("first", [0]), ("last", [2]), ("every", [0, 1, 2])])
def test_rewind_events_choose_which_events_rewind(events: str, rewound: list[int]) -> None:
    model = _model()
    initial = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    options = PruningOptions(target_sparsity=0.6, pattern="1x1", rewind=0, rewind_events=events)
    after_events = _train(model, Pruner(model, Schedule(start_step=0, end_step=9, frequency=3), options), 12)
    at_initial = [
        all(torch.equal(w[m], i[m]) for (w, m), i in zip(weights, initial, strict=True))
        for weights in after_events
    ]
    assert [index for index, back in enumerate(at_initial) if back] == rewound


def test_rewinding_after_the_first_event_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rewind=5 comes after the first pruning event \(step 3\)"):
        Pruner(_model(), Schedule(0, 9, 3), PruningOptions(rewind=5))


def test_resample_draws_new_weights_at_every_event() -> None:
    model = _model()
    initial = model[0].weight.detach().clone()
    pruner = Pruner(model, Schedule(0, 6, 3), PruningOptions(pattern="1x1", rewind=0, rewind_resample=True))
    after_events = _train(model, pruner, 6)
    (first, _), (second, kept) = (weights[0] for weights in after_events)
    assert not torch.equal(first[kept], initial[kept]) and not torch.equal(second[kept], first[kept])
    bound = 1 / 16**0.5  # nn.Linear's reset_parameters draws U(-1/sqrt(in), 1/sqrt(in))
    assert second.abs().max() <= bound


def test_resample_needs_layers_that_can_reset() -> None:
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

    model = nn.Sequential(Bare(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"reset_parameters.*\['0'\]"):
        Pruner(model, Schedule(1, 1), PruningOptions(op_types=["Bare"], rewind=0, rewind_resample=True))


@pytest.mark.slow
def test_a_rewinding_run_resumes_exactly(tmp_path: Path) -> None:
    settings = {"rewind": 0, "end_step": 30, "frequency": 10}
    straight, _, _ = fit_resumable(tmp_path / "straight", max_epochs=4, **settings)
    fit_resumable(tmp_path / "stopped", max_epochs=2, **settings)  # events 10, 20 done; 30 to come
    resumed, _, _ = fit_resumable(
        tmp_path / "resumed", max_epochs=4, ckpt_path=tmp_path / "stopped" / "epoch=1.ckpt", **settings
    )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_modelpruning_rewinds_only_at_its_first_event() -> None:
    # Lightning 2.6's ModelPruning assigns the saved tensor to weight_orig.data, so the two share
    # storage: training then moves the "original" too, and later rewinds restore the current values.
    pl.seed_everything(0)
    model = TinyModule()
    initial = model.net[0].weight.detach().clone()
    seen: list[torch.Tensor] = []

    class AfterPruning(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append(pl_module.net[0].weight_orig.detach().clone())

    pruning = ModelPruning("l1_unstructured", amount=0.3, use_lottery_ticket_hypothesis=True, verbose=0)
    make_trainer([pruning, AfterPruning()], max_epochs=2).fit(model, tiny_loader())
    first, second = seen
    assert torch.equal(first, initial), "the first event rewinds to the initial weights"
    assert not torch.equal(second, initial), "the second does not: the saved copy trained along"


def test_our_callback_rewinds_at_every_event_where_modelpruning_does_not() -> None:
    pl.seed_everything(0)
    model = TinyModule()
    initial = model.net[0].weight.detach().clone()
    seen: list[torch.Tensor] = []

    class AfterEvents(pl.Callback):
        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object
        ) -> None:
            if trainer.global_step in (10, 20):
                seen.append(pl_module.net[0].weight.detach().clone())

    pruning = PruningCallback(
        target_sparsity=0.5, pattern="1x1", start_step=0, end_step=20, frequency=10, rewind=0, verbose=False
    )
    make_trainer([pruning, AfterEvents()], max_epochs=2).fit(model, tiny_loader())
    mask = pruning.pruner.masks[0]
    for weight in seen:
        assert torch.equal(weight[mask], initial[mask])

"""Exact resume: stopped mid-schedule and resumed from the checkpoint equals never stopping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SCHEDULE, TinyModule, fit_resumable, make_trainer, pruning_state, tiny_loader

from lightning_prune import PruningCallback


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(tmp_path: Path) -> None:
    straight_model, straight, _ = fit_resumable(tmp_path / "straight", max_epochs=4)
    # Stop after 2 epochs = step 20: events 5..20 done, 25 and 30 still to come.
    fit_resumable(tmp_path / "stopped", max_epochs=2)
    checkpoint = tmp_path / "stopped" / "epoch=1.ckpt"
    state = pruning_state(checkpoint)
    assert state["step"] == 20 and [e["step"] for e in state["events"]] == [5, 10, 15, 20]

    resumed_model, resumed, _ = fit_resumable(tmp_path / "resumed", max_epochs=4, ckpt_path=str(checkpoint))
    assert straight is not None and resumed is not None

    assert resumed.pruner.step == straight.pruner.step == 40
    assert [e.step for e in resumed.pruner.events] == [5, 10, 15, 20, 25, 30]
    assert resumed.pruner.events == straight.pruner.events
    for a, b in zip(straight.pruner.masks, resumed.pruner.masks, strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_resume_restores_masks_that_weights_alone_cannot_tell(tmp_path: Path) -> None:
    fit_resumable(tmp_path / "stopped", max_epochs=2)
    pruning = PruningCallback(**SCHEDULE, verbose=False)
    trainer = make_trainer([pruning], max_epochs=2)  # nothing left to train: only restore
    trainer.fit(TinyModule(), tiny_loader(batches=10), ckpt_path=str(tmp_path / "stopped" / "epoch=1.ckpt"))
    state = pruning_state(tmp_path / "stopped" / "epoch=1.ckpt")
    for name, mask in zip([t.name for t in pruning.pruner.targets], pruning.pruner.masks, strict=True):
        assert torch.equal(mask, state["masks"][name])


def test_resume_with_other_targets_is_refused(tmp_path: Path) -> None:
    fit_resumable(tmp_path / "stopped", max_epochs=1)
    pruning = PruningCallback(**{**SCHEDULE, "exclude": ["net.2"]}, verbose=False)
    trainer = make_trainer([pruning], max_epochs=2)
    with pytest.raises(ValueError, match=r"targets differ.*net\.2"):
        trainer.fit(
            TinyModule(), tiny_loader(batches=10), ckpt_path=str(tmp_path / "stopped" / "epoch=0.ckpt")
        )

"""Per-layer allocation (ERK), regrowth inside the pruning window and the schedule's initial share."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from helpers import TinyModule, fit_resumable, make_trainer, pruning_state, tiny_loader
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_prune import PruningCallback, PruningConfig, PruningOptions, Schedule
from lightning_prune.allocation import erk_sparsities
from lightning_prune.pruner import Pruner
from lightning_prune.regrowth import regrow_groups, share_at
from lightning_prune.thresholds import LayerGroups

# ------------------------------------------------------------------------------------------ ERK


def test_erk_reaches_the_target_and_prunes_large_layers_harder() -> None:
    shapes = [(32, 16), (256, 256), (64, 256, 3, 3)]
    shares = erk_sparsities(shapes, 0.9)
    sizes = [torch.Size(s).numel() for s in shapes]
    assert sum(s * n for s, n in zip(shares, sizes, strict=True)) / sum(sizes) == pytest.approx(0.9, abs=1e-9)
    # density proportional to sum(shape) / prod(shape): the small first layer is kept densest
    assert shares[0] < shares[1] < shares[2]
    densities = [1 - s for s in shares]
    ratio = [d * n / sum(shape) for d, n, shape in zip(densities, sizes, shapes, strict=True)]
    assert ratio[1] == pytest.approx(ratio[2], rel=1e-9)  # neither is clamped: the same factor


def test_erk_clamps_to_the_bounds_and_passes_the_share_on() -> None:
    # a tiny layer would get a density above 1: it stays dense (min 0) and the big one takes the rest
    shares = erk_sparsities([(4, 4), (1000, 1000)], 0.9, 0.0, 0.98)
    assert shares[0] == 0.0
    total = 16 + 1_000_000
    assert (shares[1] * 1_000_000) / total == pytest.approx(0.9, abs=1e-9)
    # the upper bound holds (unbounded, the big layer would get 0.908): the small one takes the rest
    capped = erk_sparsities([(100, 100), (1000, 1000)], 0.9, 0.0, 0.905)
    assert (
        capped[1] == pytest.approx(0.905) and capped[0] > erk_sparsities([(100, 100), (1000, 1000)], 0.9)[0]
    )


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=6),
    low=st.floats(0.05, 0.9),
    rise=st.floats(0.0, 0.09),
)
def test_erk_shares_only_rise_with_the_target(shapes: list[tuple[int, int]], low: float, rise: float) -> None:
    # masks only grow from event to event: no layer's share may fall as the event's target rises
    before = erk_sparsities(shapes, low, 0.0, 0.98)
    after = erk_sparsities(shapes, low + rise, 0.0, 0.98)
    assert all(b <= a + 1e-9 for b, a in zip(before, after, strict=True))
    assert all(0.0 <= a <= 0.98 + 1e-9 for a in after)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))


def test_pruner_with_erk_gives_each_layer_its_erk_share() -> None:
    model = _mlp()
    options = PruningOptions(target_sparsity=0.8, pattern="1x1", allocation="erk", skip_last_layer=True)
    pruner = Pruner(model, Schedule(0, 0), options)
    pruner.prune_if_due()
    shares = erk_sparsities([(64, 8), (256, 64)], 0.8, 0.0, 0.98)
    layers = pruner.layer_sparsity()
    for share, name in zip(shares, ["0", "2"], strict=True):
        assert layers[name] == pytest.approx(share, abs=1 / 64 / 8)
    assert pruner.sparsity == pytest.approx(0.8, abs=1e-3)
    # global magnitude ranking (the default) puts layers elsewhere on this freshly initialised net
    plain = Pruner(_mlp(), Schedule(0, 0), PruningOptions(target_sparsity=0.8, pattern="1x1"))
    plain.prune_if_due()
    assert abs(plain.layer_sparsity()["0"] - layers["0"]) > 0.05


def test_erk_with_row_scope_prunes_every_row_to_its_layer_share() -> None:
    pruner = Pruner(_mlp(), Schedule(0, 0), PruningOptions(0.75, "1x1", scope="row", allocation="erk"))
    pruner.prune_if_due()
    share = erk_sparsities([(64, 8), (256, 64)], 0.75, 0.0, 0.98)
    per_row = (~pruner.masks[1]).sum(dim=1)
    assert torch.all(per_row == round(share[1] * 64))


# ------------------------------------------------------------------------------------------ regrowth


def test_regrow_swaps_the_largest_gradients_in_for_the_lowest_live_scores() -> None:
    costs = torch.tensor([float("-inf"), float("-inf"), 0.1, 0.5, 0.2, 0.9, 0.3, 0.7])
    selected = torch.tensor([True, True, True, False, False, False, False, False])  # 5 live
    gradient = torch.tensor([0.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    (new,), revived = regrow_groups([LayerGroups(costs, 1, 8)], [selected], [gradient], 0.4)
    # k = floor(0.4 * 5) = 2 growable (gradient > 0): groups 1 and 2 come back; 4 and 6 go
    assert revived == 2
    assert new.tolist() == [True, False, False, False, True, False, True, False]
    assert int(new.sum()) == int(selected.sum())


def test_regrow_leaves_a_layer_without_gradient_alone() -> None:
    costs, selected = torch.arange(6.0), torch.tensor([True, True, False, False, False, False])
    (new,), revived = regrow_groups([LayerGroups(costs, 1, 6)], [selected], [None], 0.5)
    assert revived == 0 and torch.equal(new, selected)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(2, 40),
    pruned=st.floats(0.0, 1.0),
    share=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_regrow_keeps_each_layers_count_and_revives_only_pruned_groups(
    size: int, pruned: float, share: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    costs = torch.randint(0, 5, (size,), generator=generator).float()  # ties on purpose
    selected = torch.rand(size, generator=generator) < pruned
    gradient = torch.randint(0, 4, (size,), generator=generator).float()
    (new,), revived = regrow_groups([LayerGroups(costs, 1, size)], [selected], [gradient], share)
    assert int(new.sum()) == int(selected.sum())  # the layer's sparsity holds
    grown = selected & ~new
    dropped = new & ~selected
    assert int(grown.sum()) == int(dropped.sum()) == revived
    live = int((~selected).sum())
    assert revived <= int(share * live)
    if revived:
        # every revived group's gradient is positive and at least that of every pruned group left
        assert bool((gradient[grown] > 0).all())
        left = gradient[selected & new]
        assert float(gradient[grown].min()) >= (float(left.max()) if left.numel() else 0.0)
        # every dropped group scores at most what every live group kept scores
        kept = costs[~selected & ~new]
        assert float(costs[dropped].max()) <= (float(kept.min()) if kept.numel() else float("inf"))


def test_share_decays_along_the_window_and_stops_at_its_end() -> None:
    assert share_at(0.4, 0.0) == pytest.approx(0.4)
    assert share_at(0.4, 0.5) == pytest.approx(0.2)
    assert share_at(0.4, 1.0) == 0.0
    assert share_at(0.0, 0.2) == 0.0


def _train(regrow: float, steps: int = 60) -> tuple[Pruner, list[torch.Tensor]]:
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = Pruner(model, Schedule(0, 40, 10), PruningOptions(0.8, "1x1", regrow=regrow))
    pruner.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 10 == 0:
            history.append(torch.cat([m.flatten() for m in pruner.masks]).clone())
    pruner.detach()
    return pruner, history


@pytest.mark.slow
def test_pruner_regrowth_revives_weights_before_the_last_event_only() -> None:
    pruner, masks = _train(0.3)
    assert pruner.sparsity == pytest.approx(0.8, abs=1e-3)
    assert [e.step for e in pruner.events] == [10, 20, 30, 40]
    # between events before the last, some pruned weight came back
    revived = [int((~before & after).sum()) for before, after in itertools.pairwise(masks[:4])]
    assert revived[0] > 0 and revived[1] > 0
    # the last event (step 40) only grows the masks' zeros, and nothing changes after it
    assert int((~masks[2] & masks[3]).sum()) == 0
    assert torch.equal(masks[3], masks[5])
    # without regrowth masks only grow at every event
    _, plain = _train(0.0)
    assert all(int((~a & b).sum()) == 0 for a, b in itertools.pairwise(plain))


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"allocation": "owl"}, r"allocation='owl' is not one of \['scope', 'erk'\]"),
        ({"allocation": "erk", "pattern": "head"}, r"allocation='erk'.*use allocation='scope'"),
        ({"regrow": 1.0}, r"regrow=1.0 is outside \[0, 1\)"),
        ({"regrow": "some"}, r"regrow='some' must be a number"),
        ({"regrow": 0.3, "pattern": "2:4", "target_sparsity": 0.5}, r"regrow=0.3.*'2:4'.*regrow=0"),
        ({"regrow": 0.3, "scope": "row", "pattern": "1x1"}, r"regrow=0.3.*scope='row'"),
        ({"regrow": 0.3, "progressive": True}, r"regrow=0.3.*progressive"),
    ],
)
def test_bad_values_are_refused_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningCallback(**kwargs)  # type: ignore[arg-type]


def test_initial_sparsity_is_checked() -> None:
    with pytest.raises(ValueError, match=r"initial_sparsity=0.95 is above target_sparsity=0.9"):
        PruningCallback(initial_sparsity=0.95)
    with pytest.raises(ValueError, match=r"initial_sparsity=-0.1 is outside"):
        PruningCallback(initial_sparsity=-0.1)


def test_new_options_go_through_configs() -> None:
    callback = PruningCallback.from_config(
        PruningConfig(allocation="erk", regrow=0.25, initial_sparsity=0.5, pattern="1x1")
    )
    assert callback.options.allocation == "erk" and callback.options.regrow == 0.25
    assert callback.initial_sparsity == 0.5
    # recorded for resume only when set: checkpoints from before these options still compare equal
    assert "regrow" not in PruningOptions().settings() and "allocation" not in PruningOptions().settings()
    assert callback.options.settings()["regrow"] == "0.25"


@pytest.mark.slow
def test_initial_sparsity_prunes_its_share_before_the_first_step() -> None:
    callback = PruningCallback(
        target_sparsity=0.8, pattern="4x1", initial_sparsity=0.5, start_step=0, end_step=20, frequency=5,
        verbose=False, save_report=False,
    )  # fmt: skip
    make_trainer([callback], max_steps=20).fit(TinyModule(), tiny_loader(batches=10))
    assert callback.pruner is not None
    events = callback.pruner.events
    assert events[0].step == 0 and events[0].target_sparsity == pytest.approx(0.5)
    assert [e.step for e in events] == [0, 5, 10, 15, 20] and events[-1].target_sparsity == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resumed_regrowth_run_matches_uninterrupted_run(tmp_path: Path) -> None:
    options = {"pattern": "1x1", "regrow": 0.3, "allocation": "erk"}
    straight_model, straight, _ = fit_resumable(tmp_path / "straight", max_epochs=4, **options)
    fit_resumable(tmp_path / "stopped", max_epochs=2, **options)
    checkpoint = tmp_path / "stopped" / "epoch=1.ckpt"
    assert pruning_state(checkpoint)["options"]["regrow"] == "0.3"
    resumed_model, resumed, _ = fit_resumable(
        tmp_path / "resumed", max_epochs=4, ckpt_path=checkpoint, **options
    )
    assert straight is not None and resumed is not None
    assert resumed.pruner.events == straight.pruner.events
    for a, b in zip(straight.pruner.masks, resumed.pruner.masks, strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # a resume without regrowth is refused, naming the setting
    with pytest.raises(ValueError, match=r"regrow: checkpoint 0.3, this run \(none\)"):
        fit_resumable(tmp_path / "other", max_epochs=4, ckpt_path=checkpoint, pattern="1x1", allocation="erk")

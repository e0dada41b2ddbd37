"""Progressive pruning: the fade plan's stages, interval masks, the Pruner's fade, Lightning and resume.

Expectations come from the definition in ``progressive.py``'s docstring (stage ``1..steps`` per newly
pruned weight, zero once the fade position reaches it, evenly spread, lowest score or earliest
position first) and from hand-worked examples. The Pruner tests compare against a non-progressive
Pruner on a loss whose gradient is constant, so every weight evolves on its own and the two runs must
agree on every mask once a fade has ended.
"""

from __future__ import annotations

import itertools
from pathlib import Path

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
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_prune import PruningCallback
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.progressive import KEEP, Progressive, interval_mask, plan_fade
from lightning_prune.pruner import Pruner
from lightning_prune.schedules import Schedule

SETTINGS = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------------------- plan_fade by hand
def test_plan_fade_hand_example_scores_and_linear() -> None:
    # "4x1" on a (4, 3) weight: each column is one block of 4 rows, position = row.
    pattern = parse_pattern("4x1")
    scores = torch.tensor([[3.0, 9.0, 5.0], [1.0, 8.0, 6.0], [2.0, 7.0, 7.0], [0.0, 6.0, 8.0]])
    old_keep = torch.tensor([[True, True, False]] * 4)  # column 2 pruned earlier
    new_keep = torch.tensor([[False, True, False]] * 4)  # column 0 pruned now
    masked = scores.masked_fill(~old_keep, float("-inf"))

    stage = plan_fade(pattern, old_keep, new_keep, masked, Progressive(steps=4, kind="scores"))
    assert stage.dtype == torch.uint8
    # Column 0 scores [3, 1, 2, 0]: lowest first -> stages [4, 2, 3, 1].
    assert stage[:, 0].tolist() == [4, 2, 3, 1]
    assert stage[:, 1].tolist() == [KEEP] * 4
    assert stage[:, 2].tolist() == [0] * 4

    linear = plan_fade(pattern, old_keep, new_keep, masked, Progressive(steps=4, kind="linear"))
    assert linear[:, 0].tolist() == [1, 2, 3, 4]

    # Two stages for four weights: the two lowest go first.
    two = plan_fade(pattern, old_keep, new_keep, masked, Progressive(steps=2, kind="scores"))
    assert two[:, 0].tolist() == [2, 1, 2, 1]
    # More stages than weights: each weight its own stage, first one at stage 1.
    eight = plan_fade(pattern, old_keep, new_keep, masked, Progressive(steps=8, kind="linear"))
    col = eight[:, 0].tolist()
    assert col[0] == 1 and len(set(col)) == 4 and col == sorted(col) and max(col) <= 8


def test_interval_mask_writes_stage_above_position() -> None:
    stage = torch.tensor([0, 1, 2, 3, KEEP], dtype=torch.uint8)
    out = torch.empty(5, dtype=torch.bool)
    interval_mask(stage, 2, out=out)
    assert out.tolist() == [False, False, False, True, True]


# ---------------------------------------------------------------------------- plan_fade properties
@st.composite
def fade_cases(draw: st.DrawFn) -> tuple[Pattern, Tensor, Tensor, Tensor, Progressive]:
    kind = draw(st.sampled_from(["NxM", "channelx1", "1xchannel", "N:M"]))
    rows_mult = cols_mult = 1
    if kind == "NxM":
        n, m = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        if n == m == 1:
            n = 2
        text, rows_mult, cols_mult = f"{n}x{m}", n, m
    elif kind == "N:M":
        m = draw(st.integers(2, 6))
        n = draw(st.integers(1, m - 1))
        text, cols_mult = f"{n}:{m}", m
    else:
        text = kind
    pattern = parse_pattern(text)
    out = rows_mult * draw(st.integers(1, 3))
    inp = cols_mult * draw(st.integers(1, 3))
    kernel = draw(st.sampled_from([(), (1, 1), (2, 1), (3, 3)]))
    shape = (out, inp, *kernel)

    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        scores = torch.randint(0, 4, shape, generator=generator).float()  # many ties
    else:
        scores = torch.rand(shape, generator=generator)
    group_shape = pattern.group_costs(scores).shape
    old_groups = torch.rand(group_shape, generator=generator) < draw(st.floats(0.0, 0.6))
    more = torch.rand(group_shape, generator=generator) < draw(st.floats(0.0, 1.0))
    old_keep = ~pattern.pruned_elements(old_groups, scores)
    masked = scores.masked_fill(~old_keep, float("-inf"))  # as the Pruner scores pruned weights
    new_keep = ~pattern.pruned_elements(old_groups | more, masked)
    steps = draw(st.integers(1, 9) | st.just(254))
    progressive = Progressive(steps=steps, kind=draw(st.sampled_from(["scores", "linear"])))
    return pattern, old_keep, new_keep, masked, progressive


@SETTINGS
@given(fade_cases())
def test_plan_fade_stages_and_interval_masks(
    case: tuple[Pattern, Tensor, Tensor, Tensor, Progressive],
) -> None:
    pattern, old_keep, new_keep, scores, progressive = case
    steps = progressive.steps
    assert not (new_keep & ~old_keep).any(), "precondition: masks only grow"
    newly = old_keep & ~new_keep

    stage = plan_fade(pattern, old_keep, new_keep, scores, progressive)
    assert stage.dtype == torch.uint8 and stage.shape == old_keep.shape
    assert torch.equal(stage == KEEP, new_keep)
    assert torch.equal(stage == 0, ~old_keep)
    values = stage[newly].long()
    assert ((values >= 1) & (values <= steps)).all()

    previous = old_keep
    for j in range(1, steps + 1):
        interval = stage > j
        assert not (interval & ~previous).any(), f"interval mask {j} is not within the previous one"
        if j == 1:
            assert not (new_keep & ~interval).any(), "the first interval mask must hold the final one"
        previous = interval
    assert torch.equal(previous, new_keep), "the last interval mask must be the structured mask"


@SETTINGS
@given(fade_cases())
def test_plan_fade_spreads_each_group_evenly_in_order(
    case: tuple[Pattern, Tensor, Tensor, Tensor, Progressive],
) -> None:
    pattern, old_keep, new_keep, scores, progressive = case
    steps = progressive.steps
    stage = plan_fade(pattern, old_keep, new_keep, scores, progressive)

    new = pattern.group_view(old_keep & ~new_keep)
    st_ = pattern.group_view(stage).long()
    count = new.sum(dim=-1)
    # Weights per stage in each group: floor or ceil of count / steps.
    hist = nn.functional.one_hot(torch.where(new, st_, 0), steps + 1).sum(dim=-2)[..., 1:]
    low = (count // steps).unsqueeze(-1)
    high = ((count + steps - 1) // steps).unsqueeze(-1)
    assert ((hist >= low) & (hist <= high)).all(), "stages are not spread evenly within a group"
    assert torch.equal(hist.sum(-1), count)

    both = new.unsqueeze(-1) & new.unsqueeze(-2)
    later = st_.unsqueeze(-1) > st_.unsqueeze(-2)  # [a, b]: a goes after b
    if progressive.kind == "scores":
        sc = pattern.group_view(scores)
        lower = sc.unsqueeze(-1) < sc.unsqueeze(-2)  # [a, b]: a scores lower than b
        assert not (both & lower & later).any(), "a lower-scored weight went after a higher one"
    else:
        size = new.shape[-1]
        pos = torch.arange(size)
        before = pos.unsqueeze(-1) < pos.unsqueeze(-2)  # [a, b]: a comes first in the block
        assert not (both & before & later).any(), "stage decreases along the block"


# ---------------------------------------------------------------------------- the Pruner's fade
TARGET = 0.75


def _run(
    progressive: Progressive | None, schedule: Schedule, total_steps: int
) -> tuple[Pruner, list[list[Tensor]], list[list[Tensor]]]:
    """Hand-stepped SGD on a constant gradient; per step: zero sets of the weights and the masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    generator = torch.Generator().manual_seed(1)
    grads = [0.1 * torch.randn(p.shape, generator=generator) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    options = PruningOptions(target_sparsity=TARGET, pattern="4x1", progressive=progressive)
    pruner = Pruner(model, schedule, options)
    pruner.attach(optimizer)
    zeros = [[t.param.detach() == 0 for t in pruner.targets]]  # index = step
    masks = [[m.clone() for m in pruner.masks]]
    for _ in range(total_steps):
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        zeros.append([t.param.detach() == 0 for t in pruner.targets])
        masks.append([m.clone() for m in pruner.masks])
    return pruner, zeros, masks


def _count(sets: list[Tensor]) -> int:
    return sum(int(s.sum()) for s in sets)


def _equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _blocks_whole(zero_sets: list[Tensor]) -> bool:
    return all(
        torch.equal(z.reshape(z.shape[0] // 4, 4, -1).all(1), z.reshape(z.shape[0] // 4, 4, -1).any(1))
        for z in zero_sets
    )


@pytest.mark.parametrize("kind", ["scores", "linear"])
@pytest.mark.parametrize(("frequency", "end"), [(5, 20), (4, 16), (6, 18)])
def test_pruner_fades_each_event_over_its_steps(kind: str, frequency: int, end: int) -> None:
    schedule = Schedule(start_step=0, end_step=end, frequency=frequency, curve="linear")
    total = end + 6
    pruner, zeros, masks = _run(Progressive(steps=4, kind=kind), schedule, total)
    reference, ref_zeros, ref_masks = _run(None, schedule, total)
    numel = sum(m.numel() for m in pruner.masks)

    assert [e.step for e in pruner.events] == schedule.event_steps()
    for t in range(total):
        for before, after in zip(zeros[t], zeros[t + 1], strict=True):
            assert not (before & ~after).any(), f"a zeroed weight came back at step {t + 1}"

    for event, ref_event in zip(pruner.events, reference.events, strict=True):
        e = event.step
        start, final = _count(zeros[e - 1]), _count(ref_zeros[e])
        new_blocks, rest = divmod(final - start, 4)
        assert rest == 0 and new_blocks > 0
        # One weight of every newly pruned 4x1 block per step, event step included.
        assert [_count(zeros[e + j]) for j in range(4)] == [start + (j + 1) * new_blocks for j in range(4)]
        # Then exactly the structured mask the non-progressive run set at once.
        assert _equal(zeros[e + 3], ref_zeros[e]) and _equal(masks[e + 3], ref_masks[e])
        assert _blocks_whole(zeros[e + 3])
        assert event.sparsity == pytest.approx(final / numel, abs=1e-12)
        assert event.sparsity == pytest.approx(ref_event.sparsity, abs=1e-12)
        # Under way, the masks (pruner.sparsity) lag the event's recorded sparsity.
        assert _count(zeros[e]) < final
    assert not pruner.fading
    assert _equal(zeros[-1], ref_zeros[-1])
    assert abs(_count(zeros[-1]) / numel - TARGET) <= 4 / numel


def test_short_last_interval_finishes_previous_fade_then_ends_structured() -> None:
    # Events at 5, 10, 15, 20 and 22: the event at 22 falls inside the fade begun at 20.
    schedule = Schedule(start_step=0, end_step=22, frequency=5, curve="linear")
    total = 28
    pruner, zeros, masks = _run(Progressive(steps=4), schedule, total)
    _, ref_zeros, ref_masks = _run(None, schedule, total)
    numel = sum(m.numel() for m in pruner.masks)

    assert [e.step for e in pruner.events] == [5, 10, 15, 20, 22]
    # At 22 the fade from 20 is complete (all of its blocks zero), the new one only begun.
    for done, now in zip(ref_zeros[21], zeros[22], strict=True):
        assert not (done & ~now).any()
    assert _count(ref_zeros[21]) < _count(zeros[22]) < _count(ref_zeros[22])
    # And the last event still ends in the exact structured mask.
    assert _equal(zeros[25], ref_zeros[25]) and _equal(masks[25], ref_masks[25])
    assert pruner.events[-1].sparsity == pytest.approx(_count(zeros[25]) / numel, abs=1e-12)
    assert abs(_count(zeros[-1]) / numel - TARGET) <= 4 / numel


def _pruner_mid_fade(progressive: Progressive | None) -> tuple[nn.Module, torch.optim.Optimizer, Pruner]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    options = PruningOptions(target_sparsity=TARGET, pattern="4x1", progressive=progressive)
    pruner = Pruner(model, Schedule(start_step=0, end_step=20, frequency=5), options)
    pruner.attach(optimizer)
    return model, optimizer, pruner


def _sgd_steps(model: nn.Module, optimizer: torch.optim.Optimizer, count: int) -> None:
    for _ in range(count):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
        optimizer.step()


def test_state_dict_mid_fade_restores_into_a_fresh_pruner() -> None:
    model, optimizer, pruner = _pruner_mid_fade(Progressive(steps=4))
    _sgd_steps(model, optimizer, 6)  # event at 5: fade position 2 of 4
    state = pruner.state_dict()
    assert state["fade"]["position"] == 2
    final = [stage == KEEP for stage in state["fade"]["stages"].values()]
    model2, optimizer2, pruner2 = _pruner_mid_fade(Progressive(steps=4))
    model2.load_state_dict(model.state_dict())
    pruner2.load_state_dict(state)
    assert pruner2.fading
    _sgd_steps(model2, optimizer2, 2)
    assert not pruner2.fading
    assert _equal(pruner2.masks, final)
    assert [(~m).sum().item() for m in pruner2.masks] == [
        round(pruner2.events[-1].layer_sparsity[t.name] * t.param.numel()) for t in pruner2.targets
    ]


@pytest.mark.parametrize("resumed", [None, Progressive(steps=2)], ids=["off", "steps2"])
def test_resume_mid_fade_with_other_progressive_setting(resumed: Progressive | None) -> None:
    model, optimizer, pruner = _pruner_mid_fade(Progressive(steps=4))
    _sgd_steps(model, optimizer, 6)
    state = pruner.state_dict()
    final = [(stage == KEEP).clone() for stage in state["fade"]["stages"].values()]
    model2, optimizer2, pruner2 = _pruner_mid_fade(resumed)
    model2.load_state_dict(model.state_dict())
    try:
        pruner2.load_state_dict(state)
    except ValueError as error:
        assert "progressive" in str(error)
        return
    _sgd_steps(model2, optimizer2, 3)  # through step 9, before the next event at 10
    assert _equal(pruner2.masks, final)


# ---------------------------------------------------------------------------- bad input
def test_progressive_refuses_unstructured_pattern() -> None:
    with pytest.raises(ValueError, match=r"progressive.*'1x1'"):
        PruningOptions(pattern="1x1", progressive=True)
    with pytest.raises(ValueError, match=r"'1x1'"):
        PruningOptions(pattern="1x1", progressive=Progressive(steps=2))
    with pytest.raises(ValueError, match=r"'1x1'"):
        PruningCallback(pattern="1x1", progressive=True, verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, r"steps=0\b"),
        ({"steps": 255}, r"steps=255"),
        ({"steps": -1}, r"steps=-1"),
        ({"steps": 2.0}, r"steps=2\.0"),
        ({"steps": True}, r"steps=True"),
        ({"kind": "random"}, r"kind='random'"),
    ],
)
def test_progressive_bad_values_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Progressive(**kwargs)  # type: ignore[arg-type]


def test_progressive_limits_accepted() -> None:
    assert Progressive(steps=1).steps == 1 and Progressive(steps=254).steps == 254
    assert PruningOptions(pattern="4x1", progressive=True).progressive == Progressive()
    assert PruningOptions(pattern="4x1", progressive=False).progressive is None
    with pytest.raises(ValueError, match=r"progressive='yes'"):
        PruningOptions(pattern="4x1", progressive="yes")  # type: ignore[arg-type]


def test_pruner_refuses_steps_above_frequency() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    options = PruningOptions(target_sparsity=0.5, pattern="4x1", progressive=Progressive(steps=4))
    with pytest.raises(ValueError, match=r"steps=4.*frequency=3"):
        Pruner(model, Schedule(start_step=0, end_step=12, frequency=3), options)
    Pruner(model, Schedule(start_step=0, end_step=12, frequency=4), options)  # equal is fine


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"progressive": Progressive(steps=6), "frequency": 5}, r"steps=6.*frequency=5"),
        ({"progressive": Progressive(steps=4)}, r"steps=4.*frequency=1"),  # default frequency: 20 // 20 = 1
    ],
)
def test_callback_refuses_steps_above_frequency_at_fit_start(kwargs: dict[str, object], message: str) -> None:
    pl.seed_everything(0)
    model = TinyModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = PruningCallback(pattern="4x1", start_step=0, end_step=20, verbose=False, **kwargs)  # type: ignore[arg-type]
    trainer = make_trainer([pruning], max_epochs=3)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, tiny_loader())
    assert trainer.global_step == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed before the error"


# ---------------------------------------------------------------------------- Lightning
class ZeroWatcher(pl.Callback):
    """After every batch, the zero fraction of the pruned weights, by optimizer step."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.zeros: dict[int, float] = {}
        self.sets: dict[int, list[Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        assert self.pruning.pruner is not None
        weights = pruned_weights(self.pruning)
        self.zeros[self.pruning.pruner.step] = zero_fraction(weights)
        self.sets[self.pruning.pruner.step] = [w == 0 for w in weights]


@pytest.mark.slow
def test_callback_two_four_progressive_ends_exactly_two_of_four() -> None:
    pl.seed_everything(0)
    model = TinyModule()
    pruning = PruningCallback(
        pattern="2:4",
        target_sparsity=0.5,
        progressive=True,
        start_step=0,
        end_step=20,
        frequency=5,
        verbose=False,
    )
    watcher = ZeroWatcher(pruning)
    trainer = make_trainer([pruning, watcher], max_epochs=3)
    trainer.fit(model, tiny_loader())

    assert [e.step for e in pruning.pruner.events] == [5, 10, 15, 20]
    for target in pruning.pruner.targets:
        w = target.param.detach()
        zeros_per_group = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert (zeros_per_group == 2).all(), target.name
    assert not (model.net[4].weight == 0).any()
    steps = sorted(watcher.sets)
    for a, b in itertools.pairwise(steps):
        for x, y in zip(watcher.sets[a], watcher.sets[b], strict=True):
            assert not (x & ~y).any(), f"a zero came back between steps {a} and {b}"
    for event in pruning.pruner.events:
        e = event.step
        # The fade is gradual under Lightning too: below the event's sparsity at its own step,
        # at it 3 steps later.
        assert watcher.zeros[e - 1] < watcher.zeros[e] < event.sparsity
        assert watcher.zeros[e + 3] == pytest.approx(event.sparsity, abs=1e-12)
    assert watcher.zeros[30] == pytest.approx(0.5, abs=1e-12)


#: The resume test's fade: with 10 batches an epoch, events at steps 8, 16, 24, each eased in over 4 steps.
FADE = {"end_step": 24, "frequency": 8, "progressive": Progressive(steps=4)}


@pytest.mark.slow
def test_resume_from_mid_fade_checkpoint_matches_uninterrupted_run(tmp_path: Path) -> None:
    straight_model, straight, _ = fit_resumable(tmp_path / "straight", max_epochs=3, **FADE)
    # 10 batches per epoch; events at 8, 16, 24 with a 4-step fade: step 10 is the fade's 3rd step.
    fit_resumable(tmp_path / "stopped", max_epochs=1, **FADE)
    checkpoint = tmp_path / "stopped" / "epoch=0.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    state = pruning_state(checkpoint)
    assert state["step"] == 10 and [e["step"] for e in state["events"]] == [8]
    assert state["fade"] is not None and state["fade"]["position"] == 3
    saved_weights = [saved["state_dict"][f"{name}.weight"] for name in state["masks"]]
    saved_zeros = sum(int((w == 0).sum()) for w in saved_weights) / sum(w.numel() for w in saved_weights)
    assert saved_zeros < state["events"][0]["sparsity"], "the checkpoint must fall inside the fade"

    resumed_model, resumed, _ = fit_resumable(
        tmp_path / "resumed", max_epochs=3, ckpt_path=str(checkpoint), **FADE
    )
    assert straight is not None and resumed is not None

    assert resumed.pruner.step == straight.pruner.step == 30
    assert resumed.pruner.events == straight.pruner.events
    assert not resumed.pruner.fading
    for a, b in zip(straight.pruner.masks, resumed.pruner.masks, strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert zero_fraction(pruned_weights(resumed)) == pytest.approx(0.8, abs=4 / 1536)


def test_default_fade_length_shortens_to_the_frequency() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    options = PruningOptions(target_sparsity=0.5, pattern="4x1", progressive=True)
    assert Pruner(
        model, Schedule(start_step=0, end_step=12, frequency=2), options
    ).progressive == Progressive(2)
    assert Pruner(
        model, Schedule(start_step=0, end_step=40, frequency=10), options
    ).progressive == Progressive(4)
    assert Pruner(model, Schedule(start_step=5, end_step=5), options).progressive == Progressive(4)

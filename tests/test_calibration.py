"""One-shot pruning from calibration data: the criterion seams (check_options, reconstructs),
Wanda's statistics and comparison groups, and the calibration entry points."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_prune import Pruner, PruningOptions, Schedule, prune_once
from lightning_prune.criteria import Criterion


class RefusesBlocks(Criterion):
    """A user's criterion that serves only unstructured pruning."""

    name = "refuses_blocks_test"

    def check_options(self, options: PruningOptions) -> None:
        if str(options.pattern) != "1x1":
            raise ValueError(f"{self.name} pattern={str(options.pattern)!r}: only '1x1' is accepted")

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        return param.detach().abs().float()


def test_a_criterion_refuses_options_it_cannot_serve_when_they_are_built() -> None:
    with pytest.raises(ValueError, match=r"refuses_blocks_test pattern='4x1': only '1x1'"):
        PruningOptions(criterion=RefusesBlocks(), pattern="4x1")
    assert PruningOptions(criterion=RefusesBlocks(), pattern="1x1").pattern.group_size((4, 4)) == 1


# ---------------------------------------------------------------------------- the Pruner's hooks
def test_calibration_sessions_add_up_to_the_statistics_of_all_their_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = Pruner(model, Schedule(0, 0), PruningOptions(criterion="wanda", pattern="1x1"))
    batches = [torch.randn(5, 8) for _ in range(4)]
    for session in (batches[:1], batches[1:]):  # two sessions: the second adds to the first
        with pruner.calibrating(), torch.no_grad():
            for x in session:
                model(x)
    (state,) = pruner.buffers
    expected = torch.cat(batches).square().sum(dim=0)  # sum of squares per input channel
    torch.testing.assert_close(state.view(-1), expected)
    assert pruner.calibration_calls == 4


def test_committed_masks_only_grow_and_are_recorded_as_an_event() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    pruner = Pruner(model, Schedule(0, 0), PruningOptions(pattern="1x1", target_sparsity=0.5))
    pruner.masks[0][0, 0] = False  # pruned earlier
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1] = False  # a whole row now
    event = pruner.commit_masks([keep], 0.5)
    assert (~pruner.masks[0]).sum() == 5 and not pruner.masks[0][0, 0]
    assert torch.equal(model[0].weight == 0, ~pruner.masks[0])
    assert (event.step, event.target_sparsity, event.sparsity) == (0, 0.5, 5 / 16)
    assert event.layer_sparsity == {"0": 5 / 16} and pruner.events == [event]


# ---------------------------------------------------------------------------- Wanda by hand
def wanda_model() -> tuple[nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 2))
    scales = torch.linspace(0.2, 4.0, 8)  # input channels of very different norms
    return model, [torch.randn(5, 8) * scales for _ in range(3)]


def hand_scores(model: nn.Module, batches: list[Tensor]) -> Tensor:
    """|W_ij| * ||X_j||_2 over all calibration inputs of the first layer."""
    return model[0].weight.detach().abs() * torch.cat(batches).norm(dim=0)


def test_wanda_row_scope_prunes_each_rows_lowest_weight_times_input_norm() -> None:
    model, batches = wanda_model()
    scores = hand_scores(model, batches)
    pruner = prune_once(model, batches, criterion="wanda", pattern="1x1", scope="row", target_sparsity=0.5)
    expected = scores <= scores.kthvalue(4, dim=1, keepdim=True).values  # 4 lowest of each row of 8
    assert torch.equal(~pruner.masks[0], expected)
    assert torch.equal(model[0].weight == 0, expected)


def test_wanda_two_four_keeps_the_two_best_of_every_four_inputs() -> None:
    model, batches = wanda_model()
    groups = hand_scores(model, batches).view(12, 2, 4)
    pruner = prune_once(model, batches, criterion="wanda", pattern="2:4", target_sparsity=0.5)
    expected = groups <= groups.kthvalue(2, dim=-1, keepdim=True).values
    assert torch.equal(~pruner.masks[0].view(12, 2, 4), expected)


def test_wanda_local_scope_compares_a_whole_layer() -> None:
    model, batches = wanda_model()
    scores = hand_scores(model, batches)
    pruner = prune_once(model, batches, criterion="wanda", pattern="1x1", scope="local", target_sparsity=0.5)
    assert torch.equal(~pruner.masks[0], scores <= scores.flatten().kthvalue(48).values)
    assert pruner.masks[0].sum(dim=1).tolist() != [4] * 12, "rows end at different sparsities"


# ---------------------------------------------------------------------------- prune_once's contract
def test_prune_once_runs_the_given_number_of_batches_through_forward_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    seen: list[bool] = []

    def forward(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        seen.append(module[1].training)
        return module(batch["inputs"])

    data = [{"inputs": torch.randn(4, 8)} for _ in range(6)]
    pruner = prune_once(model, data, criterion="wanda", pattern="1x1", calibration_batches=4, forward=forward)
    assert seen == [False] * 4 and pruner.calibration_calls == 4
    assert model.training and model[1].training, "every module's own mode comes back"


def test_prune_once_says_when_the_data_has_fewer_batches_than_asked(messages: list[str]) -> None:
    model, batches = wanda_model()
    pruner = prune_once(model, batches, criterion="wanda", pattern="1x1", calibration_batches=10)
    assert pruner.calibration_calls == 3
    assert "lightning_prune: calibrating on the 3 batches there are, fewer than the 10 asked" in messages
    assert any(m.startswith("lightning_prune: wanda: calibrated on 3 batches in ") for m in messages)


def test_sparsegpt_reports_each_layer_with_its_time(messages: list[str]) -> None:
    model, batches = wanda_model()
    prune_once(model, batches, criterion="sparsegpt", pattern="1x1", target_sparsity=0.5)
    (line,) = [m for m in messages if m.startswith("lightning_prune: sparsegpt 1/1 0 (12x8): inputs ")]
    assert " s, solve " in line and line.endswith(" s")


def test_magnitude_needs_no_data_and_gradient_criteria_are_refused() -> None:
    model, _ = wanda_model()
    pruner = prune_once(model, None, pattern="1x1", target_sparsity=0.5)
    assert pruner.sparsity == 0.5 and pruner.events[0].step == 0
    with pytest.raises(
        ValueError, match=r"criterion 'snip' scores from gradients.*prune_once does not compute"
    ):
        prune_once(model, None, criterion="snip")
    with pytest.raises(ValueError, match=r"not both \(got \['pattern'\]\)"):
        prune_once(model, None, PruningOptions(), pattern="1x1")
    with pytest.raises(ValueError, match=r"'wanda' prunes from calibration data, but no calibration batch"):
        prune_once(model, [], criterion="wanda")
    with pytest.raises(ValueError, match=r"calibration_batches=0 must be an int >= 1"):
        prune_once(model, [torch.randn(2, 8)], criterion="wanda", calibration_batches=0)


def test_which_registered_criteria_prune_from_calibration_data() -> None:
    from lightning_prune.criteria import CRITERIA

    calibrating = {name for name in CRITERIA if CRITERIA[name].calibrates}
    assert {"wanda", "sparsegpt"} <= calibrating
    assert not calibrating & {"magnitude", "gradient", "snip", "snip_momentum", "movement"}

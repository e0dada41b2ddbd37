"""SparseGPT: the layer solver against direct least squares, N:M structure, the order layers are
pruned in (each from inputs through the layers already pruned), one Hessian at a time, and the
options it refuses. Expected values come from torch.linalg.lstsq and hand-run steps, not from the
module under test."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import Tensor, nn

from lightning_prune import Pruner, PruningOptions, Schedule, prune_once
from lightning_prune.sparsegpt import SparseGPTCriterion, sparsegpt_prune


def layer_data(out: int = 6, inp: int = 32, tokens: int = 400, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Correlated inputs (tokens, in) in float64 and a weight (out, in)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inp, inp, generator=generator, dtype=torch.float64) * 0.3
    x = torch.randn(tokens, inp, generator=generator, dtype=torch.float64)
    x = x @ mixing + torch.randn(tokens, inp, generator=generator, dtype=torch.float64)
    return x, torch.randn(out, inp, generator=generator, dtype=torch.float64)


def output_error(x: Tensor, weight: Tensor, pruned_weight: Tensor) -> float:
    """Squared error of the layer's outputs on the calibration inputs."""
    return float((x @ weight.T - x @ pruned_weight.double().T).square().sum())


def least_squares(x: Tensor, weight: Tensor, pruned: Tensor) -> Tensor:
    """Per row, the kept weights that best reproduce the layer's outputs (torch.linalg.lstsq)."""
    solution = torch.zeros_like(weight)
    for row in range(weight.shape[0]):
        kept = ~pruned[row]
        solution[row, kept] = torch.linalg.lstsq(x[:, kept], x @ weight[row]).solution
    return solution


@pytest.mark.parametrize("block_size", [32, 8, 5])
def test_a_mask_pruned_ahead_of_what_it_keeps_gets_the_least_squares_weights(block_size: int) -> None:
    # Each row prunes its first 8 + r columns: every pruned weight comes before every kept one in
    # the column order, so each column's update still reaches all the kept weights and the
    # greedy pass is exact: the least-squares solution for that mask, across block boundaries too.
    x, weight = layer_data()
    prune = torch.zeros(weight.shape, dtype=torch.bool)
    for row in range(weight.shape[0]):
        prune[row, : 8 + row] = True
    got, pruned = sparsegpt_prune(
        weight.float(), (x.T @ x).float(), prune=prune, dampening=0.0, block_size=block_size
    )
    assert torch.equal(pruned, prune) and bool((got[prune] == 0).all())
    best = least_squares(x, weight, prune)
    assert output_error(x, weight, got) <= output_error(x, weight, best) * (1 + 1e-4)
    torch.testing.assert_close(got.double(), best, rtol=1e-3, atol=1e-3)


def test_its_own_mask_lands_between_least_squares_and_no_update() -> None:
    x, weight = layer_data()
    got, pruned = sparsegpt_prune(weight.float(), (x.T @ x).float(), sparsity=0.5, block_size=8)
    assert pruned.view(6, 4, 8).sum(dim=(0, 2)).tolist() == [24] * 4, "half of every block of 8 columns"
    error = output_error(x, weight, got)
    assert output_error(x, weight, least_squares(x, weight, pruned)) <= error
    assert error < 0.9 * output_error(x, weight, weight.masked_fill(pruned, 0.0)), "the update helps"
    magnitude = weight.abs() <= weight.abs().flatten().kthvalue(weight.numel() // 2).values
    assert error < output_error(x, weight, weight.masked_fill(magnitude, 0.0))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_n_m_keeps_n_of_every_m_inputs_of_every_row(n: int, m: int) -> None:
    x, weight = layer_data()
    got, pruned = sparsegpt_prune(weight.float(), (x.T @ x).float(), n_m=(n, m), block_size=16)
    assert (pruned.view(6, -1, m).sum(dim=-1) == m - n).all()
    assert torch.equal(got == 0, pruned)
    assert output_error(x, weight, got) < output_error(x, weight, weight.masked_fill(pruned, 0.0))


def test_inputs_that_are_always_zero_are_pruned_first_and_weights_already_pruned_stay_pruned() -> None:
    x, weight = layer_data()
    x[:, 3] = 0.0
    keep = torch.ones(weight.shape, dtype=torch.bool)
    keep[0, 10:26] = False  # 16 of row 0 pruned before: more than this block's share of that row
    got, pruned = sparsegpt_prune(weight.float(), (x.T @ x).float(), sparsity=0.25, keep=keep)
    assert bool(pruned[:, 3].all()) and bool(pruned[0, 10:26].all())
    assert torch.equal(got == 0, pruned)


def test_a_hessian_that_stays_singular_is_named_with_the_way_out() -> None:
    hessian = torch.zeros(4, 4)
    hessian[0, 1] = hessian[1, 0] = 1.0  # indefinite, and dampening 0 adds nothing
    hessian[0, 0] = 1e-8
    with pytest.raises(RuntimeError, match=r"Hessian of fc \(4 inputs\) is not positive definite.*dampening"):
        sparsegpt_prune(torch.ones(2, 4), hessian, dampening=0.0, name="fc")


# ------------------------------------------------------------------------------ through the engine
class Shared(nn.Module):
    """Two projections of one input (like q and k), then a third layer on their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.c(torch.relu(self.a(x)) + self.b(x))))


def hand_sparsegpt(weight: Tensor, inputs: Tensor, n_m: tuple[int, int] | None = None) -> Tensor:
    x = inputs.reshape(-1, inputs.shape[-1])
    pruned_weight, _ = sparsegpt_prune(weight.detach(), x.T @ x, sparsity=0.5, n_m=n_m)
    return pruned_weight


def test_layers_are_pruned_in_call_order_from_inputs_through_the_pruned_layers() -> None:
    torch.manual_seed(0)
    model = Shared()
    batches = [torch.randn(8, 16) for _ in range(3)]
    x = torch.cat(batches)
    with torch.no_grad():  # by hand: a and b from x; c from the outputs of the pruned a and b
        a = hand_sparsegpt(model.a.weight, x)
        b = hand_sparsegpt(model.b.weight, x)
        hidden = torch.relu(x @ a.T + model.a.bias) + x @ b.T + model.b.bias
        c = hand_sparsegpt(model.c.weight, hidden)
    calls = []
    model.a.register_forward_pre_hook(lambda module, inputs: calls.append("a"))
    model.c.register_forward_pre_hook(lambda module, inputs: calls.append("c"))
    pruner = prune_once(model, batches, criterion="sparsegpt", pattern="1x1", target_sparsity=0.5)
    for layer, expected in ((model.a, a), (model.b, b), (model.c, c)):
        torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-4, atol=1e-5)
    # One pass to find the order, then one per group: a and b share their input (stopping at a),
    # c has its own (stopping at c).
    assert calls == ["a", "c"] + ["a"] * 3 + ["a", "c"] * 3
    assert [t.name for t in pruner.targets] == ["a", "b", "c"]
    for target, mask in zip(pruner.targets, pruner.masks, strict=True):
        assert torch.equal(~mask, target.param == 0)
    assert pruner.sparsity == 0.5 and [e.step for e in pruner.events] == [0]


def test_two_four_through_prune_once_and_the_masks_hold_while_fine_tuning() -> None:
    torch.manual_seed(0)
    model = Shared()
    batches = [torch.randn(8, 16) for _ in range(4)]
    pruner = prune_once(model, batches, criterion="sparsegpt", pattern="2:4", target_sparsity=0.5)
    for mask in pruner.masks:
        assert (mask.view(16, 4, 4).sum(dim=-1) == 2).all()
    masks = [m.clone() for m in pruner.masks]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    for x in batches:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    pruner.detach()
    for target, mask in zip(pruner.targets, masks, strict=True):
        assert torch.equal(target.param == 0, ~mask)
    assert [e.step for e in pruner.events] == [0] and pruner.step == 4


def test_one_hessian_exists_at_a_time() -> None:
    alive: list[int] = []
    states: list[weakref.ref[Tensor]] = []

    class Counting(SparseGPTCriterion):
        def layer_state(self, target):  # type: ignore[no-untyped-def]
            state = super().layer_state(target)
            alive.append(sum(ref() is not None for ref in states))
            states.append(weakref.ref(state))
            return state

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(4)), nn.Linear(16, 2))
    prune_once(model, [torch.randn(4, 16)], criterion=Counting(), pattern="1x1", target_sparsity=0.5)
    assert alive == [0, 0, 0, 0], "every earlier layer's Hessian was freed before the next was made"


def test_sparsegpt_is_refused_where_it_cannot_serve_before_anything_runs() -> None:
    with pytest.raises(ValueError, match=r"'sparsegpt' prunes pattern '1x1' or N:M.*pattern='4x1'"):
        PruningOptions(criterion="sparsegpt", pattern="4x1")
    with pytest.raises(ValueError, match=r"block_size=6 must be a multiple of M=4"):
        PruningOptions(criterion=SparseGPTCriterion(block_size=6), pattern="2:4", target_sparsity=0.5)
    with pytest.raises(ValueError, match=r"rewind=0 would change them"):
        PruningOptions(criterion="sparsegpt", pattern="1x1", rewind=0)
    with pytest.raises(ValueError, match=r"dampening=-0.1 must be a number >= 0"):
        SparseGPTCriterion(dampening=-0.1)
    with pytest.raises(ValueError, match=r"block_size=0 must be an int >= 1"):
        SparseGPTCriterion(block_size=0)


def test_a_training_schedule_event_points_to_the_one_shot_routes() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    pruner = Pruner(model, Schedule(0, 0), PruningOptions(criterion="sparsegpt", pattern="1x1"))
    with pytest.raises(RuntimeError, match=r"prune_once\(model, loader"):
        pruner.prune(0.5)


def test_layers_it_cannot_reconstruct_stay_dense_and_are_named() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"'sparsegpt' cannot score.*'0'.*only Linear-like layers"):
        pruner = Pruner(model, Schedule(0, 0), PruningOptions(criterion="sparsegpt", pattern="1x1"))
    assert [t.name for t in pruner.targets] == ["2"]

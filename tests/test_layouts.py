"""Layouts: every registered layout round-trips, and every pattern's zeros have their structure in
the module's own layout (a Conv1D's inputs are its rows, a transposed conv's outputs its columns)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_prune import Pruner, PruningOptions, Schedule
from lightning_prune.layouts import prunable_weights, register_layout
from lightning_prune.patterns import to_canonical

SETTINGS = settings(max_examples=40, deadline=None)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as transformers defines it (matched by class name): y = x @ W + b, W (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


@st.composite
def layers(draw: st.DrawFn) -> tuple[nn.Module, str]:
    """A layer of a random type and shape whose sizes are multiples of 4, and its op type name."""
    out = 4 * draw(st.integers(1, 4))
    inp = 4 * draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["Linear", "Conv1D", "ConvTranspose2d", "Conv2d", "MultiheadAttention"]))
    if kind == "Linear":
        return nn.Linear(inp, out), kind
    if kind == "Conv1D":
        return Conv1D(out, inp), kind
    if kind == "ConvTranspose2d":
        return nn.ConvTranspose2d(inp, out, draw(st.integers(1, 3))), kind
    if kind == "Conv2d":
        groups = draw(st.sampled_from([1, 2]))
        return nn.Conv2d(inp * groups, out * groups, draw(st.integers(1, 3)), groups=groups), kind
    return nn.MultiheadAttention(inp, 2), kind


@SETTINGS
@given(layers())
def test_every_layout_round_trips_as_a_view(case: tuple[nn.Module, str]) -> None:
    module, _ = case
    for name, layout in prunable_weights(module):
        stored = getattr(module, name).detach()
        view = layout.to_standard(stored)
        assert view.data_ptr() == stored.data_ptr(), "a view, so writes reach the weight"
        assert tuple(view.shape) == layout.standard_shape(tuple(stored.shape))
        assert torch.equal(layout.from_standard(view), stored)


def check_structure(pattern: str, zero: Tensor) -> None:
    """``zero`` is the standard-layout zero map of a weight with no natural zeros."""
    canon = to_canonical(zero)  # (out, K, in)
    out, kernel, inp = canon.shape
    if pattern == "channelx1":
        columns = canon.permute(2, 0, 1).reshape(inp, -1)
        assert (columns.all(1) | ~columns.any(1)).all(), "whole input channels"
    elif pattern == "1xchannel":
        rows = canon.reshape(out, -1)
        assert (rows.all(1) | ~rows.any(1)).all(), "whole output rows"
    elif pattern == "4x1":
        blocks = canon.reshape(out // 4, 4, kernel, inp).permute(0, 2, 3, 1)
        assert (blocks.all(-1) | ~blocks.any(-1)).all(), "blocks of 4 output rows"
    elif pattern == "2:4":
        per_quad = canon.reshape(out, kernel, inp // 4, 4).sum(-1)
        assert ((per_quad == 0) | (per_quad == 2)).all(), "two of every four inputs"


@SETTINGS
@given(layers(), st.sampled_from(["channelx1", "1xchannel", "4x1", "2:4"]), st.sampled_from([0.25, 0.5]))
def test_pattern_structure_holds_in_each_modules_own_layout(
    case: tuple[nn.Module, str], pattern: str, sparsity: float
) -> None:
    module, kind = case
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))  # no natural zeros
    model = nn.Sequential(module, nn.Linear(4, 4))
    options = PruningOptions(
        target_sparsity=sparsity, pattern=pattern, op_types=[kind], scope="local", max_sparsity_per_layer=1.0
    )
    pruner = Pruner(model, Schedule(1, 1), options)
    pruner.prune(sparsity)
    for target in pruner.targets:
        zero = target.layout.to_standard(target.param.detach() == 0)
        assert zero.any(), target.name
        check_structure(pattern, zero)


def test_a_new_module_type_is_one_registered_function() -> None:
    class Transposed(nn.Module):  # stores (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 4))

    @register_layout("Transposed")
    def _transposed(module: nn.Module) -> list:  # type: ignore[type-arg]
        from lightning_prune.layouts import TRANSPOSED

        return [("weight", TRANSPOSED)]

    model = nn.Sequential(Transposed(), nn.Linear(4, 4))
    pruner = Pruner(model, Schedule(1, 1), PruningOptions(pattern="1xchannel", op_types=["Transposed"]))
    pruner.prune(0.5)
    stored = model[0].weight.detach()
    assert int((stored == 0).all(dim=0).sum()) == 2, "whole outputs: stored columns"


def _steps(model: nn.Module, pruner: Pruner, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    for _ in range(steps):
        model(torch.randn(8, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


class Conv1DNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Conv1D(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x @ self.proj.weight + self.proj.bias)


def test_a_progressive_fade_ends_on_the_structured_mask_in_a_transposed_layout() -> None:
    from lightning_prune import Progressive

    torch.manual_seed(0)
    model = Conv1DNet()
    options = PruningOptions(
        target_sparsity=0.5, pattern="4x1", op_types=["Conv1D"], progressive=Progressive(steps=3)
    )
    pruner = Pruner(model, Schedule(2, 2), options)
    _steps(model, pruner, 5)
    zero = model.proj.weight.detach().t() == 0  # standard (out, in)
    check_structure("4x1", zero)
    assert zero.float().mean() == 0.5


def test_group_lasso_shrinks_whole_outputs_of_a_transposed_layout() -> None:
    torch.manual_seed(0)
    model = Conv1DNet()
    with torch.no_grad():  # outputs 0-7 weak (norm ~0.04), 8-15 strong (~40): stored columns
        model.proj.weight.mul_(torch.tensor([0.01] * 8 + [10.0] * 8))
    options = PruningOptions(
        target_sparsity=0.5,
        pattern="1xchannel",
        op_types=["Conv1D"],
        regularizer="group_lasso",
        regularizer_coeff=10.0,
    )
    pruner = Pruner(model, Schedule(5, 5), options)
    _steps(model, pruner, 1)  # lr 0.1 * coeff 10: groups with a norm under 1 land on zero
    stored = model.proj.weight.detach()
    assert (stored[:, :8] == 0).all() and (stored[:, 8:] != 0).all(), "whole outputs, not stored rows"

"""strip: a plain state dict with the zeros, loadable with strict=True into the original architecture."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TinyModule, make_trainer, pruned_weights, tiny_loader, zero_fraction
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from lightning_prune import Progressive, Pruner, PruningCallback, PruningOptions, Schedule
from lightning_prune.export import strip


def trained(**kwargs: object) -> tuple[TinyModule, PruningCallback]:
    torch.manual_seed(0)
    module = TinyModule()
    settings = {"target_sparsity": 0.6, "pattern": "4x1", "start_step": 0, "end_step": 4, "frequency": 2}
    callback = PruningCallback(**{**settings, **kwargs}, verbose=False)
    make_trainer([callback], max_epochs=1).fit(module, tiny_loader(batches=8))
    return module, callback


def test_stripped_state_loads_strictly_into_a_fresh_model_with_the_same_outputs() -> None:
    module, callback = trained()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finished schedule: nothing to warn about
        state = strip(module, callback)
    assert list(state) == list(TinyModule().state_dict())
    fresh = TinyModule()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)
    pruned = pruned_weights(callback)
    assert zero_fraction(pruned) == pytest.approx(0.6, abs=0.05)
    reloaded = [fresh.get_submodule(t.name).weight for t in callback.pruner.targets]
    assert zero_fraction(reloaded) == zero_fraction(pruned)


def test_a_weight_changed_after_masking_is_refused_not_stripped() -> None:
    module, callback = trained()
    with torch.no_grad():
        module.net[0].weight.fill_(1.0)  # e.g. a load_state_dict of dense weights
    with pytest.raises(ValueError, match=r"not zero in the model .*apply_masks"):
        strip(module, callback)
    callback.pruner.apply_masks()
    assert set(strip(module, callback)) == set(module.state_dict())


def test_unfinished_schedule_and_fade_in_flight_are_warned_about() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    options = PruningOptions(target_sparsity=0.5, pattern="channelx1", progressive=Progressive(steps=4))
    pruner = Pruner(model, Schedule(start_step=0, end_step=0), options)
    pruner.attach(torch.optim.SGD(model.parameters(), lr=0.0))  # one-shot at step 0: the fade starts
    assert pruner.fading
    with pytest.warns(UserWarning, match="progressive fade is under way"):
        state = strip(model, pruner)
    assert torch.equal(state["0.weight"], model[0].weight), "what the model computes with now"
    partly = Pruner(
        model, Schedule(start_step=1, end_step=10, frequency=1), PruningOptions(target_sparsity=0.5)
    )
    with pytest.warns(UserWarning, match="has not run its last event"):
        strip(model, partly)


def test_wrong_arguments() -> None:
    module, callback = trained()
    with pytest.raises(ValueError, match=r"pass the network first .*strip\(model, pruner=callback\)"):
        strip(callback)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has not started fitting"):
        strip(module, PruningCallback())
    with pytest.raises(ValueError, match="are not modules of this model"):
        strip(TinyModule(), callback)
    with pytest.raises(ValueError, match="must be a PruningCallback, a Pruner or None"):
        strip(module, "callback")  # type: ignore[arg-type]


def test_torch_prune_and_parametrize_become_plain_weights() -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    class Halve(nn.Module):
        def forward(self, weight: Tensor) -> Tensor:
            return weight * 0.5

    model = build()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    parametrize.register_parametrization(model[2], "weight", Halve())
    state = strip(model)
    assert set(state) == set(build().state_dict()), "no weight_orig, weight_mask or parametrizations keys"
    fresh = build()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert float(state["0.weight"].eq(0).float().mean()) == 0.5


@pytest.mark.slow
def test_compiled_model_keys_lose_the_wrapper_prefix() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until called
    assert list(strip(compiled)) == ["0.weight", "0.bias"]

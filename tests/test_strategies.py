"""Which Lightning strategies the callback accepts, and pruning a torch.compile'd module."""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from helpers import TinyModule, make_trainer, tiny_loader, zero_fraction
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from torch import Tensor, nn

from lightning_prune import PruningCallback
from lightning_prune.callback import check_strategy

SUPPORTED = r"Supported: single device, DDP \('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook'\) and ModelParallelStrategy"
#: FSDP1 is pointed to FSDP2 (ModelParallelStrategy with fully_shard).
FSDP1 = r"does not support strategy FSDPStrategy \(FSDP1\).*Use FSDP2 instead: ModelParallelStrategy"


def fake_deepspeed() -> Strategy:
    # DeepSpeed itself is not installed; Lightning's DeepSpeedStrategy subclasses DDPStrategy.
    return type("DeepSpeedStrategy", (DDPStrategy,), {})()


def real_deepspeed_class() -> Strategy:
    # Lightning's own class, without its __init__ (which needs the deepspeed package).
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps += 1


# ------------------------------------------------------------------------------------ check_strategy
@pytest.mark.parametrize(
    "make",
    [
        lambda: SingleDeviceStrategy(device=torch.device("cpu")),
        lambda: DDPStrategy(),
        lambda: DDPStrategy(start_method="spawn"),
        lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    ],
    ids=["single_device", "ddp", "ddp_spawn", "model_parallel"],
)
def test_check_strategy_accepts_single_device_ddp_and_fsdp2(make: Any) -> None:
    strategy = make()
    check_strategy(strategy)
    # The callback's setup does the same check at the start of fit.
    PruningCallback(verbose=False).setup(SimpleNamespace(strategy=strategy), TinyModule(), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: FSDPStrategy(), "FSDPStrategy"),
        (fake_deepspeed, "DeepSpeedStrategy"),
        (real_deepspeed_class, "DeepSpeedStrategy"),
    ],
    ids=["fsdp", "deepspeed_by_name", "deepspeed_lightning_class"],
)
def test_check_strategy_refuses_sharded_strategies(make: Any, name: str) -> None:
    strategy = make()
    assert type(strategy).__name__ == name
    expected = FSDP1 if name == "FSDPStrategy" else rf"does not support strategy {name}\b.*{SUPPORTED}"
    with pytest.raises(ValueError, match=expected):
        check_strategy(strategy)


def test_fsdp_is_refused_at_setup() -> None:
    """``strategy="fsdp"`` with the callback fails before any optimizer step.

    Lightning 2.6 refuses FSDP on a CPU accelerator itself, so there the callback's ``setup`` is
    called directly, as Lightning would, with a trainer whose strategy is an ``FSDPStrategy``.
    """
    pruning, counter = PruningCallback(verbose=False), StepCounter()
    try:
        trainer = make_trainer([pruning, counter], strategy="fsdp", max_steps=2)
    except ValueError as error:
        assert "requires a GPU accelerator" in str(error), "Lightning refused FSDP for another reason"
        trainer = None
    if trainer is not None:  # a Lightning that runs FSDP on CPU: the real fit must fail early
        with pytest.raises(ValueError, match=FSDP1):
            trainer.fit(TinyModule(), tiny_loader())
        assert counter.steps == 0
        return
    stub = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=FSDP1):
        pruning.setup(stub, TinyModule(), "fit")  # type: ignore[arg-type]
    assert pruning.pruner is None


def test_refused_strategy_stops_fit_before_the_first_step() -> None:
    """End to end with a real Trainer: a DeepSpeed-named DDP strategy on 1 CPU process."""
    environment = dict(os.environ)  # Lightning's DDP setup exports LOCAL_RANK, MASTER_PORT, ...
    model = TinyModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning, counter = PruningCallback(verbose=False), StepCounter()
    trainer = make_trainer([pruning, counter], strategy=fake_deepspeed(), max_steps=2)
    try:
        with pytest.raises(ValueError, match=rf"does not support strategy DeepSpeedStrategy.*{SUPPORTED}"):
            trainer.fit(model, tiny_loader())
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    assert counter.steps == 0
    assert pruning.pruner is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------------- torch.compile
@functools.cache
def compile_unavailable() -> str | None:
    """Why torch.compile (default inductor backend, forward and backward) cannot run here, if so."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        torch._dynamo.reset()
        compiled = torch.compile(nn.Linear(4, 4))
        compiled(torch.randn(2, 4)).sum().backward()
    except Exception as error:  # e.g. no C++ compiler for inductor's CPU kernels
        return f"torch.compile does not work on this platform: {type(error).__name__}: {error}"
    finally:
        torch._dynamo.reset()
    return None


class CompiledModule(pl.LightningModule):
    """An MLP compiled as a whole submodule: ``self.net`` is an ``OptimizedModule`` (``_orig_mod``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(
            nn.Sequential(
                nn.Linear(16, 32),
                nn.ReLU(),
                nn.Linear(32, 32),
                nn.ReLU(),
                nn.Linear(32, 32),
                nn.ReLU(),
                nn.Linear(32, 4),
            )
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def real_key(name: str) -> str:
    """The parameter's key in the compiled model's state_dict, e.g. net.0 -> net._orig_mod.0.weight."""
    head, rest = name.split(".", 1)
    return f"{head}._orig_mod.{rest}.weight"


class CompileWatcher(pl.Callback):
    """After every step: masks hold on the model's real parameters; dynamo's graph count."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.checked = 0
        self.graphs: list[int] = []
        self.frames: list[int] = []

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        from torch._dynamo.utils import counters

        pruner = self.pruning.pruner
        assert pruner is not None
        parameters = dict(pl_module.named_parameters())
        for target, mask in zip(pruner.targets, pruner.masks, strict=True):
            param = parameters[real_key(target.name)]
            assert target.param is param, f"{target.name} is not the model's own parameter"
            assert not param[~mask].any(), f"{target.name}: pruned weights are not zero"
        self.checked += 1
        self.graphs.append(counters["stats"]["unique_graphs"])
        self.frames.append(counters["frames"]["total"])


COMPILE_SCHEDULE = {"target_sparsity": 0.75, "pattern": "4x1", "start_step": 0, "end_step": 8, "frequency": 2}
# Plain names only: "^net\.\d+$" cannot match "net._orig_mod.0".
COMPILE_SELECTION = {"include": [r"^net\.\d+$"], "exclude": [r"^net\.2$"]}


@pytest.fixture(scope="module")
def compiled_run() -> dict[str, Any]:
    reason = compile_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pl.seed_everything(0)
    model = CompiledModule()
    keys_before = list(model.state_dict())
    pruning = PruningCallback(**COMPILE_SCHEDULE, **COMPILE_SELECTION, verbose=False)
    watcher = CompileWatcher(pruning)
    counters.clear()
    trainer = make_trainer([pruning, watcher], max_steps=12)
    try:
        trainer.fit(model, tiny_loader(batches=10))
        stats = {"unique_graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"]}
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
        compiled_out, eager_out = model.net(x).detach(), model.net._orig_mod(x).detach()
    finally:
        torch._dynamo.reset()
    return {
        "model": model,
        "pruning": pruning,
        "watcher": watcher,
        "keys_before": keys_before,
        "compiled_out": compiled_out,
        "eager_out": eager_out,
        "stats": stats,
    }


@pytest.mark.slow
def test_compiled_targets_have_plain_names_and_regexes_select_on_them(compiled_run: dict[str, Any]) -> None:
    pruning, model = compiled_run["pruning"], compiled_run["model"]
    # net.6 is the head; net.2 is excluded by a regex written against the plain name.
    assert [t.name for t in pruning.pruner.targets] == ["net.0", "net.4"]
    assert set(pruning.pruner.layer_sparsity()) == {"net.0", "net.4"}
    assert all(set(e.layer_sparsity) == {"net.0", "net.4"} for e in pruning.pruner.events)
    inner = model.net._orig_mod
    assert not (inner[2].weight == 0).any(), "the excluded layer was pruned"
    assert not (inner[6].weight == 0).any(), "the head was pruned"


@pytest.mark.slow
def test_compiled_module_reaches_target_with_masks_held_every_step(compiled_run: dict[str, Any]) -> None:
    pruning, watcher, model = compiled_run["pruning"], compiled_run["watcher"], compiled_run["model"]
    assert [e.step for e in pruning.pruner.events] == [2, 4, 6, 8]
    assert watcher.checked == 12
    inner = model.net._orig_mod
    assert zero_fraction([inner[0].weight.detach(), inner[4].weight.detach()]) == pytest.approx(
        0.75, abs=1e-9
    )
    # The compiled forward runs on the pruned weights (no stale copy inside the graph).
    torch.testing.assert_close(compiled_run["compiled_out"], compiled_run["eager_out"])


@pytest.mark.slow
def test_compiled_module_keeps_state_dict_keys_and_compiles_once(compiled_run: dict[str, Any]) -> None:
    model, watcher = compiled_run["model"], compiled_run["watcher"]
    assert list(model.state_dict()) == compiled_run["keys_before"]
    assert all("_orig_mod" in key for key in model.state_dict())  # pruning did not unwrap the module
    # One graph for the training forward from the first step on, through 4 pruning events. (In
    # torch 2.13 this counter goes to 2 when a weight's requires_grad or stride, or the batch
    # shape, changes between steps: checked by hand, it catches a recompile.)
    assert watcher.graphs == [1] * 12
    assert watcher.frames == [1] * 12
    assert compiled_run["stats"] == {"unique_graphs": 1, "frames": 1}


@pytest.mark.slow
def test_regex_against_orig_mod_names_is_refused_with_plain_candidates() -> None:
    reason = compile_unavailable()
    if reason is not None:
        pytest.skip(reason)
    pruning = PruningCallback(**COMPILE_SCHEDULE, include=[r"_orig_mod\.0$"], verbose=False)
    trainer = make_trainer([pruning], max_steps=1)
    try:
        with pytest.raises(
            ValueError, match=r"include regex '_orig_mod\\\\.0\$' matches no candidate.*'net\.0'"
        ):
            trainer.fit(CompiledModule(), tiny_loader())
    finally:
        torch._dynamo.reset()

"""The engine's seams: strategies registered by name work from every config path, capabilities
instead of type checks, the criterion lifecycle (a Wanda-style score as one small class), and
dependencies that point down."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TinyModule, make_trainer, tiny_loader
from omegaconf import OmegaConf
from torch import Tensor, nn

from lightning_prune import Pruner, PruningCallback, PruningOptions, Schedule
from lightning_prune.criteria import Criterion, WandaCriterion, register_criterion
from lightning_prune.patterns import BlockPattern, register_pattern

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_prune"


@register_criterion
class NegatedMagnitude(Criterion):
    """A user's own criterion: keeps the smallest weights (the test can tell it from magnitude)."""

    name = "negated_magnitude_test"

    def score(self, buffer: Tensor | None, param: Tensor) -> Tensor:
        return -param.detach().abs().float()


@register_pattern("pairs_test")
class Pairs(BlockPattern):
    """A user's own pattern: blocks of 2 output rows."""

    def __init__(self, reduce: str = "mean") -> None:
        super().__init__(2, 1, reduce)


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


def test_a_registered_criterion_and_pattern_work_by_name_from_every_config_path() -> None:
    from_python = PruningCallback(criterion="negated_magnitude_test", pattern="pairs_test")
    yaml = "criterion: negated_magnitude_test\npattern: pairs_test\n"
    from_yaml = PruningCallback.from_config(OmegaConf.create(yaml))  # what Hydra hands over
    cli = _user_cli(
        [
            "--trainer.callbacks+=lightning_prune.PruningCallback",
            "--trainer.callbacks.criterion=negated_magnitude_test",
            "--trainer.callbacks.pattern=pairs_test",
        ]
    )
    (from_cli,) = [c for c in cli.trainer.callbacks if isinstance(c, PruningCallback)]
    for callback in (from_python, from_yaml, from_cli):
        assert isinstance(callback.options.criterion, NegatedMagnitude)
        assert isinstance(callback.options.pattern, Pairs)


def test_strategy_mappings_from_yaml_build_objects_with_their_options() -> None:
    config = OmegaConf.create(
        """
criterion: {name: snip_momentum, alpha: 0.9, beta: 1.0}
pattern: {_target_: lightning_prune.BlockPattern, rows: 4, cols: 1, reduce: max}
progressive: {steps: 2, kind: linear}
"""
    )
    options = PruningCallback.from_config(config).options
    assert (options.criterion.alpha, options.criterion.beta) == (0.9, 1.0)  # type: ignore[attr-defined]
    assert options.pattern == BlockPattern(4, 1, reduce="max")
    assert (options.progressive.steps, options.progressive.kind) == (2, "linear")  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"criterion.*name.*_target_"):
        PruningOptions(criterion={"alpha": 0.9})
    with pytest.raises(ValueError, match=r"_target_='torch.nn.Linear' is not a Criterion"):
        PruningOptions(criterion={"_target_": "torch.nn.Linear"})


def test_capabilities_decide_what_a_pattern_can_serve_not_its_type() -> None:
    @register_pattern("keeps_half_test")
    class KeepsHalf(BlockPattern):
        removes_whole_groups = False

        def __init__(self) -> None:
            super().__init__(2, 1)

    with pytest.raises(ValueError, match="removes no group whole"):
        PruningOptions(pattern="keeps_half_test", regularizer="group_lasso")

    class Flat(BlockPattern):
        structured = False

    with pytest.raises(ValueError, match="progressive=True needs a structured pattern"):
        PruningOptions(pattern=Flat(1, 1), progressive=True)


# --------------------------------------------------------------------------- the criterion lifecycle
class Conv1D(nn.Module):
    """Hugging Face's Conv1D layout (matched by class name): y = x @ W + b, W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


def test_wanda_scores_are_the_weight_times_its_input_channel_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), Conv1D(4, 6), nn.Linear(4, 2))
    pruner = Pruner(
        model, Schedule(0, 0), PruningOptions(criterion="wanda", pattern="1x1", op_types=["Linear", "Conv1D"])
    )
    batches = [torch.randn(5, 8) for _ in range(3)]
    with pruner.calibrating(), torch.no_grad():
        for x in batches:
            model(x)
    inputs = torch.cat(batches)
    hidden = model[0](inputs).detach()
    expected_linear = model[0].weight.abs() * inputs.norm(dim=0)  # (out, in) * ||X_j||
    expected_conv1d = model[1].weight.abs() * hidden.norm(dim=0)[:, None]  # stored (in, out)
    criterion = pruner.options.criterion
    got = [criterion.score(state, t.param) for t, state in zip(pruner.targets, pruner.buffers, strict=True)]
    torch.testing.assert_close(got[0], expected_linear.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected_conv1d.detach(), rtol=1e-5, atol=1e-6)


def test_forward_hooks_exist_only_while_calibrating_and_an_uncalibrated_event_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    pruner = Pruner(model, Schedule(1, 1), PruningOptions(criterion="wanda", pattern="1x1"))
    with pytest.raises(RuntimeError, match="before any calibration"):
        pruner.prune(0.5)
    with pruner.calibrating():
        assert len(model[0]._forward_hooks) == 1
        model(torch.randn(2, 8))
    assert not model[0]._forward_hooks
    assert pruner.calibration_calls == 1
    pruner.prune(0.5)
    assert pruner.sparsity == 0.5


def test_wanda_one_shot_before_training_calibrates_without_gradients() -> None:
    seen: list[bool] = []

    class RecordsGrad(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            seen.append(torch.is_grad_enabled())
            return super().training_step(batch, batch_idx)

    pruning = PruningCallback(
        criterion=WandaCriterion(init_batches=2), pattern="1x1", target_sparsity=0.5, start_step=0, end_step=0
    )
    make_trainer([pruning], max_steps=1).fit(RecordsGrad(), tiny_loader())
    assert seen[:2] == [False, False], "the two calibration batches run without gradients"
    assert pruning.pruner is not None and pruning.pruner.calibration_calls == 2
    assert [e.step for e in pruning.pruner.events] == [0]


def test_wanda_leaves_what_it_cannot_score_dense_and_says_why() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"cannot score.*'0'.*groups=2"):
        pruner = Pruner(model, Schedule(1, 1), PruningOptions(criterion="wanda", pattern="1x1"))
    assert [t.name for t in pruner.targets] == ["1"]


# --------------------------------------------------------------------------- dependencies point down
def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports at run time (imports under ``if TYPE_CHECKING:`` do not count)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


#: The modules that may touch Lightning; the engine, the strategies and the export may not.
LIGHTNING_SIDE = {
    "callback",
    "cli",
    "init_scoring",
    "lifecycle",
    "lightning_internals",
    "messages",
    "oneshot",
    "demo",
    "quiet",
    "__main__",
    "__init__",
}


def test_only_the_lightning_side_imports_lightning() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem in LIGHTNING_SIDE and path.parent == PACKAGE:
            continue
        lightning = sorted(m for m in _imports(path) if m.split(".")[0] in ("lightning", "pytorch_lightning"))
        if lightning:
            offenders[str(path.relative_to(PACKAGE))] = lightning
    assert not offenders, offenders


def test_private_lightning_api_is_used_in_one_module_only() -> None:
    private = ("trainer._results", "fit_loop.setup_data", "pl_module.log =", "pl_module.log, ")
    users = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(text in path.read_text() for text in private)
    }
    assert users == {"lightning_internals.py"}


def test_the_export_does_not_import_the_callback() -> None:
    for path in (PACKAGE / "export").glob("*.py"):
        assert "lightning_prune.callback" not in _imports(path), path.name

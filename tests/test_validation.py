"""Bad configuration raises ValueError before the first training step, naming the key, the value and
what is accepted: at construction for what can be checked alone, at ``trainer.fit`` for what needs the
model or the length of training. The plain-PyTorch engine (PruningOptions, Schedule, Pruner) gets the
same checks.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_root
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_prune import BlockPattern, NMPattern, Pruner, PruningCallback, PruningOptions, Schedule
from lightning_prune.demo import DigitsClassifier, DigitsDataModule
from lightning_prune.schedules import resolve_schedule

PATTERN_HINT = "'N:M' (e.g. '2:4')"  # part of the accepted-patterns list every pattern error ends with


def mentions(*parts: str) -> str:
    """A ``match=`` regex that requires every part, literally and in any order."""
    return "(?s)^" + "".join(f"(?=.*{re.escape(part)})" for part in parts)


def test_mentions_requires_every_part() -> None:
    assert re.search(mentions("a=1", "[0, 1)"), "x [0, 1) then a=1")
    assert not re.search(mentions("a=1", "[0, 1)"), "a=1 is outside [0, 1]")


# --------------------------------------------------------------------------- constructor time
# (kwargs, parts the message must contain). Keys that PruningOptions shares with the callback.
OPTION_CASES: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    # target_sparsity outside [0, 1)
    ({"target_sparsity": -0.1}, ("target_sparsity=-0.1", "[0, 1)")),
    ({"target_sparsity": 1.0}, ("target_sparsity=1.0", "[0, 1)")),
    ({"target_sparsity": 1.5}, ("target_sparsity=1.5", "[0, 1)")),
    ({"target_sparsity": True}, ("target_sparsity=True", "[0, 1)")),
    ({"target_sparsity": "0.9"}, ("target_sparsity='0.9'", "[0, 1)")),
    ({"target_sparsity": float("nan")}, ("target_sparsity=nan", "[0, 1)")),
    # unknown patterns
    ({"pattern": "5y3"}, ("pattern='5y3'", PATTERN_HINT)),
    ({"pattern": "0x4"}, ("pattern='0x4'", ">= 1", PATTERN_HINT)),
    ({"pattern": "4x0"}, ("pattern='4x0'", ">= 1", PATTERN_HINT)),
    ({"pattern": "3:2"}, ("pattern='3:2'", "0 < N < M", PATTERN_HINT)),
    ({"pattern": "4:4"}, ("pattern='4:4'", "0 < N < M", PATTERN_HINT)),
    ({"pattern": "0:4"}, ("pattern='0:4'", "0 < N < M", PATTERN_HINT)),
    ({"pattern": 42}, ("pattern=42", PATTERN_HINT)),
    ({"pattern": None}, ("pattern=None", PATTERN_HINT)),
    # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124
    ({"pattern": 124}, ("pattern=124", '"2:4"', PATTERN_HINT)),
    # unknown criterion / scope
    ({"criterion": "magnitudee"}, ("criterion='magnitudee'", "'magnitude'")),
    ({"criterion": 3}, ("criterion=3", "'magnitude'")),
    ({"scope": "globl"}, ("scope='globl'", "'global'", "'local'")),
    # N:M caps the sparsity at 1 - N/M
    ({"pattern": "2:4", "target_sparsity": 0.6}, ("target_sparsity=0.6", "'2:4'", "0.5")),
    ({"pattern": "1:4", "target_sparsity": 0.8}, ("target_sparsity=0.8", "'1:4'", "0.75")),
    # per-layer bounds
    (
        {"min_sparsity_per_layer": 0.5, "max_sparsity_per_layer": 0.4},
        ("min_sparsity_per_layer=0.5", "max_sparsity_per_layer=0.4", "min <= max"),
    ),
    ({"target_sparsity": 0.99}, ("target_sparsity=0.99", "max_sparsity_per_layer", "0.98")),
    (
        {"target_sparsity": 0.1, "min_sparsity_per_layer": 0.2},
        ("target_sparsity=0.1", "min_sparsity_per_layer", "0.2"),
    ),
    ({"min_sparsity_per_layer": -0.1}, ("min_sparsity_per_layer=-0.1", "[0, 1]")),
    ({"min_sparsity_per_layer": 1.5}, ("min_sparsity_per_layer=1.5", "[0, 1]")),
    ({"max_sparsity_per_layer": -0.5}, ("max_sparsity_per_layer=-0.5", "[0, 1]")),
    ({"max_sparsity_per_layer": 1.5}, ("max_sparsity_per_layer=1.5", "[0, 1]")),
    ({"max_sparsity_per_layer": "0.9"}, ("max_sparsity_per_layer='0.9'", "[0, 1]")),
    # regexes that do not compile, or are not strings
    ({"include": ["fc["]}, ("include", "'fc['", "not a valid regex")),
    ({"exclude": ["fc["]}, ("exclude", "'fc['", "not a valid regex")),
    ({"include": "fc["}, ("include", "'fc['", "not a valid regex")),
    ({"exclude": ["ok", 7]}, ("exclude", "7", "regex string")),
    # op_types that cannot be class names
    ({"op_types": []}, ("op_types=[]", "non-empty list")),
    ({"op_types": [42]}, ("op_types", "42", "'Linear'")),
    # skip_last_layer must be a bool
    ({"skip_last_layer": "yes"}, ("skip_last_layer='yes'", "true or false")),
    ({"skip_last_layer": 1}, ("skip_last_layer=1", "true or false")),
    ({"skip_last_layer": None}, ("skip_last_layer=None", "true or false")),
]

# Keys only the callback takes: the step window, its frequency and the curve.
CALLBACK_ONLY_CASES: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({"sparsity_curve": "quadratic"}, ("sparsity_curve='quadratic'", "'exp'", "'linear'", "'agp'")),
    ({"sparsity_curve": "EXP "}, ("sparsity_curve='EXP '", "'exp'")),
    # end before start, both the same kind
    ({"start_step": 100, "end_step": 50}, ("end_step=50", "start_step=100")),
    ({"start_step": 0.5, "end_step": 0.25}, ("end_step=0.25", "start_step=0.5")),
    # frequency
    ({"frequency": 0}, ("frequency=0", ">= 1")),
    ({"frequency": -3}, ("frequency=-3", ">= 1")),
    ({"frequency": 2.5}, ("frequency=2.5", "int")),
    ({"frequency": True}, ("frequency=True", "int")),
    ({"frequency": "10"}, ("frequency='10'", "int")),
    # a float step is a fraction in (0, 1]; an int step is >= 0
    ({"start_step": 0.0}, ("start_step=0.0", "(0, 1]")),
    ({"end_step": 0.0}, ("end_step=0.0", "(0, 1]")),
    ({"end_step": 1.5}, ("end_step=1.5", "(0, 1]")),
    ({"end_step": -0.2}, ("end_step=-0.2", "(0, 1]")),
    ({"start_step": float("nan")}, ("start_step=nan", "(0, 1]")),
    ({"start_step": -1}, ("start_step=-1", ">= 0")),
    ({"end_step": -1}, ("end_step=-1", ">= 0")),
    ({"start_step": "10"}, ("start_step='10'", "int step >= 0", "(0, 1]")),
    ({"end_step": True}, ("end_step=True", "int step >= 0", "(0, 1]")),
]


def case_id(case: tuple[dict[str, Any], tuple[str, ...]]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in case[0].items())


@pytest.mark.parametrize("case", OPTION_CASES + CALLBACK_ONLY_CASES, ids=case_id)
def test_callback_rejects_bad_argument_at_construction(case: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    kwargs, parts = case
    with pytest.raises(ValueError, match=mentions(*parts)):
        PruningCallback(verbose=False, **kwargs)


@pytest.mark.parametrize("case", OPTION_CASES, ids=case_id)
def test_pruning_options_reject_the_same_values(case: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    kwargs, parts = case
    with pytest.raises(ValueError, match=mentions(*parts)):
        PruningOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pattern": "1:4", "target_sparsity": 0.75},
        {"pattern": "2:4", "target_sparsity": 0.5},
        {"target_sparsity": 0.98},
        {"target_sparsity": 0.0},
        {"min_sparsity_per_layer": 0.4, "max_sparsity_per_layer": 0.4, "target_sparsity": 0.4},
        {"start_step": 0, "end_step": 0},
        {"start_step": 0.5, "end_step": 0.5},
        {"start_step": 1.0, "end_step": 1.0},
        {"start_step": 100, "end_step": 0.5},  # mixed kinds: checked once the length is known
        {"frequency": 1},
        {"skip_last_layer": False},
    ],
    ids=lambda kwargs: ",".join(f"{k}={v!r}" for k, v in kwargs.items()),
)
def test_edge_values_that_are_valid_are_accepted(kwargs: dict[str, Any]) -> None:
    callback = PruningCallback(verbose=False, **kwargs)
    # Each value is kept as given (a pattern as the object its text names), not clamped or replaced.
    for key, value in kwargs.items():
        kept = getattr(callback.options, key) if hasattr(callback.options, key) else getattr(callback, key)
        assert str(kept) == str(value), key


# --------------------------------------------------------------------------- the plain-PyTorch Schedule
SCHEDULE_CASES: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({"start_step": -1, "end_step": 10}, ("start_step=-1", ">= 0")),
    ({"start_step": 100, "end_step": 50}, ("end_step=50", "start_step=100", "end_step >= start_step")),
    ({"start_step": 0, "end_step": 10, "frequency": 0}, ("frequency=0", ">= 1")),
    ({"start_step": 0, "end_step": 10, "frequency": -3}, ("frequency=-3", ">= 1")),
    ({"start_step": 0, "end_step": 10, "frequency": 2.5}, ("frequency=2.5", "int")),
    ({"start_step": 0, "end_step": 10, "frequency": True}, ("frequency=True", "int")),
    ({"start_step": 0.5, "end_step": 10}, ("start_step=0.5", "int")),
    ({"start_step": 0, "end_step": 1.0}, ("end_step=1.0", "int")),
    ({"start_step": 0, "end_step": None}, ("end_step=None", "int")),
    ({"start_step": 0, "end_step": 10, "curve": "quadratic"}, ("sparsity_curve='quadratic'", "'exp'")),
    ({"start_step": 0, "end_step": 10, "initial_sparsity": 1.0}, ("initial_sparsity=1.0", "[0, 1)")),
    ({"start_step": 0, "end_step": 10, "initial_sparsity": -0.1}, ("initial_sparsity=-0.1", "[0, 1)")),
]


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=case_id)
def test_schedule_rejects_bad_values(case: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    kwargs, parts = case
    with pytest.raises(ValueError, match=mentions(*parts)):
        Schedule(**kwargs)


@pytest.mark.parametrize(
    ("start", "end", "parts"),
    [
        (None, None, ("end_step=None", "length of training", "int step")),
        (0.5, 1.0, ("start_step=0.5", "length of training", "int step")),
        (0, 0.5, ("end_step=0.5", "length of training", "int step")),
    ],
)
def test_resolve_schedule_needs_a_length_for_fractions(
    start: float | None, end: float | None, parts: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match=mentions(*parts)):
        resolve_schedule(start, end, None, "exp", float("inf"))
    # Int steps need no length.
    assert resolve_schedule(0, 10, None, "exp", float("inf")).end_step == 10


def test_resolve_schedule_rejects_end_before_start_of_mixed_kinds() -> None:
    with pytest.raises(ValueError, match=mentions("end_step=0.5", "step 50", "start_step=60")):
        resolve_schedule(60, 0.5, None, "exp", 100)


def test_resolve_schedule_rechecks_step_specs() -> None:
    with pytest.raises(ValueError, match=mentions("start_step=0.0", "(0, 1]")):
        resolve_schedule(0.0, 10, None, "exp", 100)
    with pytest.raises(ValueError, match=mentions("sparsity_curve='quadratic'", "'exp'")):
        resolve_schedule(0, 10, None, "quadratic", 100)


# --------------------------------------------------------------------------- the plain-PyTorch Pruner
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        ({"include": ["nonexistent"]}, ("include", "'nonexistent'", "candidates", "'0'", "'2'")),
        ({"exclude": ["nonexistent"]}, ("exclude", "'nonexistent'", "candidates")),
        ({"include": ["^0$"], "exclude": ["^0$"]}, ("include=['^0$']", "exclude=['^0$']", "no module")),
        ({"include": ["^4$"]}, ("include=['^4$']", "skip_last_layer=True", "no module")),
        ({"op_types": ["Liner"]}, ("op_types", "'Liner'", "'Linear'")),
        ({"op_types": ["Conv2d"]}, ("op_types=['Conv2d']", "matches no module")),
        ({"pattern": "7x1"}, ("pattern '7x1'", "cannot tile", "divisible by 7")),
    ],
    ids=lambda value: str(value),
)
def test_pruner_rejects_options_that_select_nothing(kwargs: dict[str, Any], parts: tuple[str, ...]) -> None:
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    options = PruningOptions(**kwargs)
    warns = pytest.warns(UserWarning, match="7x1") if "pattern" in kwargs else contextlib.nullcontext()
    with warns, pytest.raises(ValueError, match=mentions(*parts)):
        Pruner(model, Schedule(0, 0), options)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------- setup time (trainer.fit)
def demo_trainer(callback: PruningCallback, **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": trainer_root(),  # the end-of-fit report, in the test's tmp_path
    }
    settings.update(kwargs)
    return pl.Trainer(callbacks=[callback], **settings)


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_untrained(trainer: pl.Trainer, model: nn.Module, before: list[Tensor]) -> None:
    assert trainer.global_step == 0
    after = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "a weight changed"


def assert_fit_raises(
    callback: PruningCallback, parts: tuple[str, ...], model: pl.LightningModule | None = None
) -> None:
    model = model or DigitsClassifier()
    before = snapshot(model)
    trainer = demo_trainer(callback)
    with pytest.raises(ValueError, match=mentions(*parts)):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert_untrained(trainer, model, before)


# The demo MLP's Linear layers are net.1 (256x64), net.3 (256x256) and the head net.5 (10x256).
@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        ({"include": ["nonexistent"]}, ("include", "'nonexistent'", "candidates", "'net.1'", "'net.3'")),
        ({"exclude": ["nonexistent"]}, ("exclude", "'nonexistent'", "candidates", "'net.1'")),
        (
            {"include": ["net.1$"], "exclude": ["net.1$"]},
            ("include=['net.1$']", "exclude=['net.1$']", "no module", "'net.3'"),
        ),
        ({"include": ["net.5"]}, ("include=['net.5']", "skip_last_layer=True", "no module")),
        ({"op_types": ["Liner"]}, ("op_types", "'Liner'", "'Linear'")),
        ({"op_types": ["Linear", "Liner"]}, ("op_types", "'Liner'", "'Linear'")),
        ({"op_types": ["Conv2d"]}, ("op_types=['Conv2d']", "matches no module")),
        ({"start_step": 100}, ("end_step=None", "start_step=100", "before")),
        ({"start_step": 100, "end_step": 0.5}, ("end_step=0.5", "start_step=100", "before")),
    ],
    ids=lambda value: str(value),
)
def test_fit_rejects_configuration_the_model_or_run_cannot_satisfy(
    kwargs: dict[str, Any], parts: tuple[str, ...]
) -> None:
    assert_fit_raises(PruningCallback(verbose=False, **kwargs), parts)


def test_fit_rejects_a_pattern_no_selected_layer_can_tile() -> None:
    # 256 rows is not a multiple of 7 in either hidden layer.
    with pytest.warns(UserWarning, match=mentions("'7x1'", "net.1", "net.3")):
        assert_fit_raises(
            PruningCallback(pattern="7x1", verbose=False),
            ("pattern '7x1'", "cannot tile any selected layer", "net.1", "net.3", "divisible by 7"),
        )


@pytest.mark.slow
def test_fit_warns_and_skips_layers_a_pattern_cannot_tile_and_trains() -> None:
    # The CNN's first conv has 1 input channel, which 2:4 cannot group; the other layers can.
    callback = PruningCallback(pattern="2:4", target_sparsity=0.5, verbose=False)
    model = DigitsClassifier(arch="cnn")
    first_conv = model.net[0].weight.detach().clone()
    trainer = demo_trainer(callback)
    with pytest.warns(UserWarning, match=mentions("1 layer(s) dense", "'2:4'", "net.0", "divisible by 4")):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 2
    assert callback.pruner is not None
    assert list(callback.pruner.skipped) == ["net.0"]
    assert [t.name for t in callback.pruner.targets] == ["net.2", "net.6"]
    assert callback.pruner.sparsity > 0
    assert not (model.net[0].weight == 0).any()
    assert not torch.equal(model.net[0].weight, first_conv), "the skipped layer still trains"


@pytest.mark.slow
def test_end_step_beyond_the_run_warns_and_trains() -> None:
    # The library's contract: an end after the last step is allowed (a resumed run may reach it) and
    # warned about, naming end_step, its step and the run's length.
    callback = PruningCallback(end_step=10_000, verbose=False)
    trainer = demo_trainer(callback)
    with pytest.warns(
        UserWarning, match=mentions("end_step", "step 10000", "last step (2)", "target_sparsity=0.9")
    ):
        trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    assert trainer.global_step == 2
    assert callback.pruner is not None and callback.pruner.schedule.end_step == 10_000


class FourBatches(IterableDataset):
    """An iterable dataset with no ``__len__``: Lightning cannot count its batches."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(0)
        for _ in range(4):
            yield torch.rand(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def assert_unsized_fit_raises(callback: PruningCallback, parts: tuple[str, ...], **kwargs: Any) -> None:
    model = DigitsClassifier()
    before = snapshot(model)
    trainer = demo_trainer(callback, limit_train_batches=1.0, limit_val_batches=0, **kwargs)
    with pytest.raises(ValueError, match=mentions(*parts)):
        trainer.fit(model, DataLoader(FourBatches(), batch_size=None))
    assert_untrained(trainer, model, before)


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        ({}, ("end_step=None", "length of training", "int step")),
        ({"start_step": 0.25, "end_step": 0.5}, ("start_step=0.25", "length of training", "int step")),
    ],
    ids=["default window", "fractions"],
)
def test_fit_rejects_fractions_when_training_has_no_length(
    kwargs: dict[str, Any], parts: tuple[str, ...]
) -> None:
    # max_epochs=-1 and no max_steps: endless training, estimated_stepping_batches is inf.
    # max_time only stops the run should the check ever go missing.
    callback = PruningCallback(verbose=False, **kwargs)
    assert_unsized_fit_raises(callback, parts, max_epochs=-1, max_time={"seconds": 5})


def test_default_window_with_unsized_data_and_one_epoch_names_the_unknown_length() -> None:
    callback = PruningCallback(verbose=False)
    assert_unsized_fit_raises(callback, ("end_step=None", "length of training"), max_epochs=1)


def test_fractions_with_unsized_data_and_one_epoch_raise_instead_of_one_shot() -> None:
    callback = PruningCallback(start_step=0.25, end_step=0.5, verbose=False)
    assert_unsized_fit_raises(callback, ("start_step=0.25", "length of training"), max_epochs=1)


# --------------------------------------------------------------------------- wrong types
@pytest.mark.parametrize(
    ("key", "value"),
    [("include", 42), ("exclude", 42), ("exclude", 4.2)],
    ids=["include=42", "exclude=42", "exclude=4.2"],
)
def test_include_exclude_of_the_wrong_type_raise_value_error(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=mentions(key)):
        PruningCallback(verbose=False, **{key: value})


@pytest.mark.parametrize("build", ["callback", "schedule"])
def test_unhashable_sparsity_curve_raises_value_error(build: str) -> None:
    with pytest.raises(ValueError, match=mentions("sparsity_curve=['exp']", "'linear'")):
        if build == "callback":
            PruningCallback(sparsity_curve=["exp"], verbose=False)  # type: ignore[arg-type]
        else:
            Schedule(0, 10, curve=["exp"])  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0.5", None])
def test_schedule_initial_sparsity_of_the_wrong_type_raises_value_error(value: object) -> None:
    with pytest.raises(ValueError, match=mentions("initial_sparsity=")):
        Schedule(0, 10, initial_sparsity=value)  # type: ignore[arg-type]


def test_verbose_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=mentions("verbose='no'")):
        PruningCallback(verbose="no")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "target"),
    [(lambda: NMPattern(2.0, 4), 0.5), (lambda: BlockPattern(2.0, 1), 0.9)],
    ids=["NMPattern(2.0,4)", "BlockPattern(2.0,1)"],
)
def test_pattern_objects_with_non_int_sizes_are_rejected_up_front(build: Any, target: float) -> None:
    with pytest.raises(ValueError, match=re.escape("2.0")):
        PruningOptions(pattern=build(), target_sparsity=target)


def test_compiled_regexes_are_accepted_as_they_are() -> None:
    regex = re.compile("net")
    assert PruningCallback(include=regex).options.include == (regex,)

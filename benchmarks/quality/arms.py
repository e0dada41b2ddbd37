"""The benchmark's arms and how each trains: dense, Lightning's ``ModelPruning`` and ``PruningCallback``.

Every arm trains ``task.build()`` made under the same seed, on the same batch stream, with the
task's Adam, for ``task.steps`` optimizer steps, through the same Lightning ``Trainer`` set-up. The
stream is served in "epochs" of one pruning interval (the schedule's ``frequency``) by a sampler
that continues where the last epoch stopped, so that ``ModelPruning``, which prunes at epoch ends,
prunes after exactly the same optimizer steps as ``PruningCallback`` does; the data order is the
same for every arm whatever the epoch length.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_prune import PruningCallback, SnipMomentumCriterion
from lightning_prune.criteria import CRITERIA
from lightning_prune.schedules import Schedule, resolve_schedule
from lightning_prune.targets import select_targets

from .tasks import Batch, Task

#: The sparsity each pattern is pruned to.
PATTERN_TARGETS = {"1x1": 0.9, "4x1": 0.8, "2:4": 0.5, "channelx1": 0.5}
STRUCTURED = ("4x1", "2:4", "channelx1")
#: Criteria that get the progressive and group-lasso variants (the budget allows two).
VARIANT_CRITERIA = ("magnitude", "snip_momentum")
#: INC's decaying snip-momentum (``S = 0.9 S + 1.0 |W G|``), next to ours (``S = S + 0.9 |W G|``).
DECAY = "snip_momentum_decay"
CURVE = "exp"  # the callback's default curve, given to ModelPruning and INC as well
#: Issue 21's options at unstructured 90% (magnitude): per-layer ERK shares, regrowth inside the
#: window, an initial one-shot share, and ERK with the first-event rewind ``ModelPruning`` does.
HIGH_SPARSITY_OPTIONS: tuple[tuple[tuple[str, Any], ...], ...] = (
    (("allocation", "erk"),),
    (("regrow", 0.3),),
    (("allocation", "erk"), ("regrow", 0.3)),
    (("initial_sparsity", 0.5),),
    (("allocation", "erk"), ("rewind", 0), ("rewind_events", "first")),
)


@dataclass(frozen=True)
class Arm:
    """One configuration to train.

    Args:
        method: ``"dense"``, ``"modelpruning"``, ``"ours"`` or ``"inc"``.
        criterion: criterion name (``"-"`` for dense, ``"l1"`` for ModelPruning).
        pattern: pattern name (``"-"`` for dense).
        target: final sparsity asked for.
        variant: ``""``, ``"progressive"`` or ``"group_lasso"``; for ModelPruning ``"no_rewind"``
            (its default rewinds: ``use_lottery_ticket_hypothesis=True``).
        options: further ``PruningCallback`` arguments as ``(name, value)`` pairs (``bench_defaults.py``).
    """

    method: str
    criterion: str = "-"
    pattern: str = "-"
    target: float = 0.0
    variant: str = ""
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """The arm's id, matched by ``--arms``: ``method/criterion/pattern[+variant]``."""
        if self.method == "dense":
            return "dense"
        suffix = f"+{self.variant}" if self.variant else ""
        if self.options:
            suffix += "[" + ",".join(f"{key}={value}" for key, value in self.options) + "]"
        return f"{self.method}/{self.criterion}/{self.pattern}{suffix}"


def all_arms(inc: bool) -> list[Arm]:
    """Every arm of the default run, dense first; INC's only when ``inc``."""
    unstructured = PATTERN_TARGETS["1x1"]
    arms = [
        Arm("dense"),
        Arm("modelpruning", "l1", "1x1", unstructured),
        Arm("modelpruning", "l1", "1x1", unstructured, "no_rewind"),
        Arm("ours", "magnitude", "1x1", unstructured, options=(("rewind", 0),)),
        Arm("ours", "magnitude", "1x1", unstructured, options=(("rewind", 0), ("rewind_events", "first"))),
        Arm("ours", "magnitude", "1x1", unstructured, options=(("rewind", 0), ("rewind_events", "last"))),
        *(
            Arm("ours", "magnitude", "1x1", unstructured, options=options)
            for options in HIGH_SPARSITY_OPTIONS
        ),
    ]
    # Wanda and SparseGPT prune a trained model once from calibration data: bench_calibration.py.
    while_training = [name for name in sorted(CRITERIA) if not CRITERIA[name].calibrates]
    for criterion in [*while_training, DECAY]:
        for pattern, target in PATTERN_TARGETS.items():
            arms.append(Arm("ours", criterion, pattern, target))
    for criterion in VARIANT_CRITERIA:
        for pattern in STRUCTURED:
            arms.append(Arm("ours", criterion, pattern, PATTERN_TARGETS[pattern], "progressive"))
        for pattern in ("4x1", "channelx1"):  # group lasso refuses N:M
            arms.append(Arm("ours", criterion, pattern, PATTERN_TARGETS[pattern], "group_lasso"))
    if inc:
        for criterion in VARIANT_CRITERIA:
            for pattern, target in PATTERN_TARGETS.items():
                arms.append(Arm("inc", criterion, pattern, target))
    return arms


def quick_arms(inc: bool) -> list[Arm]:
    """A few arms that touch every method and variant, for the smoke test."""
    arms = [
        Arm("dense"),
        Arm("modelpruning", "l1", "1x1", 0.9),
        Arm("modelpruning", "l1", "1x1", 0.9, "no_rewind"),
        Arm("ours", "magnitude", "1x1", 0.9),
        Arm("ours", "magnitude", "1x1", 0.9, options=(("rewind", 0),)),
        Arm("ours", "snip_momentum", "2:4", 0.5),
        Arm("ours", "magnitude", "4x1", 0.8, "progressive"),
        Arm("ours", "snip_momentum", "channelx1", 0.5, "group_lasso"),
    ]
    if inc:
        arms.append(Arm("inc", "snip_momentum", "4x1", 0.8))
    return arms


def select_arms(arms: list[Arm], regex: str | None) -> list[Arm]:
    """The arms whose name ``re.search``-matches ``regex``, dense always kept (the reference)."""
    if regex is None:
        return arms
    pattern = re.compile(regex)
    return [a for a in arms if a.method == "dense" or pattern.search(a.name)]


# ---------------------------------------------------------------------------------------- data
class StreamBatches(Dataset):
    """Batch ``i`` of ``task``'s stream as dataset item ``i`` (the loader does not batch again)."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def __len__(self) -> int:
        return self.task.steps

    def __getitem__(self, index: int) -> Batch:
        return self.task.batch(index)


class ContinuingSampler(Sampler[int]):
    """Epoch ``e`` yields indices ``e * length .. (e + 1) * length - 1``: every epoch continues the stream.

    Lightning calls ``set_epoch`` before each epoch. The indices served are recorded, so a run can
    check that it saw exactly ``0 .. steps - 1`` in order.

    Args:
        length: batches per epoch.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.epoch = 0
        self.served: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        for index in range(self.epoch * self.length, (self.epoch + 1) * self.length):
            self.served.append(index)
            yield index


class TaskModule(pl.LightningModule):
    """``task``'s loss and optimizer around ``net``; logs nothing."""

    def __init__(self, task: Task, net: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.net = net

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.task.loss(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.task.optimizer(self.net)


# ---------------------------------------------------------------------------------------- arms
def pruning_schedule(task: Task) -> Schedule:
    """The window every pruning arm follows: the callback's default for ``task.steps`` steps."""
    return resolve_schedule(None, None, None, CURVE, task.steps)


def modelpruning_amounts(schedule: Schedule, target: float) -> list[float]:
    """Per event, the share of the *remaining* weights ``ModelPruning`` prunes to follow ``schedule``.

    ``torch.nn.utils.prune`` applies an iterative amount to the weights still unpruned, so event
    ``k`` prunes ``1 - (1 - s_k) / (1 - s_{k-1})`` to reach the schedule's ``s_k``.
    """
    reached = [schedule.sparsity_at(step, target) for step in schedule.event_steps()]
    amounts, before = [], 0.0
    for sparsity in reached:
        amounts.append(1.0 - (1.0 - sparsity) / (1.0 - before))
        before = sparsity
    return amounts


def modelpruning_callback(layers: list[nn.Module], amounts: list[float], rewind: bool = True) -> ModelPruning:
    """Lightning's global l1 ``ModelPruning`` on ``layers``, pruning ``amounts[epoch]`` at each epoch end,
    rewinding to the initial weights after each (its default) unless ``rewind=False``."""
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=[(layer, "weight") for layer in layers],
        amount=lambda epoch: amounts[epoch] if epoch < len(amounts) else 0.0,
        apply_pruning=lambda epoch: epoch < len(amounts),
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=rewind,
        verbose=0,
    )


def ours_callback(arm: Arm) -> PruningCallback:
    """``PruningCallback`` for ``arm``: window, frequency and curve left at the callback's defaults."""
    criterion: Any = arm.criterion
    if arm.criterion == DECAY:
        criterion = SnipMomentumCriterion(alpha=0.9, beta=1.0)
    return PruningCallback(
        target_sparsity=arm.target,
        pattern=arm.pattern,
        criterion=criterion,
        progressive=arm.variant == "progressive",
        regularizer="group_lasso" if arm.variant == "group_lasso" else None,
        verbose=False,
        **dict(arm.options),
    )


@dataclass
class Result:
    """What one arm gave for one seed.

    Args:
        arm: the arm.
        seed: the seed.
        metrics: validation numbers from ``task.evaluate`` (empty if it failed).
        sparsity: zeros over the benchmark's target layers (every Linear/Conv weight but the head).
        fit_s: wall seconds of training.
        event_steps: optimizer steps after which the arm pruned.
        error: ``None``, or why the arm failed.
    """

    arm: Arm
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    sparsity: float = float("nan")
    fit_s: float = float("nan")
    event_steps: list[int] = field(default_factory=list)
    error: str | None = None


def target_layers(net: nn.Module) -> list[nn.Module]:
    """The layers whose zeros count: the callback's default targets (Linear/Conv weights but the head)."""
    return [t.module for t in select_targets(net).targets]


def measured_sparsity(layers: list[nn.Module]) -> float:
    """Fraction of exact zeros in the ``weight`` of ``layers`` (through ``ModelPruning``'s mask if still on)."""
    zeros = total = 0
    for layer in layers:
        weight = layer.weight_orig * layer.weight_mask if hasattr(layer, "weight_mask") else layer.weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total


class EventRecorder(Callback):
    """Records the optimizer steps after which ``ModelPruning`` ran (its ``on_train_epoch_end``)."""

    def __init__(self, amounts: list[float]) -> None:
        self.amounts = amounts
        self.steps: list[int] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < len(self.amounts):
            self.steps.append(trainer.global_step)


def run_arm(task: Task, arm: Arm, seed: int, root: str) -> Result:
    """Train ``arm`` on ``task`` under ``seed`` and evaluate it.

    Args:
        task: the task.
        arm: the arm.
        seed: seed of the initial weights (the task holds the data's).
        root: the trainer's ``default_root_dir``: anything a callback writes goes there.

    Raises:
        RuntimeError: when the run did not see exactly the batch stream every arm sees.
    """
    schedule = pruning_schedule(task)
    torch.manual_seed(seed)
    net = task.build()
    module = TaskModule(task, net)
    layers = target_layers(net)
    callbacks: list[Callback] = []
    recorder = None
    if arm.method == "ours":
        callbacks.append(ours_callback(arm))
    elif arm.method == "modelpruning":
        amounts = modelpruning_amounts(schedule, arm.target)
        recorder = EventRecorder(amounts)
        callbacks += [modelpruning_callback(layers, amounts, rewind=arm.variant != "no_rewind"), recorder]
    elif arm.method != "dense":
        raise ValueError(f"arm {arm.name!r}: method {arm.method!r} does not train in Lightning")
    sampler = ContinuingSampler(schedule.frequency)
    loader = DataLoader(StreamBatches(task), batch_size=None, sampler=sampler)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=task.steps,
        default_root_dir=root,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_s = time.perf_counter() - started
    if sampler.served != list(range(task.steps)) or trainer.global_step != task.steps:
        raise RuntimeError(
            f"{arm.name}: trained on batches {sampler.served[:3]}..{sampler.served[-3:]} "
            f"({trainer.global_step} steps), not 0..{task.steps - 1}"
        )
    net.eval()
    events: list[int] = []
    if arm.method == "ours":
        pruner = callbacks[0].pruner  # type: ignore[attr-defined]
        events = [e.step for e in pruner.events]
    elif recorder is not None:
        events = recorder.steps
    return Result(arm, seed, task.evaluate(net), measured_sparsity(layers), fit_s, events)

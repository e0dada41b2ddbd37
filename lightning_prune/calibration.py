"""One-shot pruning from calibration data, in plain PyTorch: Wanda's statistics, SparseGPT's
layer-by-layer reconstruction, and :func:`prune_once` for a trained model.

Prune a trained model once, without training::

    pruner = prune_once(model, loader, criterion="sparsegpt", pattern="2:4", target_sparsity=0.5,
                        calibration_batches=128)
    pruner.attach(optimizer)   # optional: fine-tune with the masks held after every step

How each criterion uses the batches (:func:`calibrate_and_prune`):

- one that needs activations (Wanda): one pass over the batches inside
  :meth:`Pruner.calibrating`, then the usual score -> select -> commit event;
- one that ``reconstructs`` (SparseGPT): the targets in the order the model calls them, each from
  its own pass over the batches, so that its inputs come through the layers already pruned.
  Targets that take the same input tensor (q, k and v projections; gate and up) share one pass
  and one statistic; a pass stops at the first such layer, so the work is about half a forward
  pass over the batches per group of layers. Only one layer's statistic (a Hessian of
  ``in_features^2`` floats) exists at a time;
- magnitude: nothing to calibrate; it prunes at once.

Under DDP every rank runs this on its own batches: statistics are summed over the ranks, and rank
0's corrected weights and masks are kept on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_prune.checks import check_int
from lightning_prune.criteria import ReconstructingCriterion
from lightning_prune.messages import info
from lightning_prune.options import PruningOptions
from lightning_prune.pruner import Pruner, PruningEvent, broadcast_from_rank_zero, sum_across_ranks
from lightning_prune.schedules import Schedule
from lightning_prune.targets import Target

#: Runs one calibration batch through the model: ``run(index, batch)``.
Run = Callable[[int, Any], Any]
#: A user's way to run a batch through the model: ``forward(model, batch)``.
Forward = Callable[[nn.Module, Any], Any]


def prune_once(
    model: nn.Module,
    data: Iterable[Any] | None,
    options: PruningOptions | None = None,
    *,
    calibration_batches: int | None = None,
    forward: Forward | None = None,
    **kwargs: Any,
) -> Pruner:
    """Prune a trained ``model`` once, now, from calibration batches: no training step.

    Args:
        model: the trained network; its weights are pruned (and, for SparseGPT, corrected) in place.
        data: calibration batches (a ``DataLoader`` or any iterable); ``None`` for a criterion that
            needs none (magnitude).
        options: what to prune and how; or give :class:`PruningOptions`' arguments as keywords
            (``criterion="wanda", pattern="2:4", target_sparsity=0.5``).
        calibration_batches: how many batches of ``data`` to use; ``None`` takes the criterion's
            ``init_batches`` (128 for Wanda and SparseGPT). Fewer are used if ``data`` ends first.
        forward: runs one batch through the model, ``forward(model, batch)``; by default
            ``model(batch)``, ``model(batch[0])`` for ``(input, target)`` pairs and
            ``model(**batch)`` for mappings, with the batch moved to the model's device.
        **kwargs: :class:`PruningOptions` arguments, when ``options`` is not given.

    Returns:
        The :class:`Pruner` holding the masks, its one event at step 0. Attach it to an optimizer to
        fine-tune with the masks held; its ``state_dict`` checkpoints them.

    Raises:
        ValueError: a gradient criterion, both ``options`` and keywords, or no calibration batch for
            a criterion that needs them; before anything is pruned.
    """
    if options is not None and kwargs:
        raise ValueError(f"give PruningOptions or its arguments as keywords, not both (got {sorted(kwargs)})")
    options = options if options is not None else PruningOptions(**kwargs)
    criterion = options.criterion
    if criterion.needs_gradients:
        raise ValueError(
            f"criterion {criterion.name!r} scores from gradients, which prune_once does not compute; use "
            "'magnitude', 'wanda' or 'sparsegpt', or prune while training with PruningCallback or Pruner.attach"
        )
    pruner = Pruner(model, Schedule(0, 0), options)
    batches = [] if data is None else take_batches(data, calibration_count(pruner, calibration_batches))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    run_one = forward if forward is not None else default_forward

    def run(index: int, batch: Any) -> Any:
        return run_one(model, move_to(batch, device))

    calibrate_and_prune(pruner, batches, run, model=model)
    return pruner


def calibrate_and_prune(
    pruner: Pruner,
    batches: Sequence[Any],
    run: Run,
    sparsity: float | None = None,
    *,
    model: nn.Module | None = None,
) -> PruningEvent | None:
    """Prune ``pruner``'s targets once, now, from ``batches`` (the seam every one-shot path uses).

    Args:
        pruner: the engine; its criterion decides how the batches are used (module docstring).
        batches: the calibration batches, as ``run`` takes them.
        run: ``run(index, batch)`` runs one batch through the model (under ``torch.no_grad()``).
        sparsity: the sparsity to reach; ``None`` is what the pruner's schedule asks for now.
        model: the model to put in eval mode while calibrating (dropout off); its modules' own
            modes come back afterwards. ``None``: each target's module and nothing else.

    Returns:
        The event, or ``None`` when nothing is due.

    Raises:
        ValueError: when the criterion needs calibration batches and there are none.
        RuntimeError: when a target is never called by the model on the first batch.
    """
    sparsity = pruner.due_sparsity() if sparsity is None else sparsity
    if sparsity is None:
        return None
    criterion = pruner.options.criterion
    calibrates = criterion.calibrates
    if calibrates and not batches:
        raise ValueError(
            f"criterion {criterion.name!r} prunes from calibration data, but no calibration batch was given"
        )
    started = time.perf_counter()
    modules = [model] if model is not None else [t.module for t in pruner.targets]
    with eval_mode(modules), torch.no_grad():
        if criterion.reconstructs:
            assert isinstance(criterion, ReconstructingCriterion)
            return _reconstruct_in_order(pruner, criterion, batches, run, sparsity)
        if calibrates:
            with pruner.calibrating():
                for index, batch in enumerate(batches):
                    run(index, batch)
            info(
                f"lightning_prune: {criterion.name}: calibrated on {len(batches)} batches in "
                f"{time.perf_counter() - started:.1f} s"
            )
    scoring = time.perf_counter()
    event = pruner.prune(sparsity)
    info(
        f"lightning_prune: {criterion.name}: pruned {len(pruner.targets)} layers to sparsity "
        f"{event.sparsity:.4f} in {time.perf_counter() - scoring:.1f} s"
    )
    return event


def calibration_count(pruner: Pruner, calibration_batches: int | None) -> int:
    """How many batches to calibrate on: ``calibration_batches``, else the criterion's ``init_batches``."""
    criterion = pruner.options.criterion
    count = check_int(
        "calibration_batches", calibration_batches, minimum=1, none_means="the criterion's init_batches"
    )
    if not criterion.calibrates:
        return 0
    return int(getattr(criterion, "init_batches", 128)) if count is None else count


def take_batches(data: Iterable[Any], count: int) -> list[Any]:
    """The first ``count`` batches of ``data`` (all of them if it has fewer; says so)."""
    batches: list[Any] = []
    if count > 0:
        for batch in data:
            batches.append(batch)
            if len(batches) == count:
                break
    if 0 < len(batches) < count:
        info(
            f"lightning_prune: calibrating on the {len(batches)} batches there are, fewer than the {count} asked"
        )
    return batches


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(batch[0])`` for an ``(input, target)`` sequence,
    else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(batch[0])
    return model(batch)


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it on ``device`` (mappings, lists and tuples followed)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: move_to(value, device) for key, value in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, list | tuple) and not hasattr(batch, "_fields"):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


@contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every module under ``modules`` in eval mode inside (no dropout noise in the statistics); each
    gets its own mode back afterwards."""
    modes = {id(m): (m, m.training) for root in modules for m in root.modules()}
    for module, _ in modes.values():
        module.training = False
    try:
        yield
    finally:
        for module, training in modes.values():
            module.training = training


# ---------------------------------------------------------------------------- SparseGPT's order
class _Stop(Exception):
    """Ends a calibration pass once the layer being calibrated has seen its inputs."""


def _call_order(pruner: Pruner, batch: Any, run: Run) -> tuple[list[list[int]], bool]:
    """The targets in the order the model calls them on ``batch``, grouped where consecutive
    targets take the very same input tensor; and whether each is called exactly once."""
    by_module = {id(t.module): index for index, t in enumerate(pruner.targets)}
    calls: list[tuple[int, Tensor]] = []

    def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        calls.append((by_module[id(module)], inputs[0]))

    handles = [t.module.register_forward_pre_hook(record) for t in pruner.targets]
    try:
        run(0, batch)
    finally:
        for handle in handles:
            handle.remove()
    called = [index for index, _ in calls]
    missing = [t.name for index, t in enumerate(pruner.targets) if index not in called]
    if missing:
        raise RuntimeError(
            f"criterion {pruner.options.criterion.name!r}: the model did not call {missing} on the first "
            "calibration batch, so they cannot be calibrated; exclude them"
        )
    once = len(called) == len(set(called))
    if not once:  # a layer applied twice: no early stop, one target at a time, every call observed
        return [[index] for index in dict.fromkeys(called)], False
    groups: list[list[int]] = []
    for position, (index, inputs) in enumerate(calls):
        if position and inputs is calls[position - 1][1]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups, True


def _layer_inputs(
    criterion: ReconstructingCriterion, target: Target, batches: Sequence[Any], run: Run, stop: bool
) -> Tensor:
    """``target``'s statistic over every batch, from inputs through the layers pruned so far; each
    pass ends at ``target`` when ``stop`` (nothing after it is needed)."""
    state = criterion.layer_state(target)

    def observe(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        criterion.observe(state, target, inputs)
        if stop:
            raise _Stop

    handle = target.module.register_forward_pre_hook(observe)
    try:
        for index, batch in enumerate(batches):
            with suppress(_Stop):
                run(index, batch)
    finally:
        handle.remove()
    return state


def _reconstruct_in_order(
    pruner: Pruner, criterion: ReconstructingCriterion, batches: Sequence[Any], run: Run, sparsity: float
) -> PruningEvent:
    started = time.perf_counter()
    groups, stop = _call_order(pruner, batches[0], run)
    pattern = pruner.options.pattern
    keeps: list[Tensor] = [mask.clone() for mask in pruner.masks]
    total, done = len(pruner.targets), 0
    for group in groups:
        begun = time.perf_counter()
        state = _layer_inputs(criterion, pruner.targets[group[0]], batches, run, stop)
        sum_across_ranks([state])
        gathered = time.perf_counter() - begun
        for index in group:
            solving = time.perf_counter()
            target = pruner.targets[index]
            keep = criterion.reconstruct(
                state, target, target.layout.to_standard(keeps[index]), sparsity, pattern
            )
            keeps[index] = target.layout.from_standard(keep).contiguous() & keeps[index]
            # Rank 0's weights on every rank: the next layers' inputs then agree too.
            broadcast_from_rank_zero([keeps[index]])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(target.param.data, src=0)
            done += 1
            out, columns = keep.shape
            info(
                f"lightning_prune: {criterion.name} {done}/{total} {target.name} ({out}x{columns}): "
                f"inputs {gathered:.2f} s{' (shared)' if index != group[0] else ''}, "
                f"solve {time.perf_counter() - solving:.2f} s"
            )
        del state
    event = pruner.commit_masks(keeps, sparsity)
    info(
        f"lightning_prune: {criterion.name}: {total} layers in {len(groups)} passes over {len(batches)} "
        f"batches to sparsity {event.sparsity:.4f} in {time.perf_counter() - started:.1f} s"
    )
    return event

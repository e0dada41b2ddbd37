"""The Pruner: targets, masks, scores and the step counter. Knows nothing of Lightning.

Use it from a plain PyTorch loop::

    pruner = Pruner(model, Schedule(start_step=0, end_step=1000, frequency=50),
                    PruningOptions(target_sparsity=0.9, pattern="4x1"))
    pruner.attach(optimizer)      # counts real steps, prunes on schedule, re-applies masks
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_prune.allocation import select_by_allocation
from lightning_prune.coupled import CoupledLayers, CoupledPattern
from lightning_prune.masking import OptimizerTargets, step_mask, zero_pruned
from lightning_prune.messages import info, warn
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import Pattern
from lightning_prune.progressive import Fade, plan_fade, resolve_steps
from lightning_prune.regrowth import regrow_at_event
from lightning_prune.rewind import Rewind
from lightning_prune.schedules import Schedule
from lightning_prune.sharding import ShardPlan, is_sharded, local, local_with_grad, plan_shards
from lightning_prune.state import STATE_VERSION, check_couplings, check_header, check_state, compare_settings
from lightning_prune.targets import Target, select_targets
from lightning_prune.thresholds import LayerGroups

#: Why a selected layer is left dense after all (see ``Pruner.left_out``).
UNTILED = "the pattern cannot tile it"
FROZEN = "frozen (requires_grad=False) under a gradient criterion"
UNSUPPORTED = "the criterion cannot score it"
#: Events over at least this many weights report their progress (about a second's work on a CPU).
PROGRESS_MIN_WEIGHTS = 50_000_000


def broadcast_from_rank_zero(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` (bool or uint8) on every rank with rank 0's, in one collective.

    Scores come from synchronised gradients and identical weights, so ranks should agree anyway;
    broadcasting makes it certain whatever nondeterminism (ties, atomics, kernels) there is.
    """
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
    dist.broadcast(flat, src=0)
    for tensor, chunk in zip(tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True):
        tensor.copy_(chunk.view(tensor.dtype).view(tensor.shape))


def sum_across_ranks(tensors: list[Tensor]) -> None:
    """Replace ``tensors`` on every rank by their sum over the ranks, one collective per dtype.

    Calibration statistics (Wanda's sums of squares, SparseGPT's Hessians) are sums over the
    batches each rank saw; adding them up gives every rank the statistics of all the batches.
    """
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat)
        for tensor, chunk in zip(same, torch.split(flat, [t.numel() for t in same]), strict=True):
            tensor.copy_(chunk.view(tensor.shape))


def tiling_error(pattern: Pattern, target: Target, max_sparsity: float = 1.0) -> str | None:
    """Why ``pattern`` cannot serve ``target`` in its layout, or ``None`` when it can.

    Stacked projections (q, k, v rows) must each be tiled on their own, and a layer whose smallest
    group is more than ``max_sparsity`` of it (whole input channels of a depthwise convolution,
    where one channel is the whole filter) could never lose a group.
    """
    shape = torch.Size(target.layout.block_shape(tuple(target.param.shape)))
    reason = pattern.tiling_error(shape)
    if reason is None and shape.numel() and pattern.group_size(shape) / shape.numel() > max_sparsity:
        share = pattern.group_size(shape) / shape.numel()
        reason = (
            f"pattern {str(pattern)!r} groups weight shape {tuple(target.param.shape)} ({target.layout.name}) "
            f"so that one group is {share:.0%} of it, above max_sparsity_per_layer={max_sparsity}: "
            "no group of it could ever be pruned"
        )
    return reason


def _silent(message: str) -> None:
    """Small events say nothing."""


@dataclass(frozen=True)
class PruningEvent:
    """What one pruning event did.

    Args:
        step: optimizer steps taken when it happened.
        target_sparsity: sparsity the schedule asked for.
        sparsity: sparsity of the masks it set, over all targets (under progressive pruning the
            weights reach it when the fade ends).
        layer_sparsity: the same per target, by module name.
    """

    step: int
    target_sparsity: float
    sparsity: float
    layer_sparsity: dict[str, float]


class Pruner:
    """Prunes ``model`` in place on a schedule; masks are bool and applied after every real step.

    Args:
        model: the network whose weights are pruned.
        schedule: when events happen and how sparsity rises.
        options: what to prune and how; defaults to :class:`PruningOptions` ``()``.

    Raises:
        ValueError: when the options select no layer, or no selected layer can take the pattern.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, options: PruningOptions | None = None) -> None:
        self.options = options or PruningOptions()
        self.schedule = schedule
        pattern = self.options.pattern
        selection = select_targets(
            model,
            include=self.options.include,
            exclude=self.options.exclude,
            op_types=self.options.op_types,
            skip_last_layer=self.options.skip_last_layer,
            skip_embeddings=self.options.skip_embeddings,
        )
        #: Every weight of 2 or more dims that is not a target: ``name -> (numel, reason)``.
        self.left_out: dict[str, tuple[int, str]] = dict(selection.left_out)
        #: Layers left dense because the pattern cannot tile them, with the reason.
        self.skipped: dict[str, str] = {}
        self.targets: list[Target] = []
        for target in selection.targets:
            reason = tiling_error(pattern, target, self.options.max_sparsity_per_layer)
            if reason is None:
                self.targets.append(target)
            else:
                self.skipped[target.name] = reason
                self.left_out[target.name] = (target.param.numel(), UNTILED)
        if self.skipped:
            warn(
                f"lightning_prune leaves {len(self.skipped)} layer(s) dense because pattern {str(pattern)!r} "
                f"cannot tile them: {self.skipped}. Exclude them or pick another pattern to silence this."
            )
        if not self.targets:
            raise ValueError(f"pattern {str(pattern)!r} cannot tile any selected layer: {self.skipped}")
        criterion = self.options.criterion
        self.targets = self._scorable(self.targets)
        if criterion.needs_gradients:
            self.targets = self._without_frozen(self.targets)
        #: Heads or FFN units spanning several targets (a coupled pattern), or ``None``.
        self.coupled: CoupledLayers | None = None
        if isinstance(pattern, CoupledPattern):
            self.coupled = pattern.couple(model, self.targets, self.left_out)
            self.targets = self.coupled.targets
        #: How the targets' rows are split over the ranks under FSDP2 (``sharding.py``), or ``None``.
        self.shards: ShardPlan | None = plan_shards(self.targets, pattern, self.options)
        # Masks, step masks and score buffers of a sharded weight hold this rank's rows only.
        self.masks: list[Tensor] = [torch.ones_like(local(t.param), dtype=torch.bool) for t in self.targets]
        # What the step hook multiplies by (see masking.py): the mask, or on CPU a 0/1 integer copy.
        self._step_masks: list[Tensor] = [
            step_mask(local(t.param), m) for t, m in zip(self.targets, self.masks, strict=True)
        ]
        states = [criterion.init_state(t) for t in self.targets]
        # A state the criterion built from a sharded weight is split by rows like it.
        self._row_buffers = [state is not None and is_sharded(state) for state in states]
        #: The criterion's state per target (accumulated scores, activation statistics), or ``None``.
        self.buffers: list[Tensor | None] = [None if state is None else local(state) for state in states]
        #: Real optimizer steps taken (steps skipped by an AMP gradient scaler do not count).
        self.step = 0
        #: Every event so far, oldest first.
        self.events: list[PruningEvent] = []
        #: Steps whose gradients reached the criterion (gradient criteria need at least one).
        self.gradient_steps = 0
        #: Forward calls the criterion observed while calibrating (activation criteria need one).
        self.calibration_calls = 0
        progressive = self.options.progressive
        if progressive is not None:
            progressive = resolve_steps(progressive, None if schedule.one_shot else schedule.frequency)
        #: The fade settings in force, with the default length resolved against the schedule.
        self.progressive = progressive
        steps = None if progressive is None else progressive.steps
        if steps is not None and not schedule.one_shot and steps > schedule.frequency:
            raise ValueError(
                f"progressive steps={steps} is more than frequency={schedule.frequency}: a fade "
                "must end before the next event; lower the steps or raise the frequency"
            )
        #: A progressive fade under way, or ``None``.
        self.fade: Fade | None = None
        #: Where kept weights go back to after each event (``options.rewind``), or ``None``.
        self.rewind = self._rewind(schedule)
        self._handles: list[RemovableHandle] = []

    def _rewind(self, schedule: Schedule) -> Rewind | None:
        step = self.options.rewind
        if step is None:
            return None
        events = schedule.event_steps()
        if events and step > events[0]:
            raise ValueError(
                f"rewind={step} comes after the first pruning event (step {events[0]}): the weights to "
                "rewind to would not exist yet; rewind to a step at or before it"
            )
        rewind = Rewind(step, self.options.rewind_resample, self.options.rewind_events)
        rewind.check_targets(self.targets)
        return rewind

    def _scorable(self, targets: list[Target]) -> list[Target]:
        criterion = self.options.criterion
        reasons = {t.name: reason for t in targets if (reason := criterion.supports(t)) is not None}
        if len(reasons) == len(targets):
            raise ValueError(f"criterion {criterion.name!r} can score none of the selected layers: {reasons}")
        if reasons:
            warn(f"lightning_prune: criterion {criterion.name!r} cannot score {reasons}: they stay dense")
        for target in targets:
            if target.name in reasons:
                self.left_out[target.name] = (target.param.numel(), UNSUPPORTED)
        return [t for t in targets if t.name not in reasons]

    def _without_frozen(self, targets: list[Target]) -> list[Target]:
        # A gradient criterion would score a frozen weight 0 and prune it to the per-layer cap.
        name = self.options.criterion.name
        frozen = [t.name for t in targets if not t.param.requires_grad]
        if len(frozen) == len(targets):
            raise ValueError(
                f"criterion {name!r} needs gradients, but every target has requires_grad=False: {frozen}; "
                "unfreeze them, or use criterion='magnitude'"
            )
        if frozen:
            warn(
                f"lightning_prune: criterion {name!r} scores from gradients, which {frozen} never get "
                "(requires_grad=False): they stay dense for this run. Unfreeze them before fit, exclude "
                "them to silence this, or use criterion='magnitude' to prune them too"
            )
        for target in targets:
            if not target.param.requires_grad:
                self.left_out[target.name] = (target.param.numel(), FROZEN)
        return [t for t in targets if t.param.requires_grad]

    def left_out_share(self) -> float:
        """Fraction of the model's weights of 2 or more dims (each tensor once) that are not pruned."""
        left = sum(numel for numel, _ in self.left_out.values())
        total = left + sum(t.param.numel() for t in self.targets)
        return left / total if total else 0.0

    def start_at(self, step: int) -> None:
        """Count from ``step``: the optimizer already took that many steps, without pruning state.

        The next :meth:`attach` (or :meth:`prune_if_due`) then catches up at once with the sparsity
        the schedule asks for at ``step``, and the schedule goes on from there.
        """
        if self.events:
            raise RuntimeError("start_at is for a pruner without history; it has pruned already")
        rewind = self.rewind
        if rewind is not None and not rewind.resample and step > rewind.step:
            raise ValueError(
                f"rewind={rewind.step} needs the weights of step {rewind.step}, but this run starts at step "
                f"{step} without pruning state to take them from; resume from a checkpoint saved with "
                "the same settings, or rewind to a later step"
            )
        self.step = int(step)

    def due_sparsity(self) -> float | None:
        """The sparsity an event at the current step must reach now, or ``None`` when none is due.

        An event is due on a schedule step it has not run yet, and also to catch up when the
        schedule asks for more than the last event reached (a run started mid-schedule).
        """
        if self.events and self.events[-1].step == self.step:
            return None
        target = self.schedule.sparsity_at(self.step, self.options.target_sparsity)
        reached = self.events[-1].target_sparsity if self.events else 0.0
        if self.schedule.is_event(self.step) or target > reached + 1e-12:
            return target
        return None

    # ------------------------------------------------------------------ the training loop
    def attach(self, optimizer: Optimizer, *, accumulate_before_step: bool = True) -> None:
        """Hook ``optimizer`` so that each real step is counted, pruned on schedule and re-masked.

        Call once per optimizer. A due event at the current step (a one-shot at step 0) runs now.

        Args:
            optimizer: an optimizer over (some of) the model's parameters.
            accumulate_before_step: let gradient criteria read gradients in a step pre-hook. Turn
                off when the caller feeds :meth:`accumulate_scores` itself (the Lightning callback
                does, because with a closure the gradients only exist inside ``step``).
        """
        owned = OptimizerTargets(optimizer, {id(t.param): i for i, t in enumerate(self.targets)})

        def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
            self._after_step(owned.current())

        self._take_rewind_snapshot()
        self.prune_if_due()  # first, so that a refused event leaves no hook behind
        self._handles.append(optimizer.register_step_post_hook(after_step))
        if accumulate_before_step and self.options.criterion.needs_gradients:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.accumulate_scores()))

    def detach(self) -> None:
        """Remove every optimizer hook :meth:`attach` added; say so if the schedule did not finish.

        In a plain loop, call it when training ends: a run shorter than the schedule would otherwise
        end below the target without a word.
        """
        if self._handles and not self.finished:
            planned = self.schedule.event_steps()
            done = sum(1 for step in planned if step <= self.step)
            warn(
                f"lightning_prune: pruning stopped at step {self.step} with {done} of the schedule's "
                f"{len(planned)} events done, sparsity {self.sparsity:.3f} of target_sparsity="
                f"{self.options.target_sparsity}; the schedule runs to step {self.schedule.end_step} "
                "(train longer, or resume from a checkpoint to go on)"
            )
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def calibrating(self) -> Iterator[None]:
        """While inside, each target's module reports its inputs to the criterion.

        The forward hooks exist only inside this block, so training and inference run hook-free.
        For a criterion that needs no activations this does nothing. Run calibration batches
        through the model inside it (under ``torch.no_grad()`` if no gradients are wanted)::

            with pruner.calibrating(), torch.no_grad():
                for x, _ in calibration_loader:
                    model(x)

        Under DDP every rank must enter it: on leaving, what the ranks gathered inside is summed
        over them (one all-reduce), so that every rank scores from all ranks' batches.
        """
        criterion = self.options.criterion
        if not criterion.needs_activations:
            yield
            return
        # This session's statistics, summed over the ranks before they join the state: a state
        # already summed in an earlier session must not be counted once per rank.
        session = [criterion.init_state(target) for target in self.targets]
        handles = [
            target.module.register_forward_hook(self._observer(index, session[index]))
            for index, target in enumerate(self.targets)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        gathered = [
            (buffer, new) for buffer, new in zip(self.buffers, session, strict=True) if new is not None
        ]
        sum_across_ranks([new for _, new in gathered])
        for buffer, new in gathered:
            assert buffer is not None
            buffer.add_(new)

    def _observer(
        self, index: int, state: Tensor | None
    ) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        target = self.targets[index]

        def observe(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            self.options.criterion.observe(state, target, inputs)
            if index == 0:
                self.calibration_calls += 1

        return observe

    def before_step(self, optimizer: Optimizer, *, skips_non_finite: bool = False) -> None:
        """Fold this step's gradients into a gradient criterion's state, before ``optimizer.step()``.

        Args:
            optimizer: the optimizer about to step.
            skips_non_finite: an AMP gradient scaler will skip this step if any of the optimizer's
                gradients is not finite, pruned or not; then the others are checked too, and such a
                step adds nothing.
        """
        if not self.options.criterion.needs_gradients or self.finished:
            return
        others: list[Tensor] = []
        if skips_non_finite:
            targets = {id(t.param) for t in self.targets}
            others = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None and id(p) not in targets
            ]
        self.accumulate_scores(also_check=others)

    def accumulate_scores(self, also_check: Sequence[Tensor] = ()) -> None:
        """Fold the current gradients into the criterion's buffers (no-op for magnitude).

        A step with any non-finite gradient among the targets and ``also_check`` (pass the other
        gradients of the optimizer when an AMP scaler may skip the step for them) adds nothing; the
        check stays on the device, so it costs no host sync.
        """
        criterion = self.options.criterion
        if not criterion.needs_gradients or self.finished:
            return  # no event left to use the scores
        grads = [t.param.grad for t in self.targets if t.param.grad is not None]
        if not grads:
            return
        grads.extend(also_check)
        if self.shards is not None:
            grads = [local(g) for g in grads]
        with torch.no_grad():
            finite = torch.stack([g.isfinite().all() for g in grads]).all()
            if self.shards is not None:  # every rank skips the step, or none does
                finite = self.shards.collectives.all_true(finite)
            for target, buffer in zip(self.targets, self.buffers, strict=True):
                param = target.param if self.shards is None else local_with_grad(target.param)
                criterion.accumulate(buffer, param, finite.to(param.device))
        self.gradient_steps += 1

    def _after_step(self, owned: list[tuple[int, dict[str, Any]]]) -> PruningEvent | None:
        """Count one real step; regularize, advance a fade, prune if due, and re-apply the masks.

        Args:
            owned: ``(target index, param group)`` of each target the stepping optimizer updated.
        """
        self.step += 1
        self._take_rewind_snapshot()
        regularizer = self.options.regularizer
        if regularizer is not None and self.step <= self.schedule.end_step:
            for index, group in owned:
                target = self.targets[index]
                standard = target.layout.to_standard(target.param)
                regularizer.apply(standard, float(group["lr"]), self.options.pattern)
        fading = self.fade is not None
        if fading:
            self._advance_fade()  # applies every mask
        if self.schedule.is_event(self.step):
            return self.prune(self.schedule.sparsity_at(self.step, self.options.target_sparsity))
        if not fading:
            params = [self.targets[i].param for i, _ in owned]
            if self.shards is not None:
                params = [local(p) for p in params]
            zero_pruned(params, [self._step_masks[i] for i, _ in owned])
        return None

    def _take_rewind_snapshot(self) -> None:
        rewind = self.rewind
        if rewind is not None and not rewind.ready and self.step == rewind.step:
            rewind.take(self.targets)

    def prune_if_due(self) -> PruningEvent | None:
        """Run the event due at the current step (see :meth:`due_sparsity`), if any."""
        sparsity = self.due_sparsity()
        return None if sparsity is None else self.prune(sparsity)

    @property
    def finished(self) -> bool:
        """Whether the schedule's last event has run."""
        return bool(self.events) and self.events[-1].step >= self.schedule.end_step

    @property
    def fading(self) -> bool:
        """Whether a progressive fade is under way."""
        return self.fade is not None

    @torch.no_grad()
    def _advance_fade(self, *, finish: bool = False) -> None:
        assert self.fade is not None
        if finish:
            self.fade.finish(self.masks)
        else:
            self.fade.advance(self.masks)
        if self.fade.done:
            self.fade = None
        self.apply_masks()

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune(self, sparsity: float) -> PruningEvent:
        """Raise the targets to ``sparsity`` now: score -> select -> commit.

        Masks only grow: weights pruned earlier are ranked below every live weight.
        """
        self._check_scores_exist()
        if self.fade is not None:  # a short last interval: finish the previous fade first
            self._advance_fade(finish=True)
        weights = sum(m.numel() for m in self.masks)
        started = time.perf_counter()
        say = info if weights >= PROGRESS_MIN_WEIGHTS else _silent

        def phase(what: str) -> None:
            say(f"lightning_prune: event at step {self.step}: {what} ({time.perf_counter() - started:.1f} s)")

        say(
            f"lightning_prune: event at step {self.step}: scoring {weights:,} weights in "
            f"{len(self.targets)} layers to sparsity {sparsity:.4f}"
        )
        layers, scores = self._score()
        phase("selecting groups")
        selected = select_by_allocation(self.options, layers, [score.shape for score, _ in scores], sparsity)
        if self.options.regrow:  # revive high-gradient groups before the last event (regrowth.py)
            selected = regrow_at_event(self.options, self.schedule, self.step, self.targets, layers, selected)
        phase("building masks")
        event = self._commit(sparsity, scores, selected)
        say(
            f"lightning_prune: event at step {self.step} done in {time.perf_counter() - started:.1f} s, "
            f"sparsity {event.sparsity:.4f}"
        )
        return event

    def _check_scores_exist(self) -> None:
        criterion = self.options.criterion
        if criterion.needs_gradients and self.gradient_steps == 0:
            raise RuntimeError(
                f"criterion {criterion.name!r} needs gradients, but the pruning event at step {self.step} "
                "came before any: score at least one backward pass first (the callback does this for "
                "events at step 0 with the criterion's init_batches), or start pruning at step >= 1"
            )
        if criterion.needs_activations and self.calibration_calls == 0:
            raise RuntimeError(
                f"criterion {criterion.name!r} scores from layer inputs, but the pruning event at step "
                f"{self.step} came before any calibration: run batches through the model inside "
                "`with pruner.calibrating():` first (the callback does this for events at the start of fit)"
            )

    def _score(self) -> tuple[list[LayerGroups], list[tuple[Tensor, torch.Size]]]:
        """Per target: its group costs for the selection, and its element scores in the standard layout."""
        pattern, criterion = self.options.pattern, self.options.criterion
        layers, scores = [], []
        shards = self.shards
        for index, (target, mask, buffer) in enumerate(
            zip(self.targets, self.masks, self.buffers, strict=True)
        ):
            score = criterion.score(buffer, local(target.param)).masked_fill_(~mask, float("-inf"))
            if bool(score.isnan().any()):  # a broken weight or score: prune it first, and say so
                warn(f"lightning_prune: {target.name} has NaN scores; those weights are pruned first")
                score.masked_fill_(score.isnan(), float("-inf"))
            standard = target.layout.to_standard(score)  # patterns read (out, in, *kernel)
            if self.coupled is not None:  # units span several targets: ranked per coupling below
                scores.append((standard, standard.shape))
                continue
            if shards is None:
                costs = pattern.group_costs(standard)
                rows = costs.shape[0] if costs.dim() > 1 else 1  # the "row" scope ranks each on its own
                layer = LayerGroups(costs.flatten(), pattern.group_size(standard.shape), score.numel(), rows)
            else:  # this rank's rows, with the whole layer's totals (sharding.py)
                costs, layer = shards.layer_groups(index, pattern, standard)
            layers.append(layer)
            scores.append((standard, costs.shape))
        if self.coupled is not None:
            layers = self.coupled.layer_groups([standard for standard, _ in scores])
        return layers, scores

    def _commit(
        self, sparsity: float, scores: list[tuple[Tensor, torch.Size]], selected: list[Tensor]
    ) -> PruningEvent:
        """Turn the selected groups into masks (or a fade), the same on every rank, and apply them."""
        pattern, progressive = self.options.pattern, self.progressive
        if self.coupled is not None:  # one selection per coupling, one mask per member weight
            keeps = self.coupled.keeps(selected, [score for score, _ in scores])
        else:
            keeps = [
                ~pattern.pruned_elements(pruned.view(group_shape), score)
                for (score, group_shape), pruned in zip(scores, selected, strict=True)
            ]
        # A sharded weight's keeps are this rank's rows, chosen from counts all ranks share.
        broadcast_from_rank_zero([k for i, k in enumerate(keeps) if not self._sharded(i)])
        stages, pruned_counts = [], []
        for target, mask, keep, (score, _) in zip(self.targets, self.masks, keeps, scores, strict=True):
            pruned_counts.append(keep.numel() - torch.count_nonzero(keep))
            layout = target.layout
            if progressive is None or progressive.steps == 1:
                mask.copy_(layout.from_standard(keep))
            else:
                stage = plan_fade(pattern, layout.to_standard(mask), keep, score, progressive)
                stages.append(layout.from_standard(stage).contiguous())
        broadcast_from_rank_zero(stages)
        if stages:
            assert progressive is not None and progressive.steps is not None
            self.fade = Fade(stages, progressive.steps)
            self._advance_fade()  # the event's own step is the fade's first
        for buffer in self.buffers:
            self.options.criterion.after_event(buffer)
        last = self.step >= self.schedule.end_step
        if self.rewind is not None and self.rewind.applies(first=not self.events, last=last):
            if not self.rewind.ready:
                raise RuntimeError(
                    f"rewind={self.rewind.step}: the event at step {self.step} has no weights of step "
                    f"{self.rewind.step} to rewind to; attach the pruner before training starts"
                )
            broadcast_from_rank_zero(self.rewind.restore(self.targets))  # resampled draws differ by rank
        self.apply_masks()
        # What the event decided; under a progressive fade the weights get there over the fade.
        counts = self._totals(torch.stack([c.cpu() for c in pruned_counts]).tolist())
        sizes = [t.param.numel() for t in self.targets]  # a DTensor's numel is the whole weight's
        layer_sparsity = {t.name: c / n for t, c, n in zip(self.targets, counts, sizes, strict=True)}
        event = PruningEvent(self.step, sparsity, sum(counts) / sum(sizes), layer_sparsity)
        self.events.append(event)
        return event

    @torch.no_grad()
    def commit_masks(self, keeps: list[Tensor], sparsity: float) -> PruningEvent:
        """Record an event whose masks were chosen elsewhere, by a criterion that ``reconstructs``
        (SparseGPT) and has written the corrected weights itself.

        Args:
            keeps: per target, in its stored layout, ``False`` where a weight is pruned (masks
                only grow: a weight pruned before stays pruned). Rank 0's are kept on every rank.
            sparsity: the sparsity the event was asked for.
        """
        broadcast_from_rank_zero(keeps)
        for mask, keep in zip(self.masks, keeps, strict=True):
            mask.logical_and_(keep)
        self.apply_masks()
        event = PruningEvent(self.step, sparsity, self.sparsity, self.layer_sparsity())
        self.events.append(event)
        return event

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight of every target in place (exact zeros, also where a weight is NaN)."""
        for target, per_step, mask in zip(self.targets, self._step_masks, self.masks, strict=True):
            if per_step is not mask:
                per_step.copy_(mask)
            local(target.param).masked_fill_(~mask, 0.0)

    def _sharded(self, index: int) -> bool:
        return self.shards is not None and self.shards.sharded(index)

    def _totals(self, counts: list[int]) -> list[int]:
        """Per-target counts over this rank's rows, summed over the ranks for sharded weights."""
        return counts if self.shards is None else self.shards.total_counts(counts)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights over all targets, from the masks (under FSDP2: on every rank)."""
        pruned = self._totals([m.numel() - int(torch.count_nonzero(m)) for m in self.masks])
        return sum(pruned) / sum(t.param.numel() for t in self.targets)

    @torch.no_grad()
    def weight_sparsity(self) -> tuple[float, dict[str, float]]:
        """Fraction of zeros in the targets' weights, overall and by module name.

        Counted from the weights, not the masks: under a progressive fade the weights reach an
        event's masks over the fade, and a weight can be zero without being pruned.
        """
        device = self.masks[0].device
        counts = [(local(t.param) == 0).sum().to(device) for t in self.targets]
        zeros = self._totals(torch.stack(counts).tolist())  # one sync
        sizes = [t.param.numel() for t in self.targets]
        layers = {t.name: z / n for t, z, n in zip(self.targets, zeros, sizes, strict=True)}
        return sum(zeros) / sum(sizes), layers

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned weights per target, by module name, from the masks."""
        kept = torch.stack([torch.count_nonzero(m).cpu() for m in self.masks]).tolist()
        pruned = self._totals([m.numel() - k for m, k in zip(self.masks, kept, strict=True)])
        return {t.name: p / t.param.numel() for t, p in zip(self.targets, pruned, strict=True)}

    # ------------------------------------------------------------------ checkpointing
    def settings(self) -> dict[str, str]:
        """What decides which weights end up pruned, as text; saved with the state, compared on resume.

        Target selection (include, exclude, op_types, skip_last_layer) is not here: the targets
        themselves are compared, by name.
        """
        return {**self.options.settings(), "progressive": repr(self.progressive)}

    def state_dict(self) -> dict[str, Any]:
        """Masks, score buffers, step, events and the settings: all that an exact resume needs."""
        names = [t.name for t in self.targets]
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "pattern": str(self.options.pattern),
            "options": self.settings(),
            "schedule": asdict(self.schedule),
            "masks": dict(zip(names, self._whole(self.masks, [True] * len(names)), strict=True)),
            "buffers": dict(zip(names, self._whole(self.buffers, self._row_buffers), strict=True)),
            "events": [asdict(e) for e in self.events],
            "gradient_steps": self.gradient_steps,
            "calibration_calls": self.calibration_calls,
            "fade": None if self.fade is None else self.fade.state_dict(names),
            "rewind": None if self.rewind is None else self.rewind.state_dict(names),
            "couplings": None if self.coupled is None else self.coupled.describe(),
        }

    def _whole(self, tensors: Sequence[Tensor | None], by_rows: Sequence[bool]) -> list[Tensor | None]:
        """Masks or buffers with the rows of every rank, for the checkpoint (under FSDP2, a collective:
        every rank gathers, so a state saved on any number of ranks loads on any other).

        Args:
            tensors: one per target.
            by_rows: per target, whether its tensor holds the weight's local rows (masks do; a
                criterion's state does when it was built from the sharded weight).
        """
        shards = self.shards
        if shards is None:
            return list(tensors)
        return [
            shards.gather(index, tensor) if tensor is not None and rows and shards.sharded(index) else tensor
            for index, (tensor, rows) in enumerate(zip(tensors, by_rows, strict=True))
        ]

    def _whole_buffer_shapes(self) -> list[Tensor | None]:
        """Stand-ins with the whole weights' buffer shapes, for checking a saved state."""
        shapes: list[Tensor | None] = []
        for target, buffer, by_rows in zip(self.targets, self.buffers, self._row_buffers, strict=True):
            if buffer is not None and by_rows:
                shape = (target.param.shape[0], *buffer.shape[1:])
                buffer = torch.empty(shape, dtype=buffer.dtype, device="meta")
            shapes.append(buffer)
        return shapes

    def _own_rows(self, index: int, whole: Tensor, by_rows: bool) -> Tensor:
        shards = self.shards
        if shards is None or not shards.sharded(index) or not by_rows:
            return whole
        return shards.rows_of(index, whole)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output and re-apply the masks to the weights.

        Everything is checked before anything is applied.

        Raises:
            ValueError: when the state does not fit this Pruner (another version, targets, shapes or
                dtypes, a step behind its own events) or was pruned with other settings; the message
                names the key or layer, what the state holds and what was expected.
        """
        names = [t.name for t in self.targets]
        check_header(state)  # settings first: a changed criterion explains a missing buffer
        if state["pattern"] != str(self.options.pattern):
            raise ValueError(
                f"the checkpoint was pruned with pattern {state['pattern']!r}, this run uses "
                f"{str(self.options.pattern)!r}; resume with the same pattern"
            )
        if "options" in state:
            compare_settings(state["options"], self.settings(), "pruning settings")
            saved = {key: repr(value) for key, value in dict(state["schedule"]).items()}
            current = {key: repr(value) for key, value in asdict(self.schedule).items()}
            compare_settings(saved, current, "schedule steps")
        else:
            warn(
                f"lightning_prune: this checkpoint's pruning state (version {state['version']}) did not "
                "record its settings: only the targets and the pattern could be checked against this run"
            )
        check_state(state, names, [t.param.shape for t in self.targets], self._whole_buffer_shapes())
        if self.coupled is not None:
            check_couplings(state.get("couplings"), self.coupled.describe())
            self.coupled.check_masks([state["masks"][name] for name in names])
        for index, (name, mask, buffer) in enumerate(zip(names, self.masks, self.buffers, strict=True)):
            mask.copy_(self._own_rows(index, state["masks"][name], True))
            if buffer is not None:
                buffer.copy_(self._own_rows(index, state["buffers"][name], self._row_buffers[index]))
        self.step = int(state["step"])
        self.events = [PruningEvent(**e) for e in state["events"]]
        self.gradient_steps = int(state.get("gradient_steps", 0))
        self.calibration_calls = int(state.get("calibration_calls", 0))
        fade = state.get("fade")
        self.fade = None if fade is None else Fade.from_state(fade, names, self.masks)
        if self.rewind is not None and state.get("rewind") is not None:
            self.rewind.load_state_dict(state["rewind"], names, self.targets)
        self.apply_masks()

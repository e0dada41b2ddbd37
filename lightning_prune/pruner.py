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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_prune.options import PruningOptions
from lightning_prune.progressive import interval_mask, plan_fade, resolve_steps
from lightning_prune.schedules import Schedule
from lightning_prune.targets import Target, select_targets
from lightning_prune.thresholds import LayerGroups, select_groups

STATE_VERSION = 1
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
    for tensor, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(chunk.view(tensor.dtype).view(tensor.shape))


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
        candidates = select_targets(
            model,
            include=self.options.include,
            exclude=self.options.exclude,
            op_types=self.options.op_types,
            skip_last_layer=self.options.skip_last_layer,
        )
        #: Layers left dense because the pattern cannot tile them, with the reason.
        self.skipped: dict[str, str] = {}
        self.targets: list[Target] = []
        for target in candidates:
            reason = pattern.tiling_error(target.param.shape)
            if reason is None:
                self.targets.append(target)
            else:
                self.skipped[target.name] = reason
        if self.skipped:
            rank_zero_warn(
                f"lightning_prune leaves {len(self.skipped)} layer(s) dense because pattern {str(pattern)!r} "
                f"cannot tile them: {self.skipped}. Exclude them or pick another pattern to silence this."
            )
        if not self.targets:
            raise ValueError(f"pattern {str(pattern)!r} cannot tile any selected layer: {self.skipped}")
        self.masks: list[Tensor] = [torch.ones_like(t.param, dtype=torch.bool) for t in self.targets]
        # What the step hook multiplies by. CPU kernels mixing bool and float run unvectorised (about
        # 20x slower than float * float, see benchmarks/RESULTS.md), so CPU weights get a copy of
        # their mask in their own dtype; elsewhere the bool mask itself is used.
        self._step_masks: list[Tensor] = [
            m if t.param.device.type != "cpu" else torch.ones_like(t.param)
            for t, m in zip(self.targets, self.masks, strict=True)
        ]
        criterion = self.options.criterion
        self.buffers: list[Tensor | None] = [criterion.init_buffer(t.param) for t in self.targets]
        #: Real optimizer steps taken (steps skipped by an AMP gradient scaler do not count).
        self.step = 0
        #: Every event so far, oldest first.
        self.events: list[PruningEvent] = []
        #: Steps whose gradients reached the criterion (gradient criteria need at least one).
        self.gradient_steps = 0
        progressive = self.options.progressive
        if progressive is not None:
            progressive = resolve_steps(progressive, None if schedule.one_shot else schedule.frequency)
        #: The fade settings in force, with the default length resolved against the schedule.
        self.progressive = progressive
        if progressive is not None and not schedule.one_shot and progressive.steps > schedule.frequency:
            raise ValueError(
                f"progressive steps={progressive.steps} is more than frequency={schedule.frequency}: a fade "
                "must end before the next event; lower the steps or raise the frequency"
            )
        # A fade under way: stage tensors (see progressive.py) and how many fade steps have passed.
        self._fade_stages: list[Tensor] | None = None
        self._fade_position = 0
        self._fade_steps = 0  # the plan's own length, so a resumed fade ends as planned
        self._handles: list[RemovableHandle] = []

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
        index = {id(t.param): i for i, t in enumerate(self.targets)}
        owned = [
            (index[id(p)], group)
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) in index
        ]
        params = [self.targets[i].param for i, _ in owned]
        masks = [self._step_masks[i] for i, _ in owned]
        groups = [group for _, group in owned]

        def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
            self.on_optimizer_step(params, masks, groups)

        self.prune_if_due()  # first, so that a refused event leaves no hook behind
        self._handles.append(optimizer.register_step_post_hook(after_step))
        if accumulate_before_step and self.options.criterion.needs_gradients:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.accumulate_scores()))

    def detach(self) -> None:
        """Remove every optimizer hook :meth:`attach` added."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

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
        with torch.no_grad():
            finite = torch.stack([g.isfinite().all() for g in [*grads, *also_check]]).all()
            for target, buffer in zip(self.targets, self.buffers, strict=True):
                criterion.accumulate(buffer, target.param, finite.to(target.param.device))
        self.gradient_steps += 1

    def on_optimizer_step(
        self, params: list[Tensor], masks: list[Tensor], param_groups: list[dict[str, Any]] | None = None
    ) -> PruningEvent | None:
        """Count one real step; regularize, advance a fade, prune if due, and re-apply the masks.

        Args:
            params: the targeted weights this optimizer updated.
            masks: their masks, in the same order.
            param_groups: their optimizer param groups (for the learning rate of a regularizer).
        """
        self.step += 1
        regularizer = self.options.regularizer
        if regularizer is not None and param_groups is not None and self.step <= self.schedule.end_step:
            for param, group in zip(params, param_groups, strict=True):
                regularizer.apply(param, float(group["lr"]), self.options.pattern)
        fading = self._fade_stages is not None
        if fading:
            self._advance_fade()  # applies every mask
        if self.schedule.is_event(self.step):
            return self.prune(self.schedule.sparsity_at(self.step, self.options.target_sparsity))
        if params and not fading:
            with torch.no_grad():
                torch._foreach_mul_(params, masks)
        return None

    def prune_if_due(self) -> PruningEvent | None:
        """Run the event due at the current step unless it already ran (e.g. before a resume)."""
        already_done = bool(self.events) and self.events[-1].step == self.step
        if self.schedule.is_event(self.step) and not already_done:
            return self.prune(self.schedule.sparsity_at(self.step, self.options.target_sparsity))
        return None

    @property
    def finished(self) -> bool:
        """Whether the schedule's last event has run."""
        return bool(self.events) and self.events[-1].step >= self.schedule.end_step

    @property
    def fading(self) -> bool:
        """Whether a progressive fade is under way."""
        return self._fade_stages is not None

    @torch.no_grad()
    def _advance_fade(self) -> None:
        assert self._fade_stages is not None
        self._fade_position = min(self._fade_position + 1, self._fade_steps)
        for stage, mask in zip(self._fade_stages, self.masks, strict=True):
            interval_mask(stage, self._fade_position, out=mask)
        if self._fade_position >= self._fade_steps:
            self._fade_stages = None
        self.apply_masks()

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune(self, sparsity: float) -> PruningEvent:
        """Raise the targets to ``sparsity`` now: scores -> pattern -> selection -> masks -> weights.

        Masks only grow: weights pruned earlier are ranked below every live weight.
        """
        pattern, criterion = self.options.pattern, self.options.criterion
        if criterion.needs_gradients and self.gradient_steps == 0:
            raise RuntimeError(
                f"criterion {criterion.name!r} needs gradients, but the pruning event at step {self.step} "
                "came before any: score at least one backward pass first (the callback does this for "
                "events at step 0 with the criterion's init_batches), or start pruning at step >= 1"
            )
        if self._fade_stages is not None:  # a short last interval: finish the previous fade first
            self._fade_position = self._fade_steps
            self._advance_fade()
        weights = sum(m.numel() for m in self.masks)
        started = time.perf_counter()
        say = rank_zero_info if weights >= PROGRESS_MIN_WEIGHTS else lambda message: None
        say(
            f"lightning_prune: event at step {self.step}: scoring {weights:,} weights in "
            f"{len(self.targets)} layers to sparsity {sparsity:.4f}"
        )
        layers, scores = [], []
        for target, mask, buffer in zip(self.targets, self.masks, self.buffers, strict=True):
            score = criterion.score(buffer, target.param).masked_fill_(~mask, float("-inf"))
            if bool(score.isnan().any()):  # a broken weight or score: prune it first, and say so
                rank_zero_warn(
                    f"lightning_prune: {target.name} has NaN scores; those weights are pruned first"
                )
                score.masked_fill_(score.isnan(), float("-inf"))
            costs = pattern.group_costs(score)
            layers.append(LayerGroups(costs.flatten(), pattern.group_size(score.shape), score.numel()))
            scores.append((score, costs.shape))
        say(
            f"lightning_prune: event at step {self.step}: selecting groups ({time.perf_counter() - started:.1f} s)"
        )
        selected = select_groups(
            layers,
            sparsity,
            self.options.scope,
            self.options.min_sparsity_per_layer,
            self.options.max_sparsity_per_layer,
        )
        say(
            f"lightning_prune: event at step {self.step}: building masks ({time.perf_counter() - started:.1f} s)"
        )
        progressive = self.progressive
        keeps = [
            ~pattern.pruned_elements(pruned.view(group_shape), score)
            for (score, group_shape), pruned in zip(scores, selected, strict=True)
        ]
        broadcast_from_rank_zero(keeps)
        stages, pruned_counts = [], []
        for mask, keep, (score, _) in zip(self.masks, keeps, scores, strict=True):
            pruned_counts.append(keep.numel() - torch.count_nonzero(keep))
            if progressive is None or progressive.steps == 1:
                mask.copy_(keep)
            else:
                stages.append(plan_fade(pattern, mask, keep, score, progressive))
        broadcast_from_rank_zero(stages)
        if stages:
            self._fade_stages, self._fade_position, self._fade_steps = stages, 0, progressive.steps
            self._advance_fade()  # the event's own step is the fade's first
        for buffer in self.buffers:
            criterion.after_event(buffer)
        self.apply_masks()
        # What the event decided; under a progressive fade the weights get there over the fade.
        counts = torch.stack([c.cpu() for c in pruned_counts]).tolist()
        sizes = [m.numel() for m in self.masks]
        layer_sparsity = {t.name: c / n for t, c, n in zip(self.targets, counts, sizes, strict=True)}
        event = PruningEvent(self.step, sparsity, sum(counts) / sum(sizes), layer_sparsity)
        self.events.append(event)
        say(
            f"lightning_prune: event at step {self.step} done in {time.perf_counter() - started:.1f} s, "
            f"sparsity {event.sparsity:.4f}"
        )
        return event

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight of every target in place (exact zeros, also where a weight is NaN)."""
        for target, step_mask, mask in zip(self.targets, self._step_masks, self.masks, strict=True):
            if step_mask is not mask:
                step_mask.copy_(mask)
            target.param.masked_fill_(~mask, 0.0)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights over all targets, from the masks."""
        pruned = sum(m.numel() - int(torch.count_nonzero(m)) for m in self.masks)
        return pruned / sum(m.numel() for m in self.masks)

    @torch.no_grad()
    def weight_sparsity(self) -> tuple[float, dict[str, float]]:
        """Fraction of zeros in the targets' weights, overall and by module name.

        Counted from the weights, not the masks: under a progressive fade the weights reach an
        event's masks over the fade, and a weight can be zero without being pruned.
        """
        device = self.targets[0].param.device
        zeros = torch.stack([(t.param == 0).sum().to(device) for t in self.targets]).tolist()  # one sync
        sizes = [t.param.numel() for t in self.targets]
        layers = {t.name: z / n for t, z, n in zip(self.targets, zeros, sizes, strict=True)}
        return sum(zeros) / sum(sizes), layers

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of pruned weights per target, by module name, from the masks."""
        kept = torch.stack([torch.count_nonzero(m).cpu() for m in self.masks]).tolist()
        pruned = [m.numel() - k for m, k in zip(self.masks, kept, strict=True)]
        return {t.name: p / m.numel() for t, m, p in zip(self.targets, self.masks, pruned, strict=True)}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Masks, score buffers, step and history: all that an exact resume needs."""
        names = [t.name for t in self.targets]
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "pattern": str(self.options.pattern),
            "masks": dict(zip(names, self.masks, strict=True)),
            "buffers": dict(zip(names, self.buffers, strict=True)),
            "events": [asdict(e) for e in self.events],
            "gradient_steps": self.gradient_steps,
            "fade": None
            if self._fade_stages is None
            else {
                "position": self._fade_position,
                "steps": self._fade_steps,
                "stages": dict(zip(names, self._fade_stages, strict=True)),
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output and re-apply the masks to the weights.

        Raises:
            ValueError: when the checkpoint's targets or pattern differ from this Pruner's.
        """
        names = [t.name for t in self.targets]
        saved = list(state["masks"])
        if saved != names:
            raise ValueError(
                "the checkpoint's pruning targets differ from this run's: "
                f"only in checkpoint {sorted(set(saved) - set(names))}, only in this run "
                f"{sorted(set(names) - set(saved))}; resume with the same model and include/exclude"
            )
        if state["pattern"] != str(self.options.pattern):
            raise ValueError(
                f"the checkpoint was pruned with pattern {state['pattern']!r}, this run uses "
                f"{str(self.options.pattern)!r}; resume with the same pattern"
            )
        for name, mask, buffer in zip(names, self.masks, self.buffers, strict=True):
            mask.copy_(state["masks"][name])
            if buffer is not None and state["buffers"][name] is not None:
                buffer.copy_(state["buffers"][name])
        self.step = int(state["step"])
        self.events = [PruningEvent(**e) for e in state["events"]]
        self.gradient_steps = int(state.get("gradient_steps", 0))
        fade = state.get("fade")
        if fade is None:
            self._fade_stages = None
        else:
            self._fade_position = int(fade["position"])
            self._fade_steps = int(fade["steps"])
            self._fade_stages = [
                fade["stages"][n].to(m.device) for n, m in zip(names, self.masks, strict=True)
            ]
        self.apply_masks()

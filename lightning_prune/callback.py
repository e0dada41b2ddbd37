"""PruningCallback: Lightning hooks -> Pruner calls, logging and checkpoint state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig
from torch.optim import Optimizer

from lightning_prune.config import PruningConfig, config_to_kwargs
from lightning_prune.criteria import Criterion
from lightning_prune.init_scoring import score_at_init
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import Pattern
from lightning_prune.progressive import Progressive
from lightning_prune.pruner import Pruner, PruningEvent
from lightning_prune.regularizers import Regularizer
from lightning_prune.schedules import check_curve, check_step_spec, is_known_length, resolve_schedule
from lightning_prune.targets import DEFAULT_OP_TYPES


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies that shard or wrap parameters, where masks on the local view would be wrong.

    Raises:
        ValueError: naming the strategy and the supported ones.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    # DeepSpeed and XLA subclass DDPStrategy but shard parameters or run without torch.distributed.
    refused = {"DeepSpeedStrategy", "XLAStrategy", "SingleDeviceXLAStrategy"}
    supported = isinstance(strategy, SingleDeviceStrategy | DDPStrategy) and not names & refused
    if not supported:
        raise ValueError(
            f"PruningCallback does not support strategy {type(strategy).__name__}: sharded parameters "
            "(FSDP, DeepSpeed, model parallel) are not pruned correctly yet. Supported: single device "
            "and DDP ('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook')"
        )


class PruningCallback(Callback):
    r"""Prune the model while it trains, raising sparsity on a schedule up to ``target_sparsity``.

    Masks are bool tensors applied in place after every real optimizer step, so the model keeps its
    plain forward and ``state_dict`` keys. Masks, scores, the step count and the event history are
    part of the callback's state and come back exactly when training resumes from a checkpoint.
    Every argument is checked here, before training, and a bad one raises ``ValueError`` naming it.

    Args:
        target_sparsity: final fraction of zeros among the targeted weights, in ``[0, 1)``.
        pattern: shape of the zeros: ``"1x1"`` (unstructured), ``"NxM"`` blocks of N output rows by M
            input columns (e.g. ``"4x1"``), ``"channelx1"`` (whole input channels), ``"1xchannel"``
            (whole output channels/filters), ``"N:M"`` (at most N non-zeros per M consecutive input
            weights, e.g. ``"2:4"``), or a ``Pattern`` object.
        criterion: how weights are scored: ``"magnitude"`` (|W|), ``"gradient"`` (|G|), ``"snip"``
            (|W*G|), ``"snip_momentum"`` (``S = 1.0*S + 0.9*|W*G|`` each step), ``"movement"``
            (``S -= W*G`` each step), or a ``Criterion`` object such as
            ``SnipMomentumCriterion(alpha=0.9, beta=1.0)``. Gradient criteria accumulate on every
            real optimizer step; an event at step 0 scores on ``init_batches`` batches first.
        start_step: optimizer step where sparsity starts to rise. An int is a step; a float in
            ``(0, 1]`` is that fraction of ``trainer.estimated_stepping_batches``; ``None`` is 0.
        end_step: optimizer step of the last event, where ``target_sparsity`` is reached. Same forms as
            ``start_step``; ``None`` is 3/4 of training, leaving the last quarter to fine-tune.
            ``end_step == start_step`` prunes once (one-shot); one-shot at 0 prunes before training.
        frequency: optimizer steps between events; ``None`` gives about 20 events in the window.
        sparsity_curve: how sparsity rises between events: ``"exp"``, ``"cos"``, ``"linear"``,
            ``"cube"`` or ``"agp"`` (Zhu & Gupta 2017).
        scope: ``"global"`` ranks all targets together (layers end at different sparsities);
            ``"local"`` prunes every layer to the same sparsity.
        include: regexes over qualified module names (``re.search``); only matching modules are pruned.
        exclude: regexes over qualified module names that are never pruned.
        op_types: module class names whose weights are pruned; subclasses count.
        skip_last_layer: leave the last matching module in registration order (the head) dense.
        min_sparsity_per_layer: least sparsity of any targeted layer (global scope).
        max_sparsity_per_layer: most sparsity of any targeted layer.
        progressive: for structured patterns, zero newly pruned groups gradually over the next
            steps instead of at once: ``True`` (4 steps, or ``frequency`` if fewer; lowest scores first) or a
            ``Progressive(steps=..., kind="scores" | "linear")``.
        regularizer: ``"group_lasso"`` shrinks the pattern's groups toward zero after each optimizer
            step up to ``end_step``, or a ``Regularizer`` object; ``None`` for none.
        regularizer_coeff: strength of a regularizer given by name (default ``1e-4``).
        verbose: print what is pruned at the start of fit.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_prune import PruningCallback
        >>> trainer = Trainer(callbacks=[PruningCallback(target_sparsity=0.9, pattern="4x1")])
    """

    def __init__(
        self,
        target_sparsity: float = 0.9,
        pattern: str | Pattern = "4x1",
        criterion: str | Criterion = "magnitude",
        start_step: int | float | None = None,
        end_step: int | float | None = None,
        frequency: int | None = None,
        sparsity_curve: str = "exp",
        scope: str = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        op_types: Sequence[str] = DEFAULT_OP_TYPES,
        skip_last_layer: bool = True,
        min_sparsity_per_layer: float = 0.0,
        max_sparsity_per_layer: float = 0.98,
        progressive: bool | Progressive = False,
        regularizer: str | Regularizer | None = None,
        regularizer_coeff: float | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.options = PruningOptions(
            target_sparsity=target_sparsity,
            pattern=pattern,  # type: ignore[arg-type]
            criterion=criterion,  # type: ignore[arg-type]
            scope=scope,
            include=include,  # type: ignore[arg-type]
            exclude=exclude,  # type: ignore[arg-type]
            op_types=op_types,  # type: ignore[arg-type]
            skip_last_layer=skip_last_layer,
            min_sparsity_per_layer=min_sparsity_per_layer,
            max_sparsity_per_layer=max_sparsity_per_layer,
            progressive=progressive,  # type: ignore[arg-type]
            regularizer=regularizer,  # type: ignore[arg-type]
            regularizer_coeff=regularizer_coeff,
        )
        self.start_step = check_step_spec("start_step", start_step)
        self.end_step = check_step_spec("end_step", end_step)
        same_kind = self.start_step is not None and type(self.start_step) is type(self.end_step)
        if same_kind and self.end_step < self.start_step:  # type: ignore[operator]
            raise ValueError(f"end_step={end_step!r} is before start_step={start_step!r}")
        if frequency is not None and (
            isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1
        ):
            raise ValueError(f"frequency={frequency!r} must be an int >= 1 or null (about 20 events)")
        self.frequency = frequency
        self.sparsity_curve = check_curve(sparsity_curve)
        if not isinstance(verbose, bool):
            raise ValueError(f"verbose={verbose!r} must be true or false")
        self.verbose = verbose
        #: The engine, built at the start of fit; ``None`` before.
        self.pruner: Pruner | None = None
        self._pending_state: dict[str, Any] | None = None
        self._logged_events = 0

    @classmethod
    def from_config(cls, config: PruningConfig | Mapping[str, Any] | DictConfig) -> PruningCallback:
        """Build the callback from a :class:`~lightning_prune.config.PruningConfig`, a dict or a ``DictConfig``.

        Unknown keys are an error that names them; values are type-checked by OmegaConf first.

        Example::

            >>> PruningCallback.from_config({"target_sparsity": 0.5, "pattern": "2:4"}).options.pattern
            NMPattern('2:4')
        """
        return cls(**config_to_kwargs(config))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            target_sparsity=self.options.target_sparsity,
            pattern=str(self.options.pattern),
            criterion=type(self.options.criterion).__name__,
        )

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer.strategy)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here the model is on its device and the optimizers exist; restored state may be waiting.
        total = trainer.estimated_stepping_batches
        schedule = resolve_schedule(
            self.start_step, self.end_step, self.frequency, self.sparsity_curve, total
        )
        # Manual optimization may step several optimizers per batch, which the estimate ignores.
        if pl_module.automatic_optimization and is_known_length(total) and schedule.end_step > total:
            rank_zero_warn(
                f"end_step resolves to step {schedule.end_step}, after this run's last step "
                f"({int(total)}): unless training resumes for longer, it ends "
                f"below target_sparsity={self.options.target_sparsity}"
            )
        self.pruner = Pruner(pl_module, schedule, self.options)
        if self._pending_state is not None:
            self.pruner.load_state_dict(self._pending_state)
            self._pending_state = None
        self._logged_events = len(self.pruner.events)
        if self.verbose:
            self._describe(self.pruner)
        if self.pruner.step == 0 and schedule.is_event(0) and self.options.criterion.needs_gradients:
            score_at_init(trainer, pl_module, self.pruner)
        for optimizer in trainer.optimizers:
            # Lightning's on_before_optimizer_step feeds gradient criteria: with a closure the
            # gradients only exist inside optimizer.step, after any pre-hook.
            self.pruner.attach(optimizer, accumulate_before_step=False)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.pruner is None or not self.options.criterion.needs_gradients or self.pruner.finished:
            return  # nothing to score (magnitude), or no event left to use the scores
        # A GradScaler skips the step if any of the optimizer's gradients is not finite, pruned or not;
        # the targets' own gradients are checked by the Pruner, so only the others are added here.
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            targets = {id(t.param) for t in self.pruner.targets}
            others = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None and id(p) not in targets
            ]
            self.pruner.accumulate_scores(also_check=others)
        else:
            self.pruner.accumulate_scores()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.pruner is None or len(self.pruner.events) == self._logged_events:
            return
        for event in self.pruner.events[self._logged_events :]:
            self._log_event(trainer, pl_module, event)
        self._logged_events = len(self.pruner.events)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.pruner is not None:
            self.pruner.detach()

    # ------------------------------------------------------------------ reporting
    def _log_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent) -> None:
        metrics = {"pruning/sparsity": event.sparsity, "pruning/target_sparsity": event.target_sparsity}
        metrics.update({f"pruning/sparsity/{name}": value for name, value in event.layer_sparsity.items()})
        # Straight to the loggers: self.log would drop events that miss `log_every_n_steps`.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=event.step)
        pl_module.log("sparsity", event.sparsity, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def _describe(self, pruner: Pruner) -> None:
        schedule = pruner.schedule
        weights = sum(t.param.numel() for t in pruner.targets)
        window = (
            f"one-shot at step {schedule.start_step}"
            if schedule.one_shot
            else f"steps {schedule.start_step}->{schedule.end_step} every {schedule.frequency} ({schedule.curve})"
        )
        rank_zero_info(
            f"lightning_prune: {len(pruner.targets)} layers ({weights:,} weights) to "
            f"{self.options.target_sparsity:.0%} with pattern {str(self.options.pattern)!r}, "
            f"criterion {self.options.criterion!r}, {self.options.scope} scope, {window}"
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.pruner is not None:
            return self.pruner.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.pruner is not None:
            self.pruner.load_state_dict(state_dict)
            self._logged_events = len(self.pruner.events)
        else:
            self._pending_state = state_dict

"""PruningCallback: Lightning hooks -> Pruner calls, logging and checkpoint state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig
from torch.optim import Optimizer

from lightning_prune.config import PruningConfig, config_to_kwargs
from lightning_prune.criteria import Criterion
from lightning_prune.files import write_atomically
from lightning_prune.history import EVENT, VALIDATION, PruningHistory
from lightning_prune.init_scoring import score_at_init
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import Pattern
from lightning_prune.plots import curve_figure, figure_png, figure_rgb
from lightning_prune.progressive import Progressive
from lightning_prune.pruner import Pruner, PruningEvent
from lightning_prune.regularizers import Regularizer
from lightning_prune.report import SparsityReport, sparsity_report
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


def _check_monitor(monitor: object) -> tuple[str, ...] | None:
    if monitor is None:
        return None
    names = [monitor] if isinstance(monitor, str) else monitor
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"monitor={monitor!r} must be a metric name, a list of metric names, or null for every "
            "metric logged during validation"
        )
    return tuple(names)


def _validation_metric_names(trainer: pl.Trainer) -> list[str]:
    """Names the model logged in the validation run that just ended, as ``callback_metrics`` keys."""
    # Lightning keeps no public list of which metrics came from validation; the running loop's
    # result collection has it. tests/test_reporting.py guards this against Lightning changes.
    results = trainer._results
    names = dict.fromkeys(result.meta.name for result in (results.values() if results is not None else []))
    return [name for name in names if name in trainer.callback_metrics]


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
            ``start_step``; ``None`` is 9/10 of training, leaving the last tenth to fine-tune.
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
        monitor: metrics to pair with the sparsity at every validation run, by the name they are
            logged under (``"val_acc"``, or a list); ``None`` takes every metric logged during
            validation, ``[]`` none. A name missing from the sanity check's validation warns (it may
            be a training metric); missing at a real validation, it fails naming what is logged.
        save_report: at the end of fit, write ``pruning/curve.csv``, ``pruning/curve.png`` and
            ``pruning/layers.csv`` under ``trainer.log_dir`` (rank 0) and add the figure to any
            ``TensorBoardLogger``.
        verbose: print what is pruned at the start of fit and the per-layer table at the end.

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
        monitor: str | list[str] | None = None,
        save_report: bool = True,
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
        self.monitor = _check_monitor(monitor)
        for key, value in (("save_report", save_report), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} must be true or false")
        self.save_report = save_report
        self.verbose = verbose
        #: Sparsity, target and monitored metrics at every event and validation run (kept on resume).
        self.history = PruningHistory()
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
            # A new fit starts a new history; a checkpoint restored after this brings its own back.
            self.history = PruningHistory()

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

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is None or trainer.state.fn != TrainerFn.FITTING:
            return
        available = trainer.callback_metrics
        missing = [name for name in self.monitor or () if name not in available]
        if missing and trainer.sanity_checking:
            # Training metrics are not logged yet at the sanity check, so a typo only warns here.
            rank_zero_warn(
                f"monitor={list(self.monitor or ())!r}: {missing} not logged in the sanity check's "
                f"validation (logged: {sorted(available)}); unless they are training metrics, "
                "fit fails at the first validation"
            )
        elif missing:
            raise ValueError(
                f"monitor={list(self.monitor or ())!r}: {missing} not among the logged metrics "
                f"{sorted(available)}; log them with self.log, or change monitor"
            )
        if trainer.sanity_checking:
            return  # the values of an untrained model's sanity check are not history
        names = _validation_metric_names(trainer) if self.monitor is None else self.monitor
        metrics = {}
        for name in names:
            value = available[name]
            if name.startswith("pruning/") or name == "sparsity" or value.numel() != 1:
                continue
            metrics[name] = float(value)
        sparsity, _ = self.pruner.weight_sparsity()
        target = self.pruner.events[-1].target_sparsity if self.pruner.events else 0.0
        self.history.add(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            source=VALIDATION,
            sparsity=sparsity,
            target_sparsity=target,
            metrics=metrics,
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {"pruning/sparsity": sparsity, "pruning/target_sparsity": target}, step=trainer.global_step
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is None or not (self.verbose or self.save_report):
            return
        report = self.layer_report(pl_module)
        if self.verbose:
            rank_zero_info(f"\n{report}")
        if not self.save_report:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "pruning"  # log_dir: every rank
        if not trainer.is_global_zero:
            return
        self.history.to_csv(str(folder / "curve.csv"))
        report.to_csv(str(folder / "layers.csv"))
        figure = curve_figure(self.history, title=f"{type(pl_module).__name__}: {self._summary()}")
        write_atomically(folder / "curve.png", figure_png(figure))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "pruning/curve", figure_rgb(figure), global_step=trainer.global_step, dataformats="HWC"
                )
                logger.experiment.flush()
        rank_zero_info(f"lightning_prune: wrote curve.csv, curve.png and layers.csv to {folder}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.pruner is not None:
            self.pruner.detach()

    def layer_report(self, model: pl.LightningModule) -> SparsityReport:
        """:func:`~lightning_prune.sparsity_report` of ``model``'s ``op_types`` layers, with the pattern
        of each targeted layer and why any other is dense (zeros counted from the weights)."""
        if self.pruner is None:
            raise RuntimeError("layer_report needs the pruner, which is built at the start of fit")
        targeted = {t.name for t in self.pruner.targets}
        report = sparsity_report(model, op_types=self.options.op_types)
        layers = []
        for layer in report.layers:
            if layer.name in targeted:
                pattern = str(self.options.pattern)
            elif layer.name in self.pruner.skipped:
                pattern = "dense (pattern does not tile)"
            else:
                pattern = "dense (not selected)"
            layers.append(replace(layer, pattern=pattern))
        return SparsityReport(tuple(layers))

    # ------------------------------------------------------------------ reporting
    def _log_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent) -> None:
        # Zeros in the weights: under a progressive fade they reach the event's masks step by step.
        sparsity, layers = self.pruner.weight_sparsity()  # type: ignore[union-attr]
        self.history.add(
            step=event.step,
            epoch=trainer.current_epoch,
            source=EVENT,
            sparsity=sparsity,
            target_sparsity=event.target_sparsity,
        )
        metrics = {"pruning/sparsity": sparsity, "pruning/target_sparsity": event.target_sparsity}
        metrics.update({f"pruning/sparsity/{name}": value for name, value in layers.items()})
        # Straight to the loggers: self.log would drop events that miss `log_every_n_steps`.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=event.step)
        pl_module.log("sparsity", sparsity, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def _summary(self) -> str:
        return (
            f"{self.options.target_sparsity:.0%} {str(self.options.pattern)!r}, "
            f"{self.options.criterion.name}, {self.sparsity_curve} curve"
        )

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
            return {**self.pruner.state_dict(), "history": self.history.state_dict()}
        return dict(self._pending_state or {}, history=self.history.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.history.load_state_dict(state_dict.pop("history", []))
        if "masks" not in state_dict:
            return  # saved before the pruner was built: nothing to restore but the history
        if self.pruner is not None:
            self.pruner.load_state_dict(state_dict)
            self._logged_events = len(self.pruner.events)
        else:
            self._pending_state = state_dict

"""PruningCallback: Lightning hooks -> Pruner calls, logging and checkpoint state."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig
from torch.optim import Optimizer

from lightning_prune.checks import check_int
from lightning_prune.config import PruningConfig, config_to_kwargs
from lightning_prune.criteria import Criterion
from lightning_prune.files import write_atomically
from lightning_prune.history import EVENT, VALIDATION, PruningHistory
from lightning_prune.init_scoring import score_at_init
from lightning_prune.lifecycle import (
    check_legacy_settings,
    check_state_step,
    choose_schedule,
    migrate_legacy_key,
    saved_schedule,
    steps_per_batch,
    total_steps,
)
from lightning_prune.lightning_internals import validation_metric_names
from lightning_prune.oneshot import check_one_shot, prune_from_calibration
from lightning_prune.options import PruningOptions
from lightning_prune.patterns import Pattern
from lightning_prune.progressive import Progressive
from lightning_prune.pruner import Pruner, PruningEvent
from lightning_prune.regularizers import Regularizer
from lightning_prune.report import SparsityReport, describe_left_out, sparsity_report
from lightning_prune.schedules import (
    Schedule,
    check_curve,
    check_initial_sparsity,
    check_step_spec,
    check_window,
    is_known_length,
    resolve_schedule,
)
from lightning_prune.state import compare_settings
from lightning_prune.targets import DEFAULT_OP_TYPES

#: How close (difflib ratio) a missing monitor name must be to a logged one to be called a typo.
TYPO_CUTOFF = 0.85
#: The key of the callback's state in a checkpoint; the same whatever the settings.
STATE_KEY = "PruningCallback"
#: What a callback's ``name`` may hold (it becomes part of a state key, metric names and a folder).
NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies whose weights the Pruner would see neither whole nor as FSDP2 row shards.

    ``ModelParallelStrategy`` passes here; the Pruner then checks each weight's placement (FSDP2's
    ``Shard(0)`` rows; tensor parallelism is refused there, naming the layer).

    Raises:
        ValueError: naming the strategy and the supported ones.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "FSDPStrategy" in names:
        raise ValueError(
            "PruningCallback does not support strategy FSDPStrategy (FSDP1): its flat parameters hide each weight's "
            "rows from the masks. Use FSDP2 instead: ModelParallelStrategy(data_parallel_size=N, "
            "tensor_parallel_size=1) with torch.distributed.fsdp.fully_shard in configure_model"
        )
    # DeepSpeed and XLA subclass DDPStrategy but shard parameters or run without torch.distributed.
    refused = {"DeepSpeedStrategy", "XLAStrategy", "SingleDeviceXLAStrategy"}
    plain = isinstance(strategy, SingleDeviceStrategy | DDPStrategy)
    if not (plain or "ModelParallelStrategy" in names) or names & refused:
        raise ValueError(
            f"PruningCallback does not support strategy {type(strategy).__name__}: its parameters are "
            "sharded in a way the masks cannot follow. Supported: single device, DDP ('ddp', 'ddp_spawn', "
            "'ddp_fork', 'ddp_notebook') and ModelParallelStrategy with FSDP2 (fully_shard)"
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
            weights, e.g. ``"2:4"``), or a ``Pattern`` object. (An int is taken only to explain that
            YAML read an unquoted ``2:4`` as the base-60 number 124.)
        criterion: how weights are scored: ``"magnitude"`` (|W|), ``"gradient"`` (|G|), ``"snip"``
            (|W*G|), ``"snip_momentum"`` (``S = 1.0*S + 0.9*|W*G|`` each step), ``"movement"``
            (``S -= W*G`` each step), ``"wanda"`` (|W| times its input's norm, from calibration
            batches), ``"sparsegpt"`` (one-shot at step 0 only: masks and corrected weights from
            calibration batches), or a ``Criterion`` object such as
            ``SnipMomentumCriterion(alpha=0.9, beta=1.0)``. Gradient criteria accumulate on every
            real optimizer step; an event due before a fit's first step (at step 0, or catching up
            on a run resumed without pruning state) scores on ``init_batches`` batches first.
        start_step: optimizer step where sparsity starts to rise. An int is a step; a float in
            ``(0, 1]`` is that fraction of the run's optimizer steps (under manual optimization,
            batches times optimizers); ``None`` is 0.
        end_step: optimizer step of the last event, where ``target_sparsity`` is reached. Same forms as
            ``start_step``; ``None`` is 9/10 of training, leaving the last tenth to fine-tune.
            ``end_step == start_step`` prunes once (one-shot); one-shot at 0 prunes before training.
        frequency: optimizer steps between events; ``None`` gives about 20 events in the window.
        sparsity_curve: how sparsity rises between events: ``"exp"``, ``"cos"``, ``"linear"``,
            ``"cube"`` or ``"agp"`` (Zhu & Gupta 2017).
        scope: ``"global"`` ranks all targets together (layers end at different sparsities);
            ``"local"`` prunes every layer to the same sparsity; ``"row"`` every output row of every
            layer (the comparison group of Wanda, Sun et al. 2023).
        include: a regex or list of regexes over qualified module names (``re.search``); only
            matching modules are pruned.
        exclude: a regex or list of regexes over qualified module names that are never pruned.
        op_types: module class names whose weights are pruned; subclasses count.
        skip_last_layer: leave the model's last layer in registration order (the head) dense, and the
            embedding its weight is tied to, if any.
        skip_embeddings: leave embeddings dense: ``nn.Embedding`` and modules under a name with
            ``embed`` in it (Hugging Face embeddings, ViT patch embeddings, CNN stems named so); an
            ``include`` regex overrides this.
        min_sparsity_per_layer: least sparsity of any targeted layer (global scope).
        max_sparsity_per_layer: most sparsity of any targeted layer.
        progressive: for structured patterns, zero newly pruned groups gradually over the next
            steps instead of at once: ``True`` (4 steps, or ``frequency`` if fewer; lowest scores first) or a
            ``Progressive(steps=..., kind="scores" | "linear")``.
        regularizer: ``"group_lasso"`` shrinks the pattern's groups toward zero after each optimizer
            step up to ``end_step``, or a ``Regularizer`` object; ``None`` for none.
        regularizer_coeff: strength of a regularizer given by name (default ``1e-4``).
        rewind: after every event, put the kept weights back to their values at this optimizer
            step: ``0`` is initialization (the lottery ticket hypothesis, Lightning's
            ``ModelPruning(use_lottery_ticket_hypothesis=True)``), a later step is weight rewinding;
            ``None`` (default) keeps training from the pruned weights. Not after the first event.
        rewind_resample: with ``rewind``, draw the kept weights anew from each layer's
            initialization instead (``ModelPruning(resample_parameters=True)``).
        rewind_events: which events rewind: ``"every"`` (default), ``"first"`` or ``"last"``
            (retrain the final mask from the rewound weights).
        initial_sparsity: a one-shot share pruned at ``start_step`` before the curve rises from it
            (Kurtic & Alistarh 2022); ``0.0`` (default) starts from dense.
        allocation: how each event's sparsity is shared among layers: ``"scope"`` (default: the
            scope's ranking) or ``"erk"`` (Erdős-Rényi-Kernel shares, as RigL; each layer then
            pruned by its own scores).
        regrow: at every event before the last, revive this fraction of each layer's live groups
            from its pruned ones with the largest gradient, pruning as many more low-scoring ones
            (GraNet/RigL style, decayed by a half cosine along the window); ``0.0`` (default) off.
        calibration_batches: for a criterion that prunes from calibration data (``"wanda"``,
            ``"sparsegpt"``), the batches its event before the first step runs through
            ``training_step`` (no gradients, eval mode); ``None`` takes the criterion's
            ``init_batches`` (128). Under DDP each rank takes its own and the statistics are summed.
        calibration_data: where those batches come from: a DataLoader or any iterable of batches;
            ``None`` is the fit's training loader.
        monitor: metrics to pair with the sparsity at every validation run, by the name they are
            logged under (``"val_acc"``, or a list); ``None`` takes every metric logged during
            validation, ``[]`` none. A near miss of a name logged in the sanity check's validation
            fails there ("did you mean"); another name missing there warns (it may be a training
            metric) and fails at the first real validation if still missing, naming what is logged.
        save_report: at the end of fit, write ``pruning/curve.csv``, ``pruning/curve.png`` and
            ``pruning/layers.csv`` under ``trainer.log_dir`` (rank 0) and add the figure to any
            ``TensorBoardLogger``.
        verbose: print what is pruned at the start of fit and the per-layer table at the end.
        name: tells several pruning callbacks in one trainer apart (each prunes its own layers): it
            names the checkpoint state (``PruningCallback[name]``), the logged metrics
            (``pruning/name/sparsity``) and the report folder (``pruning/name/``). ``None`` for one.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_prune import PruningCallback
        >>> trainer = Trainer(callbacks=[PruningCallback(target_sparsity=0.9, pattern="4x1")])
    """

    def __init__(
        self,
        target_sparsity: float = 0.9,
        pattern: str | int | Pattern = "4x1",
        criterion: str | Criterion = "magnitude",
        start_step: int | float | None = None,
        end_step: int | float | None = None,
        frequency: int | None = None,
        sparsity_curve: str = "exp",
        scope: str = "global",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        op_types: Sequence[str] = DEFAULT_OP_TYPES,
        skip_last_layer: bool = True,
        skip_embeddings: bool = True,
        min_sparsity_per_layer: float = 0.0,
        max_sparsity_per_layer: float = 0.98,
        progressive: bool | Progressive = False,
        regularizer: str | Regularizer | None = None,
        regularizer_coeff: float | None = None,
        rewind: int | None = None,
        rewind_resample: bool = False,
        rewind_events: str = "every",
        initial_sparsity: float = 0.0,
        allocation: str = "scope",
        regrow: float = 0.0,
        calibration_batches: int | None = None,
        calibration_data: Any = None,
        monitor: str | list[str] | None = None,
        save_report: bool = True,
        verbose: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.options = PruningOptions(
            target_sparsity=target_sparsity,
            pattern=pattern,
            criterion=criterion,
            scope=scope,
            include=include,
            exclude=exclude,
            op_types=op_types,
            skip_last_layer=skip_last_layer,
            skip_embeddings=skip_embeddings,
            min_sparsity_per_layer=min_sparsity_per_layer,
            max_sparsity_per_layer=max_sparsity_per_layer,
            progressive=progressive,
            regularizer=regularizer,
            regularizer_coeff=regularizer_coeff,
            rewind=rewind,
            rewind_resample=rewind_resample,
            rewind_events=rewind_events,
            allocation=allocation,
            regrow=regrow,
        )
        if name is not None and not (isinstance(name, str) and NAME.fullmatch(name)):
            raise ValueError(
                f"name={name!r} must be letters, digits, '_', '-' or '.' (or null for one callback)"
            )
        self.name = name
        # Where this callback's metrics and report files go; several callbacks need distinct ones.
        self._prefix = "pruning" if name is None else f"pruning/{name}"
        self.start_step = check_step_spec("start_step", start_step)
        self.end_step = check_step_spec("end_step", end_step)
        check_window(self.start_step, self.end_step)
        check_one_shot(self.options.criterion, self.start_step, self.end_step)
        self.calibration_batches = check_int(
            "calibration_batches", calibration_batches, minimum=1, none_means="the criterion's init_batches"
        )
        if calibration_data is not None and not isinstance(calibration_data, Iterable):
            raise ValueError(
                f"calibration_data={calibration_data!r} must be a DataLoader or an iterable of batches, or "
                "null for the training loader"
            )
        self.calibration_data = calibration_data
        self.frequency = check_int("frequency", frequency, minimum=1, none_means="about 20 events")
        self.sparsity_curve = check_curve(sparsity_curve)
        self.initial_sparsity = check_initial_sparsity(initial_sparsity, self.options.target_sparsity)
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
        self._logged_events = 0
        # State a checkpoint restored in the current stage, and that checkpoint's global_step.
        self._restored: dict[str, Any] | None = None
        self._checkpoint_step: int | None = None
        # The strategy restores checkpoints after on_fit_start (FSDP2): the Pruner is built later.
        self._deferred = False
        # The trainer step where the last fit of self.pruner ended (a next fit may continue it).
        self._fit_end_step: int | None = None
        # Manual optimization: optimizer steps per batch the window was placed with, and the
        # trainer step at the first batch's start, to tell the user when the assumption is wrong.
        self._assumed_steps_per_batch = 1
        self._first_batch_start: int | None = None
        self._start_step: int | None = None
        self._fitting: pl.Trainer | None = None  # the trainer of the fit under way

    @classmethod
    def from_config(cls, config: PruningConfig | Mapping[str, Any] | DictConfig) -> PruningCallback:
        """Build the callback from a :class:`~lightning_prune.config.PruningConfig`, a dict or a ``DictConfig``.

        Unknown keys are an error that names them; values are type-checked by OmegaConf first.

        Example::

            >>> PruningCallback.from_config({"target_sparsity": 0.5, "pattern": "2:4"}).options.pattern
            NMPattern('2:4')
        """
        return cls(**config_to_kwargs(config))

    @classmethod
    def from_inc_config(cls, config: Any, **callback_kwargs: Any) -> list[PruningCallback]:
        """Callbacks for an Intel Neural Compressor ``WeightPruningConfig`` (a dict, ``DictConfig`` or INC's
        object): one per entry of ``pruning_configs``, each pruning its own layers. Pass them all to the
        ``Trainer``. See :func:`lightning_prune.inc.callbacks_from_inc_config` and ``docs/migration.md``.

        Example::

            >>> callbacks = PruningCallback.from_inc_config({"target_sparsity": 0.8, "pattern": "4x1"})
            >>> callbacks[0].options.criterion
            SnipMomentumCriterion(alpha=0.9, beta=1.0, reset_after_event=False, init_batches=1, score_dtype='float32')
        """
        from lightning_prune.inc import callbacks_from_inc_config

        return callbacks_from_inc_config(config, **callback_kwargs)

    @property
    def state_key(self) -> str:
        # Stable whatever the settings: Lightning hands the saved state back only under the same key,
        # and the settings are compared on load, where a difference can be named.
        return STATE_KEY if self.name is None else f"{STATE_KEY}[{self.name}]"

    def _step_options(self) -> dict[str, str]:
        """The window as given (not as resolved), compared on resume."""
        return {
            "start_step": repr(self.start_step),
            "end_step": repr(self.end_step),
            "frequency": repr(self.frequency),
            "sparsity_curve": repr(self.sparsity_curve),
            **({"initial_sparsity": repr(self.initial_sparsity)} if self.initial_sparsity else {}),
        }

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning restores checkpoint state after this hook: whatever a former stage restored
        # (validate(ckpt_path=...), say) must not leak into this one.
        self._restored, self._checkpoint_step = None, None
        if stage == "fit":
            check_strategy(trainer.strategy)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called before load_state_dict, and only when a checkpoint is restored in this stage.
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        if self.name is None:  # the first release knew one callback per trainer
            migrate_legacy_key(checkpoint.setdefault("callbacks", {}), self.state_key)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here the model is on its device, the optimizers exist and a checkpoint's callback state has
        # been restored; the trainer's own step comes back later (restore_training_state), so the
        # checkpoint's global_step is read from the checkpoint itself.
        if trainer.limit_train_batches == 0 or trainer.max_steps == 0:
            rank_zero_info("lightning_prune: this fit takes no training step, so nothing is pruned")
            self.pruner = None
            return
        # ModelParallelStrategy (FSDP2) restores the weights and this callback's state only after
        # on_fit_start; there the Pruner is built at on_train_start, once both are back.
        self._deferred = bool(trainer.strategy.restore_checkpoint_after_setup)
        if not self._deferred:
            self._begin(trainer, pl_module)

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the Pruner from the state this fit starts from (``lifecycle.py``), hook the optimizers."""
        start = self._checkpoint_step if self._checkpoint_step is not None else trainer.global_step
        state, origin = self._starting_state(pl_module, start)
        schedule = self._schedule(trainer, pl_module, state)
        pruner = Pruner(pl_module, schedule, self.options)
        if state is not None and "masks" in state:
            check_state_step(state, start)
            check_legacy_settings(state, self.options)
            pruner.load_state_dict(state)
        else:
            pruner.start_at(start)
        if origin != "previous fit":
            self.history = PruningHistory()
            self.history.load_state_dict(state.get("history", []) if state is not None else [])
        self.pruner, self._start_step, self._fit_end_step = pruner, start, None
        self._check_no_overlap(trainer)
        self._logged_events = len(pruner.events)
        if self.verbose:
            self._describe(pruner, origin)
        criterion = self.options.criterion
        if pruner.due_sparsity() is not None:
            if criterion.calibrates:  # Wanda, SparseGPT: prune here, from calibration batches
                prune_from_calibration(
                    trainer, pl_module, pruner, self.calibration_batches, self.calibration_data
                )
            elif criterion.needs:
                score_at_init(trainer, pl_module, pruner)
        for optimizer in trainer.optimizers:
            # Lightning's on_before_optimizer_step feeds gradient criteria: with a closure the
            # gradients only exist inside optimizer.step, after any pre-hook.
            pruner.attach(optimizer, accumulate_before_step=False)

    def _check_no_overlap(self, trainer: pl.Trainer) -> None:
        # Several callbacks prune several groups; two masks on one weight would fight.
        assert self.pruner is not None
        self._fitting = trainer
        mine = {id(t.param): t.name for t in self.pruner.targets}
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, PruningCallback) or other._fitting is not trainer:
                continue
            assert other.pruner is not None
            shared = [mine[id(t.param)] for t in other.pruner.targets if id(t.param) in mine]
            if shared:
                raise ValueError(
                    f"PruningCallback name={self.name!r} and name={other.name!r} would both prune {shared}; "
                    "give each its own layers (include/exclude)"
                )

    def _starting_state(self, pl_module: pl.LightningModule, start: int) -> tuple[dict[str, Any] | None, str]:
        """The state this fit starts from and where it comes from (see lifecycle.py)."""
        restored, self._restored = self._restored, None
        if restored is not None:
            return restored, "checkpoint"
        previous = self.pruner
        if previous is not None and self._fit_end_step == start:
            modules = {id(m) for m in pl_module.modules()}
            if all(id(t.module) in modules for t in previous.targets):
                state = {**previous.state_dict(), "step_options": self._step_options()}
                return state, "previous fit"
        return None, "fresh"

    def _schedule(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any] | None
    ) -> Schedule:
        if state is None or "masks" not in state:
            state = None  # nothing pruned yet: nothing to keep
        elif "step_options" in state:
            compare_settings(state["step_options"], self._step_options(), "schedule settings")
        per_batch = steps_per_batch(trainer, pl_module)
        total = total_steps(trainer, per_batch)
        try:
            resolved: Schedule | ValueError = resolve_schedule(
                self.start_step,
                self.end_step,
                self.frequency,
                self.sparsity_curve,
                total,
                self.initial_sparsity,
            )
        except ValueError as error:
            resolved = error
        schedule, note = choose_schedule(resolved, saved_schedule(state))
        if note is not None:
            rank_zero_info(note)
        uses_length = not all(isinstance(v, int) for v in (self.start_step, self.end_step, self.frequency))
        self._assumed_steps_per_batch = per_batch if uses_length else 1
        if per_batch > 1 and uses_length and self.verbose:
            rank_zero_info(
                f"lightning_prune: manual optimization with {per_batch} optimizers: the window is placed "
                f"assuming each steps once per batch ({int(total) if is_known_length(total) else total} "
                "steps in all); give int start_step/end_step/frequency to place it yourself"
            )
        if is_known_length(total) and schedule.end_step > total:
            rank_zero_warn(
                f"end_step resolves to step {schedule.end_step}, after this run's last step "
                f"({int(total)}): unless training resumes for longer, it ends "
                f"below target_sparsity={self.options.target_sparsity}"
            )
        return schedule

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._deferred = False
            self._begin(trainer, pl_module)
        if self.pruner is not None and trainer.global_step != self._start_step:
            raise RuntimeError(
                f"lightning_prune started counting at step {self._start_step}, but training starts at "
                f"global_step {trainer.global_step}; please report this with your Lightning version"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._assumed_steps_per_batch > 1 and self._first_batch_start is None:
            self._first_batch_start = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.pruner is not None:
            # A GradScaler skips a step if any of the optimizer's gradients is not finite.
            scaling = getattr(trainer.precision_plugin, "scaler", None) is not None
            self.pruner.before_step(optimizer, skips_non_finite=scaling)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._first_batch_start is not None and self._assumed_steps_per_batch > 1:
            taken = trainer.global_step - self._first_batch_start
            if taken != self._assumed_steps_per_batch:
                rank_zero_warn(
                    f"lightning_prune placed the pruning window assuming {self._assumed_steps_per_batch} "
                    f"optimizer steps per batch (one per optimizer), but there were {taken} in the first "
                    "batch: the window ends elsewhere in training than asked; give int start_step, "
                    "end_step and frequency to place it exactly"
                )
            self._assumed_steps_per_batch = 1  # checked once
        if self.pruner is None or len(self.pruner.events) == self._logged_events:
            return
        for event in self.pruner.events[self._logged_events :]:
            self._log_event(trainer, pl_module, event)
        self._logged_events = len(self.pruner.events)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is None or trainer.state.fn != TrainerFn.FITTING:
            return
        available = trainer.callback_metrics
        self._check_monitor_logged(trainer, available)
        if trainer.sanity_checking:
            return  # the values of an untrained model's sanity check are not history
        names = validation_metric_names(trainer) if self.monitor is None else self.monitor
        metrics = {}
        for name in names:
            value = available[name]
            if name.startswith(("pruning/", "sparsity")) or value.numel() != 1:
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
                {f"{self._prefix}/sparsity": sparsity, f"{self._prefix}/target_sparsity": target},
                step=trainer.global_step,
            )

    def _check_monitor_logged(self, trainer: pl.Trainer, available: Mapping[str, Any]) -> None:
        missing = [name for name in self.monitor or () if name not in available]
        if not missing:
            return
        asked = list(self.monitor or ())
        if not trainer.sanity_checking:
            raise ValueError(
                f"monitor={asked!r}: {missing} not among the logged metrics {sorted(available)}; "
                "log them with self.log, or change monitor"
            )
        # At the sanity check no training metric is logged yet, so only a near-miss of a logged
        # name is surely a typo; anything else has to wait for the first real validation.
        close = {name: get_close_matches(name, list(available), n=1, cutoff=TYPO_CUTOFF) for name in missing}
        typos = {name: matches[0] for name, matches in close.items() if matches}
        if typos:
            guesses = ", ".join(f"{name!r}: did you mean {close!r}" for name, close in typos.items())
            raise ValueError(
                f"monitor={asked!r}: {list(typos)} not logged in the sanity check's validation ({guesses}); "
                f"logged: {sorted(available)}"
            )
        rank_zero_warn(
            f"monitor={asked!r}: {missing} not logged in the sanity check's validation (logged: "
            f"{sorted(available)}). Training metrics are not logged yet, so this is checked again at the "
            "first validation after training starts, and fit fails there if they are still missing"
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is None or not (self.verbose or self.save_report):
            return
        report = self.layer_report(pl_module)
        coupled = self.pruner.coupled  # heads and FFN units: named per layer
        units = None if coupled is None else coupled.report(self.pruner.masks)
        if self.verbose:
            rank_zero_info(f"\n{report}")
            if units is not None:
                rank_zero_info(str(units))
        if not self.save_report:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir) / self._prefix  # log_dir: every rank
        if not trainer.is_global_zero:
            return
        self.history.to_csv(str(folder / "curve.csv"))
        report.to_csv(str(folder / "layers.csv"))
        if units is not None:
            units.to_csv(str(folder / "units.csv"))
        # The module's class alone does not tell two architectures of one LightningModule apart.
        pruned = sum(t.param.numel() for t in self.pruner.targets)
        title = (
            f"{type(pl_module).__name__}, {len(self.pruner.targets)} layers / {pruned:,} weights pruned: "
            f"{self._summary()}"
        )
        from lightning_prune.plots import curve_figure, figure_png, figure_rgb  # matplotlib, at fit end only

        figure = curve_figure(self.history, title=title)
        write_atomically(folder / "curve.png", figure_png(figure))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    f"{self._prefix}/curve",
                    figure_rgb(figure),
                    global_step=trainer.global_step,
                    dataformats="HWC",
                )
                logger.experiment.flush()
        rank_zero_info(f"lightning_prune: wrote curve.csv, curve.png and layers.csv to {folder}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.pruner is not None:
            self.pruner.detach()
            self._fit_end_step = trainer.global_step
        self._restored, self._checkpoint_step, self._first_batch_start = None, None, None
        self._fitting = None

    def layer_report(self, model: pl.LightningModule) -> SparsityReport:
        """:func:`~lightning_prune.sparsity_report` of every weight of ``model`` with 2 or more dims,
        with the pattern of each targeted layer and why any other is dense (zeros counted from the
        weights)."""
        if self.pruner is None:
            raise RuntimeError("layer_report needs the pruner, which is built at the start of fit")
        targeted = {t.name for t in self.pruner.targets}
        left_out = self.pruner.left_out
        layers = []
        for layer in sparsity_report(model).layers:
            if layer.name in targeted:
                pattern = str(self.options.pattern)
            else:
                pattern = f"dense: {left_out[layer.name][1] if layer.name in left_out else 'not selected'}"
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
        prefix = self._prefix
        metrics = {f"{prefix}/sparsity": sparsity, f"{prefix}/target_sparsity": event.target_sparsity}
        metrics.update({f"{prefix}/sparsity/{name}": value for name, value in layers.items()})
        # Straight to the loggers: self.log would drop events that miss `log_every_n_steps`.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=event.step)
        shown = "sparsity" if self.name is None else f"sparsity/{self.name}"
        pl_module.log(shown, sparsity, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def _summary(self) -> str:
        return (
            f"{self.options.target_sparsity:.0%} {str(self.options.pattern)!r}, "
            f"{self.options.criterion.name}, {self.sparsity_curve} curve"
        )

    def _describe(self, pruner: Pruner, origin: str) -> None:
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
        if pruner.left_out:
            rank_zero_info(describe_left_out(pruner.left_out, pruner.left_out_share()))
        if origin == "checkpoint":
            rank_zero_info(f"lightning_prune: resumed the checkpoint's pruning state at step {pruner.step}")
        elif origin == "previous fit":
            rank_zero_info(
                f"lightning_prune: continues the previous fit's pruning state at step {pruner.step}"
            )
        elif pruner.step > 0:
            due = pruner.due_sparsity()
            catch_up = f"; pruning now to the schedule's {due:.4f} there" if due is not None else ""
            rank_zero_info(
                f"lightning_prune: no pruning state to resume; counting from the trainer's step "
                f"{pruner.step}{catch_up}"
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.pruner is not None:
            state = self.pruner.state_dict()
        elif self._restored is not None:
            state = {k: v for k, v in self._restored.items() if k not in ("history", "step_options")}
        else:
            state = {}
        return {**state, "step_options": self._step_options(), "history": self.history.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checked and applied at the start of fit, where the model, the trainer's step and the
        # schedule are known; a state restored by another stage is dropped at the next setup.
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"pruning state must be a dict, got {type(state_dict).__name__}")
        self._restored = dict(state_dict)

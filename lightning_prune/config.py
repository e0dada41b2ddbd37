"""Structured configs: the callback's arguments as a dataclass that OmegaConf and Hydra type-check.

``PruningConfig`` mirrors :class:`~lightning_prune.PruningCallback`'s signature (a test keeps the
two in step); :meth:`PruningCallback.from_config` takes it, a dict or a ``DictConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_prune.targets import DEFAULT_OP_TYPES


# OmegaConf reads the annotations at run time and does not understand `X | Y`: keep typing's forms.
@dataclass
class PruningConfig:
    """Every :class:`~lightning_prune.PruningCallback` argument, typed for OmegaConf; see its docs.

    Strategies take a name or a mapping: ``criterion: {name: snip_momentum, alpha: 0.9, beta: 1.0}``,
    or Hydra's ``{_target_: lightning_prune.SnipMomentumCriterion, alpha: 0.9}``; likewise
    ``pattern: {name: 4x1, reduce: max}``, ``progressive: {steps: 2, kind: linear}``.
    """

    target_sparsity: float = 0.9
    # A name or a mapping (OmegaConf has no unions with containers): checked by the callback.
    pattern: Any = "4x1"
    criterion: Any = "magnitude"
    start_step: Union[int, float] | None = None  # noqa: UP007
    end_step: Union[int, float] | None = None  # noqa: UP007
    frequency: int | None = None
    sparsity_curve: str = "exp"
    scope: str = "global"
    # A regex or a list of them (OmegaConf has no unions with containers), checked by the callback.
    include: Any = None
    exclude: Any = None
    op_types: list[str] = field(default_factory=lambda: list(DEFAULT_OP_TYPES))
    skip_last_layer: bool = True
    skip_embeddings: bool = True
    min_sparsity_per_layer: float = 0.0
    max_sparsity_per_layer: float = 0.98
    progressive: Any = False
    regularizer: Any = None
    regularizer_coeff: float | None = None
    rewind: int | None = None
    rewind_resample: bool = False
    rewind_events: str = "every"
    initial_sparsity: float = 0.0
    allocation: str = "scope"
    regrow: float = 0.0
    calibration_batches: int | None = None
    # A DataLoader or an iterable of batches (not expressible in YAML), checked by the callback.
    calibration_data: Any = None
    # OmegaConf has no unions with containers: a name or a list of names, checked by the callback.
    monitor: Any = None
    save_report: bool = True
    verbose: bool = True
    name: str | None = None


_PLAIN = (str, int, float, bool, list, tuple, type(None))


def config_to_kwargs(config: PruningConfig | Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """Check ``config`` against :class:`PruningConfig` and return callback keyword arguments.

    Values that are strategy objects (a ``Pattern``, ``Criterion``, ...) pass through unchecked here;
    the callback checks them.

    Raises:
        ValueError: on unknown keys (all named) or a value of the wrong type (key and value named).
    """
    data: Any
    if isinstance(config, DictConfig):
        data = OmegaConf.to_container(config, resolve=True)
    elif is_dataclass(config) and not isinstance(config, type):
        data = asdict(config)
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise ValueError(
            f"a pruning config must be a PruningConfig, a dict or a DictConfig, got {type(config).__name__}"
        )
    assert isinstance(data, dict)
    accepted = [f.name for f in fields(PruningConfig)]
    unknown = sorted(set(data) - set(accepted))
    if unknown:
        raise ValueError(f"unknown pruning config key(s) {unknown}; accepted keys: {accepted}")
    plain = {k: v for k, v in data.items() if isinstance(v, _PLAIN)}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(PruningConfig), plain)
    except OmegaConfBaseException as error:
        raise ValueError(
            f"pruning config: {error}".splitlines()[0] + f" ({error.full_key}={error.value!r})"
        ) from error
    container: Any = OmegaConf.to_container(typed)
    assert isinstance(container, dict)
    kwargs: dict[str, Any] = {str(k): v for k, v in container.items()}
    kwargs.update({str(k): v for k, v in data.items() if k not in plain})
    return kwargs

"""Intel Neural Compressor pruning configs, read as INC 3.7.1's code reads them.

INC removed its pruner in 3.8. Its users have ``WeightPruningConfig`` contents, in Python or YAML;
:func:`callbacks_from_inc_config` turns them into one :class:`~lightning_prune.PruningCallback` per
entry of ``pruning_configs`` (each prunes its own layers), following INC 3.7.1's
``process_weight_config``: the top-level keys are the defaults of every entry, and INC's own defaults
fill the rest. Where we differ from INC, the docstring of each mapping says so; ``docs/migration.md``
lists it all. Unknown keys and INC features we do not have are refused by name (INC only warned).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_prune.criteria import Criterion, MagnitudeCriterion, SnipCriterion, SnipMomentumCriterion
from lightning_prune.patterns import parse_pattern

if TYPE_CHECKING:
    from lightning_prune.callback import PruningCallback

#: INC 3.7.1's defaults for a pruning entry (``process_and_check_config``).
INC_DEFAULTS: dict[str, Any] = {
    "target_sparsity": 0.9,
    "pruning_type": "snip_momentum",
    "pattern": "4x1",
    "op_names": [],
    "excluded_op_names": [],
    "start_step": 0,
    "end_step": 0,
    "pruning_scope": "global",
    "pruning_frequency": 1,
    "min_sparsity_ratio_per_op": 0.0,
    "max_sparsity_ratio_per_op": 0.98,
    "sparsity_decay_type": "exp",
    "pruning_op_types": ["Conv", "Linear"],
    "low_memory_usage": False,
    "criterion_reduce_type": "mean",
    "reg_type": None,
    "reg_coeff": 0.0,
    "resume_from_pruned_checkpoint": False,
}
#: Keys INC accepts that carry no setting of ours (``backend`` picks INC's framework).
IGNORED = {"backend"}
#: INC pruning types we do not have, with what to use instead.
REFUSED_TYPES = {
    "pattern_lock": "it only keeps existing zeros: prune with target_sparsity equal to the zeros' share",
    "gradient": "INC's plain |G| criterion: use criterion='gradient' with PruningCallback directly",
}
#: INC's ``pruning_op_types`` match class names by substring; ours by name (subclasses count).
OP_TYPES = {"Conv": ["Conv1d", "Conv2d", "Conv3d", "Conv1D"], "Linear": ["Linear"]}


def _criterion(pruning_type: str, low_memory: bool) -> tuple[Criterion, bool]:
    """Our criterion for an INC ``pruning_type`` and whether it is the ``_progressive`` form."""
    base = pruning_type.removesuffix("_progressive")
    progressive = base != pruning_type
    dtype = "bfloat16" if low_memory else "float32"
    if base == "magnitude":
        return MagnitudeCriterion(), progressive
    if base == "snip":
        # INC keeps only the last step's |W*G| (scores overwritten every step): alpha=0.
        return SnipCriterion(alpha=0.0, beta=1.0, score_dtype=dtype), progressive
    if base == "snip_momentum":
        # INC's code: S = 0.9*S + 1.0*|W*G| (its docs say 1.0*S + 0.9*|W*G|, our default).
        return SnipMomentumCriterion(alpha=0.9, beta=1.0, score_dtype=dtype), progressive
    if base in REFUSED_TYPES or "gpt" in base or "retrain" in base:
        reason = REFUSED_TYPES.get(base, "a one-shot calibration method: see the README's one-shot pruning")
        raise ValueError(f"pruning_type={pruning_type!r} is not supported: {reason}")
    raise ValueError(
        f"pruning_type={pruning_type!r} is not one of magnitude, snip, snip_momentum or their _progressive forms"
    )


def _op_types(value: object) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"pruning_op_types={value!r} must be a list of class names such as ['Conv', 'Linear']"
        )
    return [mapped for name in names for mapped in OP_TYPES.get(name, [name])]


def _regexes(key: str, value: object) -> list[str] | None:
    if value is None or value == []:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{key}={value!r} must be a list of regular expressions over module names")
    for regex in names:
        try:
            re.compile(regex)
        except re.error as error:
            raise ValueError(f"{key} entry {regex!r} is not a valid regex: {error}") from error
    return list(names)


def entry_kwargs(entry: Mapping[str, Any]) -> dict[str, Any]:
    """``PruningCallback`` arguments for one complete INC entry (defaults already filled in)."""
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"parameters={params!r} must be a mapping such as {{'reg_coeff': 0.0}}")
    if entry["resume_from_pruned_checkpoint"]:
        raise ValueError(
            "resume_from_pruned_checkpoint=True is not supported: resume with the trainer's ckpt_path, which "
            "restores the masks themselves (see the README's resume section)"
        )
    criterion, progressive = _criterion(str(entry["pruning_type"]), bool(entry["low_memory_usage"]))
    name = str(entry["pattern"])
    pattern = parse_pattern(
        name if name == "1x1" else {"name": name, "reduce": entry["criterion_reduce_type"]}
    )
    regularizer, coeff = None, None
    if entry["reg_type"] is not None:
        if entry["reg_type"] != "group_lasso":
            raise ValueError(
                f"reg_type={entry['reg_type']!r} is not supported; accepted: 'group_lasso' or null"
            )
        coeff = float(params.get("reg_coeff", entry["reg_coeff"]))
        regularizer = "group_lasso" if coeff > 0 else None  # INC's default coefficient 0 shrinks nothing
    end_step = int(entry["end_step"])
    return {
        "target_sparsity": entry["target_sparsity"],
        "pattern": pattern,
        "criterion": criterion,
        "start_step": int(entry["start_step"]),
        "end_step": end_step,
        "frequency": int(entry["pruning_frequency"]),
        "sparsity_curve": str(entry["sparsity_decay_type"]),
        "scope": str(entry["pruning_scope"]),
        "include": _regexes("op_names", entry["op_names"]),
        "exclude": _regexes("excluded_op_names", entry["excluded_op_names"]),
        "op_types": _op_types(entry["pruning_op_types"]),
        "min_sparsity_per_layer": entry["min_sparsity_ratio_per_op"],
        "max_sparsity_per_layer": entry["max_sparsity_ratio_per_op"],
        "progressive": progressive,
        "regularizer": regularizer,
        "regularizer_coeff": coeff if regularizer is not None else None,
    }


def _as_dict(config: object) -> dict[str, Any]:
    """The config as a plain dict: a mapping, a list of entries (``WeightPruningConfig(configs)``), an
    OmegaConf ``DictConfig`` or INC's ``WeightPruningConfig``."""
    if hasattr(config, "weight_compression") and hasattr(config, "pruning_configs"):  # INC's own object
        return {**dict(config.weight_compression), "pruning_configs": list(config.pruning_configs)}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            container = OmegaConf.to_container(config, resolve=True)
            assert isinstance(container, dict)
            return {str(k): v for k, v in container.items()}
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(config, Mapping):
        return {str(k): v for k, v in config.items()}
    if isinstance(config, list | tuple):  # WeightPruningConfig(configs): the entries alone
        return {"pruning_configs": list(config)}
    raise ValueError(
        "an INC pruning config must be a dict, a list of entries, a DictConfig or a WeightPruningConfig, "
        f"got {type(config).__name__}"
    )


def inc_entries(config: object) -> list[dict[str, Any]]:
    """Each entry of the config complete, as INC 3.7.1 completes it: entry keys, then the top-level
    keys, then INC's defaults. A config without ``pruning_configs`` is one entry, as INC's default
    ``pruning_configs=[{}]`` makes it; an empty list means the top-level keys alone."""
    data = _as_dict(config)
    entries = data.pop("pruning_configs", [{}])
    if not isinstance(entries, Sequence) or not all(isinstance(e, Mapping) for e in entries):
        raise ValueError(f"pruning_configs={entries!r} must be a list of dicts")
    known = set(INC_DEFAULTS) | IGNORED | {"parameters"}
    for where, keys in [("top level", data), *[(f"pruning_configs[{i}]", e) for i, e in enumerate(entries)]]:
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(f"INC config {where}: unknown key(s) {unknown}; accepted: {sorted(known)}")
    if data.get("backend") not in (None, "pytorch", "default"):
        raise ValueError(f"backend={data['backend']!r}: only PyTorch models are pruned here")
    top = {k: v for k, v in data.items() if v is not None and k not in IGNORED}
    return [
        {**INC_DEFAULTS, **top, **{k: v for k, v in e.items() if v is not None and k not in IGNORED}}
        for e in (entries or [{}])
    ]


def callbacks_from_inc_config(config: object, **callback_kwargs: Any) -> list[PruningCallback]:
    """One :class:`~lightning_prune.PruningCallback` per entry of an INC ``WeightPruningConfig``.

    Args:
        config: a dict or ``DictConfig`` with INC's keys (``pruning_configs`` and top-level defaults),
            a list of entries (as ``WeightPruningConfig(configs)`` takes), or INC's object itself.
        callback_kwargs: our own arguments for every callback (``verbose``, ``monitor``, ``rewind``...).

    Returns:
        the callbacks, named ``inc0``, ``inc1``, ... when there are several (each its own
        checkpoint state, metrics and report folder). Pass them all to the ``Trainer``.

    Raises:
        ValueError: an unknown key, a value INC refuses, or an INC feature we do not have, named.

    Example::

        >>> from lightning_prune.inc import callbacks_from_inc_config
        >>> config = {"pruning_configs": [{"op_names": ["layer1.*"], "pattern": "4x1"},
        ...                               {"op_names": ["layer2.*"], "pattern": "1x1", "target_sparsity": 0.5}],
        ...           "target_sparsity": 0.8}
        >>> [(c.name, c.options.target_sparsity, str(c.options.pattern)) for c in callbacks_from_inc_config(config)]
        [('inc0', 0.8, '4x1'), ('inc1', 0.5, '1x1')]
    """
    from lightning_prune.callback import PruningCallback

    entries = inc_entries(config)
    callbacks = []
    for index, entry in enumerate(entries):
        name = callback_kwargs.get("name", f"inc{index}" if len(entries) > 1 else None)
        try:
            callbacks.append(PruningCallback(**{**entry_kwargs(entry), **callback_kwargs, "name": name}))
        except ValueError as error:
            where = f"pruning_configs[{index}]" if len(entries) > 1 else "INC config"
            raise ValueError(f"{where}: {error}") from error
    return callbacks

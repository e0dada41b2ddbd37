"""The Pruner's checkpoint state: its version and a full check before anything of it is applied.

A state from another run, another version or a hand-edited file must never be half applied or
broadcast into a layer: every key, layer, shape and dtype is checked first, and the first problem
raises ``ValueError`` naming the key or layer, what was found and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_prune.checks import is_int

#: Version 2 added the settings (``options``, ``schedule``) compared on resume.
STATE_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
REQUIRED_KEYS = ("version", "step", "pattern", "masks", "buffers", "events")
EVENT_KEYS = ("step", "target_sparsity", "sparsity", "layer_sparsity")


def _tensor(what: str, value: object, shape: torch.Size, dtype: torch.dtype | None) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"pruning state: {what} is a {type(value).__name__}, expected a tensor")
    if value.shape != shape:
        raise ValueError(
            f"pruning state: {what} has shape {tuple(value.shape)}, expected the layer's {tuple(shape)}"
        )
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"pruning state: {what} has dtype {value.dtype}, expected {dtype}")


def _names(key: str, saved: Mapping[str, Any], names: Sequence[str]) -> None:
    if list(saved) != list(names):
        raise ValueError(
            f"the checkpoint's pruning targets differ from this run's ({key}): "
            f"only in checkpoint {sorted(set(saved) - set(names))}, only in this run "
            f"{sorted(set(names) - set(saved))}; resume with the same model and include/exclude"
        )


def check_header(state: object) -> None:
    """Raise ``ValueError`` unless ``state`` is a dict of a supported version with every required key."""
    if not isinstance(state, Mapping):
        raise ValueError(f"pruning state must be a dict, got {type(state).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"pruning state: key(s) {missing} missing; a state has {list(REQUIRED_KEYS)}")
    version = state["version"]
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"pruning state version={version!r} is not supported; supported versions: "
            f"{list(SUPPORTED_VERSIONS)} (saved by a newer lightning_prune?)"
        )


def check_state(
    state: object, names: Sequence[str], shapes: Sequence[torch.Size], buffers: Sequence[Tensor | None]
) -> None:
    """Raise ``ValueError`` unless ``state`` is a Pruner state that fits these targets.

    Args:
        state: what :meth:`Pruner.state_dict` wrote (maybe long ago, maybe edited).
        names: this run's target names, in order.
        shapes: their weight shapes.
        buffers: their criterion buffers (``None`` where the criterion keeps none).
    """
    check_header(state)
    assert isinstance(state, Mapping)
    step = state["step"]
    if not is_int(step) or step < 0:
        raise ValueError(f"pruning state: step={step!r} must be an int >= 0")
    _names("masks", state["masks"], names)
    _names("buffers", state["buffers"], names)
    for name, shape, buffer in zip(names, shapes, buffers, strict=True):
        _tensor(f"the mask of {name!r}", state["masks"][name], shape, torch.bool)
        saved = state["buffers"][name]
        if (saved is None) != (buffer is None):
            raise ValueError(
                f"pruning state: the score buffer of {name!r} is {'absent' if saved is None else 'present'}, "
                f"but this run's criterion keeps {'one' if buffer is not None else 'none'}"
            )
        if saved is not None and buffer is not None:
            _tensor(f"the score buffer of {name!r}", saved, buffer.shape, None)
    _check_events(state["events"], int(step))
    rewind = state.get("rewind")
    if rewind is not None:
        snapshot = rewind.get("snapshot") if isinstance(rewind, Mapping) else None
        if snapshot is not None:
            _names("rewind snapshot", snapshot, names)
            for name, shape in zip(names, shapes, strict=True):
                _tensor(f"the rewind snapshot of {name!r}", snapshot[name], shape, None)
    fade = state.get("fade")
    if fade is not None:
        if not isinstance(fade, Mapping) or not {"position", "steps", "stages"} <= set(fade):
            raise ValueError("pruning state: 'fade' must hold 'position', 'steps' and 'stages'")
        _names("fade stages", fade["stages"], names)
        for name, shape in zip(names, shapes, strict=True):
            _tensor(f"the fade stages of {name!r}", fade["stages"][name], shape, torch.uint8)


def _check_events(events: object, step: int) -> None:
    if not isinstance(events, Sequence):
        raise ValueError(f"pruning state: 'events' must be a list, got {type(events).__name__}")
    previous = -1
    for number, event in enumerate(events):
        if not isinstance(event, Mapping) or set(event) != set(EVENT_KEYS):
            raise ValueError(f"pruning state: event {number} must have exactly the keys {list(EVENT_KEYS)}")
        if not is_int(event["step"]) or event["step"] < previous:
            raise ValueError(
                f"pruning state: event {number} is at step {event['step']!r}, before the event ahead of it"
            )
        previous = event["step"]
    if previous > step:
        raise ValueError(
            f"pruning state: step={step} is before its last event at step {previous}; "
            "the state was edited or mixed from two runs"
        )


def check_couplings(saved: object, current: Mapping[str, str]) -> None:
    """Refuse a state whose coupled units (heads, FFN units: ``Pruner.coupled``) are not this run's.

    Args:
        saved: the state's ``couplings``: structure of each coupling by module name.
        current: this run's, from :meth:`~lightning_prune.coupled.CoupledLayers.describe`.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(
            f"pruning state: 'couplings' is {saved!r}, expected the heads/units of each layer "
            f"({len(current)} in this run): the state was saved without a coupled pattern or edited"
        )
    differences = [
        f"{name}: checkpoint {saved.get(name, '(none)')!r}, this run {current.get(name, '(none)')!r}"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]
    if differences:
        raise ValueError(
            f"the checkpoint's coupled units differ from this run's: {'; '.join(differences)}; resume with "
            "the same model (heads, key/value heads, FFN widths) and include/exclude"
        )


def compare_settings(saved: Mapping[str, str], current: Mapping[str, str], what: str) -> None:
    """Refuse a resume whose ``current`` settings differ from the ``saved`` ones, naming each difference."""
    differences = [
        f"{key}: checkpoint {saved.get(key, '(not recorded)')}, this run {current.get(key, '(none)')}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(
            f"the checkpoint was pruned with other {what} than this run: {'; '.join(differences)}. "
            "Resume with the checkpoint's settings, or start a new pruning run from its weights "
            "(load them into the model and fit without ckpt_path)"
        )

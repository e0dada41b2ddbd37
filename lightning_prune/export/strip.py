"""strip: a plain state dict with the pruned zeros in it, loadable into the original architecture."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

from lightning_prune.pruner import Pruner
from lightning_prune.targets import plain_name

if TYPE_CHECKING:  # the export reads a callback's pruner; it does not depend on the callback
    from lightning_prune.callback import PruningCallback


def strip(model: nn.Module, pruner: Pruner | PruningCallback | None = None) -> dict[str, Tensor]:
    """The model's state dict with zeros in place and nothing else: no masks, no extra keys.

    ``PruningCallback`` already keeps the model's own keys (masks live in the callback's state and
    are applied in place after every step), so for such a model this is ``model.state_dict()``
    after checks. Pass the callback (or :class:`~lightning_prune.Pruner`) to have those checks:
    every pruned weight must be zero in the model, and a progressive fade or a schedule that has
    not reached its last event is warned about, since the state dict then holds the sparsity the
    model has now, not the target. Models pruned by ``torch.nn.utils.prune`` (``weight_orig`` /
    ``weight_mask``, e.g. Lightning's ``ModelPruning``) or parametrized with
    ``torch.nn.utils.parametrize`` get their effective weights under the plain names, and
    ``torch.compile``'s ``_orig_mod.`` prefixes are dropped. Load the result with
    ``Model().load_state_dict(state, strict=True)``.

    Args:
        model: the pruned network (a LightningModule or a plain ``nn.Module``).
        pruner: the ``PruningCallback`` or ``Pruner`` that pruned ``model``, to check against.

    Returns:
        An ordered ``{name: tensor}`` dict. Like ``state_dict()``, unchanged tensors share storage
        with the model; clone them before training the model further.

    Raises:
        ValueError: when an argument is of the wrong kind, the callback has not started fitting,
            the pruner prunes another model, or a pruned weight is not zero in the model.
    """
    if isinstance(model, Pruner) or (not isinstance(model, nn.Module) and hasattr(model, "pruner")):
        raise ValueError(
            f"model={type(model).__name__}: pass the network first and the callback second, "
            "strip(model, pruner=callback)"
        )
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} must be a torch.nn.Module")
    if pruner is not None:
        _check_pruner(model, pruner)
    state = model.state_dict()
    metadata = getattr(state, "_metadata", None)
    replace: dict[str, tuple[str, Tensor]] = {}  # first key of a group -> (plain key, value)
    drop: set[str] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for hook in module._forward_pre_hooks.values():
            if isinstance(
                hook, BasePruningMethod
            ):  # torch.nn.utils.prune: weight = weight_orig * weight_mask
                tensor = hook._tensor_name
                original = getattr(module, f"{tensor}_orig").detach()
                mask = getattr(module, f"{tensor}_mask").detach()
                replace[f"{prefix}{tensor}_orig"] = (f"{prefix}{tensor}", mask.to(original.dtype) * original)
                drop.add(f"{prefix}{tensor}_mask")
        if parametrize.is_parametrized(module):
            for tensor in module.parametrizations:
                group = f"{prefix}parametrizations.{tensor}."
                keys = [k for k in state if k.startswith(group)]
                if keys:
                    with torch.no_grad():
                        replace[keys[0]] = (f"{prefix}{tensor}", getattr(module, tensor).detach().clone())
                    drop.update(keys[1:])
    stripped: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        if key in drop:
            continue
        key, value = replace.get(key, (key, value))
        stripped[plain_name(key)] = value
    if metadata is not None:
        stripped._metadata = OrderedDict((plain_name(k), v) for k, v in metadata.items())  # type: ignore[attr-defined]
    return stripped


def _check_pruner(model: nn.Module, pruner: Pruner | PruningCallback) -> None:
    if not isinstance(pruner, Pruner) and hasattr(pruner, "pruner"):  # a PruningCallback
        if pruner.pruner is None:
            raise ValueError(
                f"pruner={type(pruner).__name__} has not started fitting (its Pruner is built in on_fit_start); "
                "strip after trainer.fit, or call strip(model) without it"
            )
        pruner = pruner.pruner
    if not isinstance(pruner, Pruner):
        raise ValueError(f"pruner={type(pruner).__name__} must be a PruningCallback, a Pruner or None")
    modules = {id(m) for m in model.modules()}
    foreign = [t.name for t in pruner.targets if id(t.module) not in modules]
    if foreign:
        raise ValueError(
            f"the pruner's targets {foreign} are not modules of this model: pass the model it pruned"
        )
    wrong = {}
    with torch.no_grad():
        for target, mask in zip(pruner.targets, pruner.masks, strict=True):
            count = int(torch.count_nonzero(target.param.ne(0) & ~mask))
            if count:
                wrong[target.name] = count
    if wrong:
        raise ValueError(
            f"weights the pruner masked are not zero in the model ({wrong} nonzero): the model changed after "
            "the last masked step (e.g. a load_state_dict). Call pruner.apply_masks() to zero them again, "
            "or strip(model) without the pruner to take the weights as they are"
        )
    if pruner.fading:
        warnings.warn(
            "a progressive fade is under way: the state dict holds this step's interval masks, less sparse "
            "than the event's final mask; strip after the fade ends (progressive steps after the event)",
            stacklevel=3,
        )
    elif not pruner.finished:
        warnings.warn(
            f"the pruning schedule has not run its last event (step {pruner.step}, last event at "
            f"{pruner.schedule.end_step}): the state dict holds sparsity {pruner.sparsity:.3f}, not the "
            f"target {pruner.options.target_sparsity}",
            stacklevel=3,
        )

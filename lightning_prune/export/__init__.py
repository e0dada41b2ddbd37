"""Export a pruned model: smaller dense layers (:func:`slim`), 2:4 sparse kernels
(:func:`to_semi_structured`) and a plain state dict (:func:`strip`). See ``docs/export.md``."""

from lightning_prune.export.attention import SlimMultiheadAttention
from lightning_prune.export.load import load_slim_pretrained, load_slim_state_dict
from lightning_prune.export.semi_structured import (
    SemiStructuredResult,
    is_two_four,
    to_semi_structured,
    two_four_fraction,
)
from lightning_prune.export.slim import SlimmedChain, SlimResult, slim
from lightning_prune.export.strip import strip

__all__ = [
    "SemiStructuredResult",
    "SlimMultiheadAttention",
    "SlimResult",
    "SlimmedChain",
    "is_two_four",
    "load_slim_pretrained",
    "load_slim_state_dict",
    "slim",
    "strip",
    "to_semi_structured",
    "two_four_fraction",
]

"""Multi-head attention with some of its heads removed.

``nn.MultiheadAttention`` ties the inner width to ``embed_dim`` (``head_dim = embed_dim / num_heads``),
so it cannot hold fewer heads of the same width. :class:`SlimMultiheadAttention` keeps the embedding
width and the head width, has an inner width of ``kept heads * head_dim``, and takes the same
arguments and returns the same ``(output, weights)`` pair.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SlimMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``len(kept_heads)`` of its ``original_heads`` heads.

    Parameters keep ``nn.MultiheadAttention``'s names (``in_proj_weight`` or ``q/k/v_proj_weight``,
    ``in_proj_bias``, ``out_proj``) with the rows of removed heads dropped. The buffer
    ``kept_heads`` holds the original indices of the remaining heads: it lets a per-head 3-D
    ``attn_mask`` built for the original module be used unchanged, and lets
    :func:`~lightning_prune.export.load_slim_state_dict` rebuild the module from a state dict.

    Args:
        embed_dim: model width (query and output size).
        head_dim: width of one head, as in the original module.
        kept_heads: original indices of the heads kept, ascending.
        original_heads: number of heads of the original module.
        kdim: key size (``embed_dim`` when ``None``).
        vdim: value size (``embed_dim`` when ``None``).
        in_bias: whether the q/k/v projections have biases.
        out_bias: whether ``out_proj`` has a bias.
        dropout: dropout on the attention weights in training mode.
        batch_first: inputs and outputs are ``(batch, seq, feature)``.
        device: where to create the parameters.
        dtype: their dtype.
    """

    def __init__(
        self,
        embed_dim: int,
        head_dim: int,
        kept_heads: list[int],
        original_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        in_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not kept_heads or sorted(set(kept_heads)) != list(kept_heads) or kept_heads[-1] >= original_heads:
            raise ValueError(
                f"kept_heads={kept_heads!r} must be ascending, distinct and below original_heads={original_heads}"
            )
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = head_dim
        self.num_heads = len(kept_heads)
        self.original_heads = original_heads
        self.dropout = dropout
        self.batch_first = batch_first
        inner = self.num_heads * head_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, device=device, dtype=dtype))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim, device=device, dtype=dtype))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim, device=device, dtype=dtype))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim, device=device, dtype=dtype))
        if in_bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, device=device, dtype=dtype))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias, device=device, dtype=dtype)
        self.register_buffer("kept_heads", torch.tensor(kept_heads, dtype=torch.long, device=device))
        self.kept_heads: Tensor
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)

    def extra_repr(self) -> str:
        heads = self.kept_heads.tolist()
        return f"embed_dim={self.embed_dim}, head_dim={self.head_dim}, kept_heads={heads} of {self.original_heads}"

    def _projections(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.in_proj_weight is not None:
            q, k, v = self.in_proj_weight.chunk(3)
            return q, k, v
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """A bool (``True`` = not allowed) or float mask as an additive float mask."""
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
        return mask.to(dtype)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments and results as ``nn.MultiheadAttention.forward``.

        ``attn_mask`` may be ``(L, S)`` or per head ``(N * original_heads, L, S)``; the masks of the
        removed heads are dropped. Returned per-head weights cover the kept heads only, and averaged
        weights average over them.
        """
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True is only a hint here: pass the causal attn_mask as well")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, width = self.num_heads, self.head_dim
        w_q, w_k, w_v = self._projections()
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        # (L, N, inner) -> (N, heads, L, head_dim)
        q = F.linear(query, w_q, b_q).reshape(length, batch, heads, width).permute(1, 2, 0, 3)
        k = F.linear(key, w_k, b_k).reshape(source, batch, heads, width).permute(1, 2, 0, 3)
        v = F.linear(value, w_v, b_v).reshape(source, batch, heads, width).permute(1, 2, 0, 3)
        scores = (q * (1.0 / math.sqrt(width))) @ k.transpose(-2, -1)
        if attn_mask is not None:
            mask = self._mask(attn_mask, scores.dtype)
            if mask.dim() == 3:  # per original head: keep the masks of the kept heads
                mask = mask.reshape(batch, self.original_heads, length, source)[:, self.kept_heads]
            scores = scores + mask
        if key_padding_mask is not None:
            scores = scores + self._mask(key_padding_mask, scores.dtype).reshape(batch, 1, 1, source)
        weights = scores.softmax(dim=-1)
        dropped = F.dropout(weights, self.dropout) if self.training and self.dropout > 0 else weights
        out = (dropped @ v).permute(2, 0, 1, 3).reshape(length, batch, heads * width)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        result = weights.mean(dim=1) if average_attn_weights else weights
        return out, result.squeeze(0) if unbatched else result

"""The one decoder walk: a decoder layer run from its sub-modules, used by both graphs.

The full scoring graph and the streaming step graph call :func:`run_layer`, so their
attention cannot drift apart when transformers changes its own attention classes. Only
the layers' parameters and sub-modules are read (q/k/v/o projections, the optional q/k
RMSNorms, the MLP, the two layer norms); rotary embedding and GQA head repetition are
done here, the way transformers' Qwen3/Llama attention does them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; cos/sin [B or 1, S, D] from the backbone's rotary embedding."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * groups, S, D] (grouped-query attention)."""
    if groups == 1:
        return x
    batch, heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, seq, dim).reshape(batch, heads * groups, seq, dim)


def run_layer(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
              past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None):
    """One pre-norm decoder layer.

    mask: boolean [B, 1, S, past + S], True where a query may attend a key.
    Returns (hidden out, MLP output, this call's keys, this call's values), keys/values
    as [B, kv_heads, S, head_dim] after RoPE (what a KV cache stores)."""
    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    shape = (batch, seq, -1, head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:       # Qwen3 norms q/k per head; Llama does not
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = apply_rotary(q.transpose(1, 2), cos, sin)
    k = apply_rotary(k.transpose(1, 2), cos, sin)
    keys = k if past_k is None else torch.cat([past_k, k], dim=2)
    values = v if past_v is None else torch.cat([past_v, v], dim=2)
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, repeat_heads(keys, groups), repeat_heads(values, groups),
                                         attn_mask=mask, scale=attn.scaling)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
    mlp_out = layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden + mlp_out, mlp_out, k, v

"""The one decoder walk: a decoder layer run from its sub-modules, used by both graphs.

The full scoring graph and the streaming step graph call :func:`run_layer`, so their
attention cannot drift apart when transformers changes its own attention classes. Only
the layers' parameters and sub-modules are read (q/k/v/o projections, the optional q/k
RMSNorms, the MLP, the two layer norms); rotary embedding and grouped-query attention are
done here (see grouped_attention), computing what transformers' Qwen3/Llama attention computes.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; cos/sin [B or 1, S, D] from the backbone's rotary embedding."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, heads, S, D] over the keys/values of this call (k, v [B, kv_heads,
    S, D]) and of the past (past_k, past_v [B, kv_heads, P, D]); mask [B, 1, S, P + S], True
    where a query may attend a key. Returns [B, heads, S, D].

    Written out rather than scaled_dot_product_attention over concatenated, head-repeated
    keys: the queries of the heads that share a KV head are stacked instead (a reshape), and
    the past and this call's keys are multiplied apart, their scores joined before the
    softmax. A step then reads its past keys and values once each in a GEMM, where the
    exported sdpa copied them six times over (gathered, concatenated, repeated per head,
    transposed, scaled), which made a batched step over long pasts cost what its rows cost
    one by one."""
    batch, heads, seq, dim = q.shape
    groups = heads // k.shape[1]
    qg = (q * scale).reshape(batch, k.shape[1], groups * seq, dim)                   # [B, kv, g*S, D]
    scores = qg @ k.transpose(-1, -2)                                                # [B, kv, g*S, S]
    if past_k is not None:
        scores = torch.cat([qg @ past_k.transpose(-1, -2), scores], dim=-1)          # [B, kv, g*S, P+S]
    allowed = mask[:, :, None].expand(batch, 1, groups, seq, mask.shape[-1]).reshape(batch, 1, groups * seq, -1)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    if past_v is None:
        out = probs @ v
    else:
        past = past_v.shape[2]
        out = probs[..., :past] @ past_v + probs[..., past:] @ v
    return out.reshape(batch, heads, seq, dim)


class TokenPacking:
    """The real tokens of a right-padded [B, S] batch, packed into one row of N tokens.

    Everything in a decoder layer but attention works token by token, so it runs on the
    packed tokens only: a batch of streams whose new tokens differ in number (1 to 8 in a
    round of chunked feeds) computes its projections and MLP on its real tokens, not on B x
    the longest. Attention unpacks to [B, heads, S, D] (padding zero) and packs its output
    back. Packed tensors keep a leading axis of 1 ([1, N, ...]), so the projections trace
    to the very MatMuls (and weight layouts) of the scoring graph, whose weights file the
    step graph shares. The first two positions always run, so a projection is never a
    one-row GEMM (ONNX Runtime's GEMV path adds in another order: see SirenScorer)."""

    def __init__(self, valid: torch.Tensor):
        self.batch, self.seq = valid.shape
        flat = valid.flatten() | (torch.arange(valid.numel(), device=valid.device) < 2)
        self.index = torch.nonzero(flat).squeeze(1)                                 # [N]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [1, N, ...]"""
        return x.flatten(0, 1).index_select(0, self.index)[None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> [B, S, ...], zero where nothing was packed."""
        rest = x.shape[2:]
        full = x.new_zeros((self.batch * self.seq, *rest)).index_copy(0, self.index, x[0])
        return full.view(self.batch, self.seq, *rest)


def step_inputs(embed_tokens, rotary_emb, input_ids: torch.Tensor, new_lengths: torch.Tensor,
                past_lengths: torch.Tensor, past: int):
    """What every step graph starts from (STEP_IO's rows: right-padded new tokens after each
    row's own past): (packing of the real new tokens, their embeddings [1, N, H], cos/sin
    [1, N, D] at their positions, the attention mask [B, 1, new, past + new], valid [B, new]).
    A query sees its row's valid past and the new tokens up to itself (padding rows still see
    themselves, so no softmax is empty). The embedding's Gather reads input_ids itself (how
    siren quantize finds the table)."""
    batch, new = input_ids.shape
    device = input_ids.device
    offsets = torch.arange(new, device=device)
    valid = offsets[None, :] < new_lengths[:, None]                                          # [B, new]
    packing = TokenPacking(valid)
    hidden = packing.pack(embed_tokens(input_ids))                                           # [1, N, H]
    cos, sin = rotary_emb(hidden, packing.pack(past_lengths[:, None] + offsets[None, :]))    # [1, N, D]
    past_keys = torch.arange(past, device=device)[None, :] < past_lengths[:, None]           # [B, P]
    new_keys = offsets[None, :] <= offsets[:, None]                                           # [new, new]
    mask = torch.cat([past_keys[:, None, :].expand(batch, new, past),
                      new_keys[None].expand(batch, new, new)], dim=-1)[:, None]               # [B, 1, new, P+new]
    return packing, hidden, cos, sin, mask, valid


def run_layer(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
              past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None,
              packing: TokenPacking | None = None):
    """One pre-norm decoder layer.

    mask: boolean [B, 1, S, past + S], True where a query may attend a key.
    hidden [B, S, H] and cos/sin [B, S, D]; with `packing`, hidden [1, N, H] and cos/sin
    [1, N, D] (the packed real tokens), and the hidden/MLP outputs come back packed too.
    Returns (hidden out, MLP output, this call's keys, this call's values), keys/values
    as [B, kv_heads, S, head_dim] after RoPE (what a KV cache stores)."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, head_dim)                  # [B, S, heads, D] or [1, N, heads, D]
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape)
    if getattr(attn, "q_norm", None) is not None:       # Qwen3 norms q/k per head; Llama does not
        q, k = attn.q_norm(q), attn.k_norm(k)
    if packing is None:
        batch, seq = hidden.shape[:2]
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
    else:
        batch, seq = packing.batch, packing.seq
        q, k, v = (packing.unpack(t).transpose(1, 2) for t in (apply_rotary_packed(q, cos, sin),
                                                               apply_rotary_packed(k, cos, sin), v))
    out = grouped_attention(q, k, v, mask, attn.scaling, past_k, past_v)
    out = out.transpose(1, 2).reshape(batch, seq, -1)
    hidden = hidden + attn.o_proj(out if packing is None else packing.pack(out))
    mlp_out = layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden + mlp_out, mlp_out, k, v


def apply_rotary_packed(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary on packed tokens: x [1, N, heads, D], cos/sin [1, N, D]."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]

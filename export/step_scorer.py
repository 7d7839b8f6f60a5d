"""The incremental ("step") scorer: runs only the new tokens of a stream.

Attention is causal and the pooling is a mean, so the states of tokens already scored
never change when text is appended. This module takes the past keys/values of every kept
layer and the running per-feature sums of the selected neurons, runs the new tokens,
and returns the updated cache, sums and score. Same numerics as :class:`SirenScorer`
(fp32 pooling, same readout); it reads the same sub-modules.

Shapes: past_kv [layers, 2, batch, kv_heads, past, head_dim] (backbone dtype),
past_sums [batch, features] float32, past_count [batch, 1] float32. Outputs the score,
present_kv (past + new), the running sums after *each* new token [batch, new, features]
(so a stream can resume at any token, not only at call boundaries) and the new count.
Rows of a batch must share their past length and carry no padding (one stream per row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb, repeat_kv

from .scorer import SirenScorer


class SirenStepScorer(SirenScorer):
    def __init__(self, backbone, num_layers: int, artifact, readout: str = "runtime"):
        super().__init__(backbone, num_layers, artifact, readout)
        weights = [torch.full((len(artifact.neurons[l]),), float(artifact.layer_weights[l])) for l in self.selected]
        self.register_buffer("feature_weights", torch.cat(weights)[None, :], persistent=False)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_groups = attn.num_key_value_groups

    def forward(self, input_ids, past_kv, past_sums, past_count):
        batch, new = input_ids.shape
        past = past_kv.shape[4]
        hidden = self.embed_tokens(input_ids)
        positions = past + torch.arange(new, device=input_ids.device)
        position_embeddings = self.rotary_emb(hidden, positions[None, :])
        cos, sin = position_embeddings
        key_positions = torch.arange(past + new, device=input_ids.device)
        allowed = (key_positions[None, :] <= positions[:, None])[None, None]   # [1, 1, new, past+new]

        presents, sums = [], []
        for index in range(self.selected[-1] + 1):
            layer = self.layers[index]
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            shape = (batch, new, -1, self.head_dim)
            q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past_kv[index, 0], k], dim=2)
            v = torch.cat([past_kv[index, 1], v], dim=2)
            presents.append(torch.stack([k, v]))
            out = F.scaled_dot_product_attention(q, repeat_kv(k, self.kv_groups), repeat_kv(v, self.kv_groups),
                                                 attn_mask=allowed, scale=attn.scaling)
            hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(batch, new, -1))
            residual = hidden
            mlp_out = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + mlp_out
            if index in self.layer_weights:
                sums.append(self.selected_neurons(index, hidden, mlp_out).cumsum(dim=1))

        # Running sums after every new token, so a stream can later resume at any position.
        new_sums = past_sums[:, None, :] + torch.cat(sums, dim=-1)          # [B, new, F]
        new_count = past_count + new
        logits = self.head(new_sums[:, -1, :] / new_count * self.feature_weights)
        score = torch.softmax(logits, dim=-1)[:, 1]
        return score, torch.stack(presents), new_sums, new_count

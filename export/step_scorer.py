"""The incremental ("step") scorer: runs only the new tokens of many streams at once.

Attention is causal and the pooling is a mean, so the states of tokens already scored
never change when text is appended. This module takes each stream's past keys/values and
running per-feature sums, runs its new tokens, and returns the new keys/values, the running
sums after *each* new token (so a stream can later resume at any token) and the score.
Same numerics and the same decoder walk as :class:`SirenScorer`.

Rows are independent streams: row b has ``past_lengths[b]`` valid past positions (its past
KV right-padded to the longest row) and ``new_lengths[b]`` valid new tokens (right-padded
to the longest row). Tensor names and shapes: ``siren_runtime.bundle.STEP_IO``. Only the
real new tokens go through the projections and MLPs (decoder.TokenPacking), so a batch pays
for its tokens, not for rows x the longest.
"""
from __future__ import annotations

import torch

from .decoder import step_inputs
from .scorer import SirenScorer


class SirenStepScorer(SirenScorer):
    def forward(self, input_ids, new_lengths, past_lengths, past_kv, past_sums):
        batch = input_ids.shape[0]
        packing, hidden, cos, sin, mask, valid_tokens = step_inputs(
            self.embed_tokens, self.rotary_emb, input_ids, new_lengths, past_lengths, past_kv.shape[4])
        features, new_kv = self.walk(hidden, cos, sin, mask, past_kv, packing)

        valid = valid_tokens[:, :, None]                                                    # [B, new, 1]
        sums = past_sums[:, None, :] + torch.where(valid, features, 0.0).cumsum(dim=1)     # [B, new, F]
        last = (new_lengths - 1).clamp(min=0)[:, None, None].expand(batch, 1, sums.shape[-1])
        count = (past_lengths + new_lengths).clamp(min=1).to(torch.float32)[:, None]
        pooled = sums.gather(1, last)[:, 0, :] / count
        logits = self.head(torch.cat([pooled, pooled]))[:batch]     # never a one-row GEMM (see SirenScorer)
        score = torch.softmax(logits, dim=-1)[:, 1]
        return score, new_kv, sums

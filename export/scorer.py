"""The torch module that becomes the ONNX graph: truncated backbone + gather-pool-MLP head.

It walks the decoder layers itself with :func:`siren_export.decoder.run_layer` (the one
decoder walk, shared with the step graph) so the MLP output of a layer can be read without hooks, and the
readout of each selected layer is explicit:

- ``runtime`` readout (llm-siren): ``hidden_states[L+1]``, i.e. the raw layer output,
  except for the backbone's last layer, which transformers returns final-RMSNorm-ed;
- ``training`` readout (the paper's training code): the raw output of every layer.

Pooling happens in fp32 and excludes padding by selection (``where``), so a
non-finite value at a pad position cannot reach the mean. The token sum is a running sum
(CumSum, read at the last position) rather than a ReduceSum: ONNX Runtime picks a ReduceSum
kernel by shape (one row reduces in another order than several; a wider padding regroups
the additions), so a text's score moved with its batch companions. A running sum adds in
token order whatever the batch, and padding adds exact zeros after the text. The runtime
never runs a one-token-wide batch for the same reason (see TextEncoder.pad).
"""
from __future__ import annotations

import torch
from torch import nn

from .decoder import run_layer

READOUTS = ("runtime", "training")


class SirenScorer(nn.Module):
    def __init__(self, backbone, num_layers: int, artifact, readout: str = "runtime"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.embed_tokens = backbone.embed_tokens
        self.rotary_emb = backbone.rotary_emb
        self.layers = backbone.layers
        self.norm = backbone.norm
        self.pooling = artifact.pooling_type
        self.selected = list(artifact.selected_layers)
        # Only the backbone's own last layer is normed, and only in the runtime readout.
        self.normed_layer = num_layers - 1 if readout == "runtime" else -1
        for layer in self.selected:
            self.register_buffer(f"neurons_{layer}", torch.tensor(artifact.neurons[layer], dtype=torch.long),
                                 persistent=False)
        self.layer_weights = {l: float(artifact.layer_weights[l]) for l in self.selected}
        modules: list[nn.Module] = []
        for spec in artifact.head:
            linear = nn.Linear(spec.weight.shape[1], spec.weight.shape[0])
            with torch.no_grad():
                linear.weight.copy_(spec.weight)
                linear.bias.copy_(spec.bias)
            modules.append(linear)
            if spec.relu:
                modules.append(nn.ReLU())
        self.head = nn.Sequential(*modules).float()
        # Set to a list to record the largest |activation| per layer (eager runs only).
        self.peaks = None

    def selected_neurons(self, index: int, hidden: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s readout, gathered to its selected neurons, in fp32 [B, S, n]."""
        if self.pooling == "mlp_mean":
            rep = mlp_out
        elif index == self.normed_layer:
            rep = self.norm(hidden)
        else:
            rep = hidden
        return rep.index_select(-1, getattr(self, f"neurons_{index}")).to(torch.float32)

    def _attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, 1, seq, seq] boolean: causal, padding keys excluded; every query may
        also see itself, so an all-padding row never has an empty softmax (no NaN)."""
        seq = attention_mask.shape[1]
        positions = torch.arange(seq, device=attention_mask.device)
        causal = positions[None, :] <= positions[:, None]
        keys = attention_mask.bool()[:, None, :]
        allowed = (causal[None] & keys) | torch.eye(seq, dtype=torch.bool, device=attention_mask.device)[None]
        return allowed[:, None, :, :]

    def features_of(self, index: int, hidden: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s selected neurons times its layer weight, fp32 [B, S, n]."""
        return self.selected_neurons(index, hidden, mlp_out) * self.layer_weights[index]

    def walk(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
             past_kv: torch.Tensor | None = None, packing=None):
        """Run layers 0..deepest selected; returns (per-token features [B, S, F], this call's
        keys/values [layers, 2, B, kv_heads, S, head_dim]). packing (decoder.TokenPacking):
        hidden and cos/sin hold the packed real tokens; the features come back unpacked."""
        features, presents = [], []
        # [layers * 2, B, kv_heads, P, D]: one gather per layer's keys or values (indexing the
        # layer, then k/v, copied the past twice)
        flat = None if past_kv is None else past_kv.flatten(0, 1)
        for index in range(self.selected[-1] + 1):
            past_k = None if flat is None else flat[2 * index]
            past_v = None if flat is None else flat[2 * index + 1]
            hidden, mlp_out, k, v = run_layer(self.layers[index], hidden, cos, sin, mask, past_k, past_v, packing)
            presents.append(torch.stack([k, v]))
            if self.peaks is not None:
                self.peaks.append(float(torch.stack([hidden.abs().max(), mlp_out.abs().max()]).max()))
            if index in self.layer_weights:
                features.append(self.features_of(index, hidden, mlp_out))
        features = torch.cat(features, dim=-1)
        return (features if packing is None else packing.unpack(features)), torch.stack(presents)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        valid = attention_mask.bool()[:, :, None]                     # [B, S, 1]
        counts = attention_mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        hidden = self.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        cos, sin = self.rotary_emb(hidden, position_ids)
        features, _ = self.walk(hidden, cos, sin, self._attention_mask(attention_mask))
        pooled = torch.where(valid, features, 0.0).cumsum(dim=1)[:, -1, :] / counts
        # The head runs on the rows twice over: a one-row GEMM takes ONNX Runtime's GEMV
        # path, which adds in another order than the GEMM that several rows take.
        rows = pooled.shape[0]
        logits = self.head(torch.cat([pooled, pooled]))[:rows]
        score = torch.softmax(logits, dim=-1)[:, 1]
        return score, logits

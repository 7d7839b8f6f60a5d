"""Giving a random backbone the activation outliers real LLMs have, so quantization is tested
on the hard case and not on Gaussian weights (which quantize unrealistically well).

Two published phenomena, built in as they arise in real checkpoints:

* **Massive activations** (Sun et al. 2024, "Massive Activations in Large Language Models"):
  from an early layer on, a few fixed residual channels hold values hundreds to thousands of
  times the median, on a few tokens only (the first token and delimiters such as "." or "\\n"),
  written once by one layer's MLP and carried unchanged by the residual stream after it. Here:
  trigger tokens (delimiters and a few frequent words) get a shared direction `v` added to their
  embedding (at 3x the residual norm the layer sees); in layer `layer` one MLP neuron reads `v` (its gate and up rows are `v`), so it
  fires only on trigger tokens, quadratically (silu(p)*p), and its down_proj column writes
  `magnitude` (calibrated by running the layers up to it) into `channels` residual channels.
* **Outlier features** (Dettmers et al. 2022, LLM.int8()): a few channels of every projection's
  input are ~20x the rest on every token. Here: the RMSNorm weights of `feature_channels`
  channels are multiplied by `feature_scale` and the q/k/v/gate/up columns reading them divided
  by it, so the network's function is unchanged and only the activations' spread is real.

Everything is a per-tensor edit keyed by parameter name, so both the in-memory builder and the
shard-by-shard one (real-scale dims) apply it the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

#: delimiters and frequent words, as Qwen3's byte-level tokens ("Ġ" a leading space, "Ċ" a newline)
TRIGGER_TOKENS = (".", ",", "Ċ", ":", "!", "?", "Ġthe", "Ġand", "Ġof", "Ġto")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MassiveActivations:
    channels: int = 2                 # residual channels that carry massive activations
    magnitude: float = 1000.0         # their value on trigger tokens, after `layer`
    layer: int = 1                    # the layer whose MLP writes them (0-based)
    feature_channels: Optional[int] = None   # outlier-feature channels (default: hidden // 256, at least 2)
    feature_scale: float = 20.0
    trigger_tokens: tuple = TRIGGER_TOKENS


@dataclass
class MassivePlan:
    """The channels, neuron and direction one seed picks for one backbone."""
    spec: MassiveActivations
    massive_channels: list
    signs: list
    feature_channels: list
    neuron: int
    direction: "object"               # torch float32 [hidden], unit norm
    trigger_ids: list
    down_scale: float = 1.0           # set by calibration: down_proj[massive, neuron] = down_scale * sign
    calibrated: bool = field(default=False)


def plan_for(spec: MassiveActivations, hidden_size: int, intermediate_size: int, num_layers: int, seed: int,
             tokenizer) -> MassivePlan:
    import torch
    if not 0 <= spec.layer < num_layers:
        raise ValueError(f"massive activations at layer {spec.layer} of a {num_layers}-layer backbone")
    features = spec.feature_channels if spec.feature_channels is not None else max(2, hidden_size // 256)
    if spec.channels + features >= hidden_size:
        raise ValueError(f"{spec.channels} massive + {features} feature channels do not fit {hidden_size}")
    g = torch.Generator().manual_seed(seed + 7)
    order = torch.randperm(hidden_size, generator=g).tolist()
    direction = torch.randn(hidden_size, generator=g)
    ids = [tokenizer.token_to_id(t) for t in spec.trigger_tokens]
    if any(i is None for i in ids):
        raise ValueError(f"the tokenizer lacks trigger tokens: {[t for t, i in zip(spec.trigger_tokens, ids) if i is None]}")
    return MassivePlan(spec, massive_channels=order[:spec.channels],
                       signs=[1.0 if k % 2 == 0 else -0.6 for k in range(spec.channels)],
                       feature_channels=order[spec.channels:spec.channels + features],
                       neuron=int(torch.randint(intermediate_size, (1,), generator=g)),
                       direction=direction / direction.norm(), trigger_ids=ids)


def edit(plan: MassivePlan, name: str, tensor) -> None:
    """Apply the plan to one parameter (fp32, in place), by its checkpoint name."""
    import torch
    k, features = plan.spec.feature_scale, plan.feature_channels
    match = _LAYER.search(name)
    if not match:
        return
    layer, part = int(match.group(1)), match.group(2)
    if part in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        tensor[features] *= k
    elif part in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight"):
        if layer == plan.spec.layer and part.startswith("mlp."):
            tensor[plan.neuron] = plan.direction
        tensor[:, features] /= k
    elif part == "mlp.down_proj.weight" and layer == plan.spec.layer:
        tensor[:, plan.neuron] = 0.0
        tensor[plan.massive_channels, plan.neuron] = plan.down_scale * torch.tensor(plan.signs)


def calibration_ids(plan: MassivePlan, vocab_size: int, seed: int, length: int = 96) -> list:
    """Random tokens with a trigger token every fourth position."""
    import torch
    g = torch.Generator().manual_seed(seed + 11)
    ids = torch.randint(1000, min(vocab_size, 100000), (length,), generator=g).tolist()
    for n in range(0, length, 4):
        ids[n] = plan.trigger_ids[(n // 4) % len(plan.trigger_ids)]
    return ids


def _run_to_layer(plan: MassivePlan, base_model, ids: list, module, pre: bool):
    """What `module` of layer `layer` sees (pre: its input) when layers 0..layer run on `ids`."""
    import torch
    seen = []
    if pre:
        hook = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else
                                                                                     kwargs["hidden_states"]),
                                                with_kwargs=True)
    else:
        hook = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    keep = base_model.config.num_hidden_layers
    try:
        with torch.no_grad():
            base_model.config.num_hidden_layers = plan.spec.layer + 1
            base_model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        base_model.config.num_hidden_layers = keep
        hook.remove()
    return seen[0][0]


def calibrate(plan: MassivePlan, base_model, vocab_size: int, seed: int) -> float:
    """Make trigger tokens stand out where the massive layer reads them, and scale its
    down_proj column so the massive channels reach `magnitude` there. `base_model`: a
    Qwen3Model holding at least layers 0..layer, the plan applied at down_scale 1. The trigger
    direction is added to the trigger tokens' embeddings at 3x the residual norm the layer
    sees on other tokens: weaker, and what earlier layers add swamps it. Returns the factor
    the down_proj column must be multiplied by."""
    import torch
    ids = calibration_ids(plan, vocab_size, seed)
    trigger = [n for n, i in enumerate(ids) if i in plan.trigger_ids]
    others = [n for n in range(len(ids)) if n not in set(trigger)]
    layer = base_model.layers[plan.spec.layer]
    residual = _run_to_layer(plan, base_model, ids, layer, pre=True)
    strength = 3.0 * residual[others].float().norm(dim=-1).median().item()
    with torch.no_grad():
        base_model.embed_tokens.weight[plan.trigger_ids] += strength * plan.direction
    fired = _run_to_layer(plan, base_model, ids, layer.mlp.down_proj, pre=False)[:, plan.neuron].float()
    if not fired[trigger].mean().item() > 0:
        raise ValueError("the trigger neuron does not fire on trigger tokens; pick another seed")
    factor = plan.spec.magnitude / fired[trigger].mean().item()
    plan.down_scale, plan.calibrated = plan.down_scale * factor, True
    return factor

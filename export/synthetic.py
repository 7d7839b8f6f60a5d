"""Tiny random Qwen3 backbones and synthetic SIREN heads in the exact artifact format.

The real backbone and head cannot be downloaded offline; these stand in for them in the
demo, the tests and the benchmarks. The head's output layer is scaled so scores spread
over (0, 1): saturated scores would hide parity errors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from . import massive_activations
from .massive_activations import MassiveActivations
from .qwen_tokenizer_build import QWEN3_VOCAB_SIZE, save_qwen3_tokenizer


def make_backbone(folder: Path, *, num_layers: int = 4, hidden_size: int = 64, intermediate_size: int = 128,
                  num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, seed: int = 0,
                  tokenizer_cache: Optional[Path] = None, max_position_embeddings: int = 4096,
                  outlier_channels: int = 0, outlier_scale: float = 40.0,
                  massive: Optional["MassiveActivations"] = None) -> Path:
    """A randomly initialised Qwen3ForCausalLM (tied embeddings) + the real Qwen3 tokenizer.

    outlier_channels: that many residual-stream channels (chosen by the seed) carry very large
    activations, as real Qwen3/Llama checkpoints do ("massive activations"): their embedding
    column and every layer's down_proj row are multiplied by `outlier_scale`, so every token's
    residual stream, and after RMSNorm every projection's input, has a few channels tens of
    times larger than the rest. Random Gaussian weights alone quantize unrealistically well.
    massive: real LLMs' outliers as published (siren_export.massive_activations)."""
    from transformers import Qwen3ForCausalLM

    from transformers.utils import logging as tf_logging
    tf_logging.disable_progress_bar()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _qwen3_config(num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim,
                           max_position_embeddings)
    save_qwen3_tokenizer(folder, tokenizer_cache)
    _save_random(Qwen3ForCausalLM, config, folder, hidden_size, seed, outlier_channels, outlier_scale, massive)
    return folder


def make_llama_backbone(folder: Path, *, num_layers: int = 4, hidden_size: int = 64, intermediate_size: int = 128,
                        num_heads: int = 4, num_kv_heads: int = 1, head_dim: int = 16, seed: int = 0,
                        max_position_embeddings: int = 4096, rms_norm_eps: float = 1e-5,
                        vocab_size: Optional[int] = None, tie_word_embeddings: bool = False,
                        original_max_position_embeddings: int = 64) -> Path:
    """A randomly initialised LlamaForCausalLM with Llama 3's rope scaling (`llama3`), and a
    Llama-3-style tokenizer made offline (BOS post-processor, no pad). `vocab_size` defaults
    to the tokenizer's; pass the real 128,256 to measure real-scale sizes (the extra rows are
    never looked up)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .llama_tokenizer_build import BOS_TOKEN, EOS_TOKEN, build_llama3_style_tokenizer, save_llama3_style_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_llama3_style_tokenizer(folder)
    ids = build_llama3_style_tokenizer()
    config = LlamaConfig(vocab_size=max(vocab, vocab_size or 0), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=head_dim, max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps,
                         rope_theta=500000.0, tie_word_embeddings=tie_word_embeddings,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": original_max_position_embeddings},
                         bos_token_id=ids.token_to_id(BOS_TOKEN), eos_token_id=ids.token_to_id(EOS_TOKEN))
    _save_random(LlamaForCausalLM, config, folder, hidden_size, seed)
    return folder


def _save_random(model_class, config, folder: Path, hidden_size: int, seed: int, outlier_channels: int = 0,
                 outlier_scale: float = 1.0, massive=None) -> None:
    """Instantiate `model_class(config)` with this module's random initialisation and save it."""
    import torch
    torch.manual_seed(seed)
    model = model_class(config)
    std = _init_std(hidden_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _init_(name, p, std)
        if outlier_channels:
            channels = torch.randperm(hidden_size, generator=torch.Generator().manual_seed(seed + 1))[:outlier_channels]
            model.model.embed_tokens.weight[:, channels] *= outlier_scale
            for layer in model.model.layers:
                layer.mlp.down_proj.weight[channels, :] *= outlier_scale
        if massive is not None:
            plan = _massive_plan(massive, config, folder, seed)
            for name, p in model.named_parameters():
                massive_activations.edit(plan, name, p)
            factor = massive_activations.calibrate(plan, model.model, config.vocab_size, seed)
            model.model.layers[massive.layer].mlp.down_proj.weight[plan.massive_channels, plan.neuron] *= factor
    model.save_pretrained(str(folder), safe_serialization=True)


def _massive_plan(massive, config, folder: Path, seed: int):
    from tokenizers import Tokenizer
    return massive_activations.plan_for(massive, config.hidden_size, config.intermediate_size,
                                        config.num_hidden_layers, seed,
                                        Tokenizer.from_file(str(Path(folder) / "tokenizer.json")))


def _qwen3_config(num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim,
                 max_position_embeddings):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=hidden_size,
                       intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def _init_std(hidden_size: int) -> float:
    # Random init is too tame to make layers differ much; widen it so every layer matters,
    # scaled with the width so deep, wide models do not saturate the residual stream.
    return 0.08 * (64 / hidden_size) ** 0.5


def _init_(name: str, p, std: float) -> None:
    if "norm" in name:
        p.copy_(1.0 + 0.2 * __import__("torch").randn_like(p))
    elif p.dim() == 2:
        p.normal_(0.0, std)


def make_large_backbone(folder: Path, *, num_layers: int, hidden_size: int, intermediate_size: int,
                        num_heads: int, num_kv_heads: int, head_dim: int, dtype: str = "bf16", seed: int = 0,
                        shard_bytes: int = 2 << 30, tokenizer_cache: Optional[Path] = None,
                        max_position_embeddings: int = 4096, massive: Optional[MassiveActivations] = None) -> Path:
    """Like :func:`make_backbone`, for real-scale dimensions: the weights are made one tensor
    at a time and written in safetensors shards, so memory stays near one shard (a 4B model
    never sits in memory whole). Same initialisation as make_backbone. `massive`: the layers up
    to the one that writes the massive activations are held (fp32) until it is calibrated."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _qwen3_config(num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim,
                           max_position_embeddings)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Qwen3ForCausalLM(config).named_parameters()}
    shapes.pop("lm_head.weight", None)          # tied to the embeddings
    torch_dtype = getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype])
    save_qwen3_tokenizer(folder, tokenizer_cache)
    plan = _massive_plan(massive, config, folder, seed) if massive is not None else None
    config.torch_dtype = torch_dtype
    config.save_pretrained(str(folder))
    torch.manual_seed(seed)
    std = _init_std(hidden_size)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in current})
            current, size = {}, 0

    def put(name, tensor):
        nonlocal size
        tensor = tensor.to(torch_dtype)
        if size and size + tensor.nbytes > shard_bytes:
            flush()
        current[name] = tensor
        size += tensor.nbytes
    held = {}                                   # fp32, until the massive layer is calibrated
    last_held = f"model.layers.{massive.layer}." if massive is not None else None
    names = list(shapes)
    for n, name in enumerate(names):
        tensor = torch.empty(shapes[name], dtype=torch.float32)
        _init_(name, tensor, std)
        if plan is None:
            put(name, tensor)
            continue
        massive_activations.edit(plan, name, tensor)
        if plan.calibrated:
            put(name, tensor)
            continue
        held[name] = tensor
        if name.startswith(last_held) and (n + 1 == len(names) or not names[n + 1].startswith(last_held)):
            _calibrate_held(plan, config, held, seed)
            for held_name, held_tensor in held.items():
                put(held_name, held_tensor)
            held.clear()
    flush()
    total = sum((folder / n).stat().st_size for n in shards)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


def _calibrate_held(plan, config, held: dict, seed: int) -> None:
    """Run the layers made so far (a Qwen3Model cut after the massive layer) to scale its
    down_proj column to the target magnitude."""
    import copy
    import torch
    from transformers import Qwen3Model
    short = copy.deepcopy(config)
    short.num_hidden_layers = plan.spec.layer + 1
    with torch.device("meta"):
        model = Qwen3Model(short)
    state = {k.removeprefix("model."): v for k, v in held.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"norm.weight"}:
        raise ValueError(f"calibrating massive activations: missing {missing}, unexpected {unexpected}")
    model.norm.weight = torch.nn.Parameter(torch.ones(config.hidden_size))
    model.rotary_emb = type(model.rotary_emb)(config=short)
    factor = massive_activations.calibrate(plan, model.eval(), config.vocab_size, seed)
    down = held[f"model.layers.{plan.spec.layer}.mlp.down_proj.weight"]
    down[plan.massive_channels, plan.neuron] *= factor


def make_head(folder: Path, backbone: str, *, num_layers: int, width: int,
              selected_layers: Sequence[int], neurons_per_layer: int = 8, pooling_type: str = "residual_mean",
              layer_dims: Sequence[int] = (32, 16), dropout_rates: Optional[Sequence[float]] = None,
              max_length: int = 64, default_threshold: float = 0.5, output_scale: float = 4.0,
              task: str = "content", seed: int = 0, revision: Optional[str] = None,
              standardize: bool = False) -> Path:
    """Write `siren_config.json` + `siren.safetensors` exactly as the real artifact lays them out.

    width: the backbone's hidden size (both readouts are hidden-size vectors).
    standardize: fit the first layer to the features' scale on real texts (runs the backbone).
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    layers = sorted(selected_layers)
    neurons = {f"layer{l}_{pooling_type}": torch.randperm(width, generator=gen)[:neurons_per_layer].tolist()
               for l in layers}
    weights = {str(l): round(0.5 + float(torch.rand(1, generator=gen)), 4) for l in layers}
    dropout_rates = list(dropout_rates) if dropout_rates is not None else [0.1] + [0.0] * (len(layer_dims) - 1)
    input_dim = neurons_per_layer * len(layers)
    tensors, index, prev = {}, 0, input_dim
    for dim, rate in zip(layer_dims, dropout_rates):
        tensors[f"network.{index}.weight"] = torch.randn(dim, prev, generator=gen) / prev ** 0.5
        tensors[f"network.{index}.bias"] = 0.1 * torch.randn(dim, generator=gen)
        index += 3 if rate > 0 else 2
        prev = dim
    tensors[f"network.{index}.weight"] = output_scale * torch.randn(2, prev, generator=gen) / prev ** 0.5
    tensors[f"network.{index}.bias"] = torch.zeros(2)
    config = {
        "task": task,
        "base_model": {"model_id": str(backbone), "revision": revision},
        "siren_module": {"pooling_type": pooling_type, "selected_layers": layers, "layer_weights": weights,
                         "selected_neurons_dict": neurons},
        "mlp": {"input_dim": input_dim, "layer_dims": list(layer_dims), "dropout_rates": dropout_rates,
                "num_classes": 2},
        "inference": {"max_length": max_length, "default_threshold": default_threshold},
    }
    if standardize:
        _standardize_first_layer(tensors, backbone, layers, neurons, weights, pooling_type)
    (folder / "siren_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "siren.safetensors"))
    return folder


def _standardize_first_layer(tensors: dict, backbone: str, layers: list, neurons: dict, weights: dict,
                             pooling_type: str) -> None:
    """Fold each feature's mean and spread on real texts into the first Linear, as training
    would: a backbone with massive activations pools values in the hundreds into a few
    features, which saturate a random head (every score 0 or 1) and leave nothing to compare."""
    import torch
    from siren_runtime.calibration import calibration_texts
    from siren_runtime.decisions import gate_texts
    from .backbone import load_backbone, load_backbone_config

    # the exporter's own loader: a bf16 real-scale backbone is widened tensor by tensor, so a
    # 4B head is fitted in ~15 GiB, not a transformers fp32 load beside the bf16 shards
    config = load_backbone_config(str(backbone), None)
    loaded = load_backbone(str(backbone), None, int(config.num_hidden_layers), "fp32", config=config)
    model, tokenizer = loaded.model, loaded.tokenizer
    seen = {}
    hooks = [model.layers[l].mlp.register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(l, out))
             for l in layers] if pooling_type == "mlp_mean" else []
    rows = []
    with torch.no_grad():
        for text in calibration_texts() + gate_texts():
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model(input_ids=ids, output_hidden_states=True)
            per_layer = [(seen[l] if hooks else out.hidden_states[l + 1])[0].mean(dim=0) for l in layers]
            rows.append(torch.cat([weights[str(l)] * h[neurons[f"layer{l}_{pooling_type}"]]
                                   for l, h in zip(layers, per_layer)]))
    for hook in hooks:
        hook.remove()
    features = torch.stack(rows)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    w, b = tensors["network.0.weight"], tensors["network.0.bias"]
    tensors["network.0.weight"] = w / std
    tensors["network.0.bias"] = b - (w / std) @ mean


def make_trajectory_head(folder: Path, backbone: str, *, width: int, blocks: int, max_length: int = 512,
                         threshold: float = 0.5, seed: int = 0, num_layers: Optional[int] = None,
                         model_id: Optional[str] = None) -> Path:
    """A synthetic Agent-SIREN artifact in the released format (task "trajectory": the last
    token's state after `blocks` decoder blocks, a linear readout of `width` weights + a bias),
    with base_model.model_id pointing at the local backbone folder."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, generator=generator) * (2.0 / width ** 0.5)
    bias = torch.randn(1, generator=generator) * 0.1
    save_file({"head.weight": weight.contiguous(), "head.bias": bias.contiguous()}, str(folder / "siren.safetensors"))
    config = {
        "task": "trajectory",
        "base_model": {"model_id": model_id or str(backbone), "revision": None,
                       **({"num_hidden_layers": num_layers} if num_layers else {})},
        "siren_module": {"pooling_type": "last", "hidden_state_index": blocks, "early_exit_blocks": blocks},
        "render": {"tools": "rich", "truncation": "head_tail"},
        "inference": {"max_length": max_length, "default_threshold": threshold},
    }
    (folder / "siren_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def set_chat_template(backbone: Path, template: str) -> None:
    """Give a backbone folder's tokenizer a chat template (the tiny test tokenizers have none)."""
    path = Path(backbone) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")

"""Loading the frozen backbone, truncated to the layers the head reads.

Only layers 0..deepest selected are instantiated (the config is shortened before the
weights are read), so the real 4B model never has to fit in memory whole, and the LM
head is never built.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ArtifactError

#: backbones whose decoder layers the one decoder walk (decoder.run_layer) reproduces: they
#: differ only in what their sub-modules hold (Qwen3's q/k RMSNorm, Llama 3's rope scaling in
#: the rotary embedding's inverse frequencies), which the walk reads from the modules.
SUPPORTED_MODEL_TYPES = ("qwen3", "llama")

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class LoadedBackbone:
    model: Any            # transformers Qwen3Model with only the kept layers
    tokenizer: Any        # transformers fast tokenizer
    model_id: str
    revision: Optional[str]
    num_layers: int       # layers of the full backbone (decides the runtime readout's norm)
    kept_layers: int
    hidden_size: int
    intermediate_size: int
    config: Any


def load_backbone_config(model_id: str, revision: Optional[str], cache_dir: Optional[str] = None):
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_id, revision=revision, cache_dir=cache_dir, trust_remote_code=False)
    except Exception as e:
        raise ArtifactError(f"could not load the backbone config of {model_id!r}"
                            f"{f' at revision {revision}' if revision else ''}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ArtifactError(f"backbone {model_id!r} is a {config.model_type!r} model; "
                            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "use_sliding_window", False):
        raise ArtifactError(f"backbone {model_id!r} uses sliding-window attention, which this exporter does not model")
    return config


def checkpoint_dtype(config) -> Optional[str]:
    """The dtype the checkpoint's weights are stored in ("bf16", "fp16", "fp32"), from its config."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).replace("torch.", "") if stored is not None else ""
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name)


def widen_parameters(model, dtype) -> None:
    """Cast every parameter to `dtype` one tensor at a time (each narrow original is freed as
    soon as its wide copy exists). Buffers (RoPE frequencies) stay as loaded, as with a
    direct load at `dtype`."""
    wide = {}      # tied weights stay one tensor
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.dtype != dtype and param.is_floating_point():
                if id(param) not in wide:
                    wide[id(param)] = type(param)(param.data.to(dtype), requires_grad=False)
                module._parameters[name] = wide[id(param)]
    config = getattr(model, "config", None)
    if config is not None:
        config.dtype = dtype


def load_backbone(model_id: str, revision: Optional[str], kept_layers: int, dtype: str = "fp32",
                  config=None, cache_dir: Optional[str] = None) -> LoadedBackbone:
    import torch
    from transformers import AutoModel, AutoTokenizer

    config = config or load_backbone_config(model_id, revision, cache_dir)
    num_layers = int(config.num_hidden_layers)
    if kept_layers > num_layers:
        raise ArtifactError(f"asked for {kept_layers} layers of a {num_layers}-layer backbone")
    config.num_hidden_layers = kept_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:kept_layers]

    # Weights of the dropped layers and the LM head are expected to be unused.
    tf_logger = logging.getLogger("transformers.modeling_utils")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    # A wider export than the checkpoint (fp32 from bf16) loads at the checkpoint's dtype and
    # widens one tensor at a time: transformers would otherwise hold the bf16 state dict beside
    # the whole fp32 model (19.8 GiB for Qwen3-4B instead of ~15).
    stored = checkpoint_dtype(config)
    load_as = stored if dtype == "fp32" and stored in ("bf16", "fp16") else dtype
    try:
        model = AutoModel.from_pretrained(
            model_id, revision=revision, cache_dir=cache_dir, config=config, dtype=getattr(torch, TORCH_DTYPES[load_as]),
            attn_implementation="sdpa", use_safetensors=True, trust_remote_code=False)
    except Exception as e:
        raise ArtifactError(f"could not load backbone weights from {model_id!r}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        tf_logger.setLevel(level)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if load_as != dtype:
        widen_parameters(model, getattr(torch, TORCH_DTYPES[dtype]))

    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, cache_dir=cache_dir,
                                              trust_remote_code=False)
    if not getattr(tokenizer, "is_fast", False):
        raise ArtifactError(f"backbone {model_id!r} has no fast tokenizer (tokenizer.json); the runtime needs one")
    return LoadedBackbone(model=model, tokenizer=tokenizer, model_id=model_id, revision=revision,
                          num_layers=num_layers, kept_layers=kept_layers,
                          hidden_size=int(config.hidden_size),
                          intermediate_size=int(config.intermediate_size), config=config)

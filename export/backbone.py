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


def checkpoint_files(model_id: str, revision: Optional[str], cache_dir: Optional[str] = None) -> list:
    """The checkpoint's safetensors files (a local folder, the Hub cache, or downloaded into it);
    [] when it has none."""
    import json
    from pathlib import Path
    from transformers.utils import cached_file
    common = dict(revision=revision, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False,
                  _raise_exceptions_for_connection_errors=False)
    index = cached_file(model_id, "model.safetensors.index.json", **common)
    if index:
        shards = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
        found = [cached_file(model_id, shard, **common) for shard in shards]
        return [Path(f) for f in found] if all(found) else []
    single = cached_file(model_id, "model.safetensors", **common)
    return [Path(single)] if single else []


def _rebuild_computed_buffers(model, config) -> bool:
    """Non-persistent buffers (RoPE's inverse frequencies) are computed, not stored: rebuild
    their modules as a plain load builds them. False if a module of another kind has any."""
    for name, module in list(model.named_modules()):
        if not module._non_persistent_buffers_set:
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            return False
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], type(module)(config=config))
    return True


def load_widened(model_id: str, revision: Optional[str], config, dtype, cache_dir: Optional[str] = None):
    """The backbone at `dtype` (wider than its checkpoint), filled tensor by tensor from plain
    reads of the safetensors files: the peak is the wide model plus one narrow tensor (a
    transformers load at the checkpoint's dtype maps the shards, and widening that holds up to
    a shard's mapped pages beside the wide model). None where this checkpoint needs what only
    transformers' loader does (no safetensors, renamed keys, other computed buffers)."""
    import torch
    from transformers import AutoModel
    from .safetensors_reader import iter_tensors
    files = checkpoint_files(model_id, revision, cache_dir)
    if not files:
        return None
    with torch.device("meta"):
        model = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa", trust_remote_code=False)
    stored = set(model.state_dict())              # parameters and persistent buffers
    model.to_empty(device="cpu")                   # uninitialised: every stored tensor is read below
    every = dict(model.named_parameters(remove_duplicate=False))
    every.update(model.named_buffers(remove_duplicate=False))
    targets = {n: t for n, t in every.items() if n in stored}
    if not _rebuild_computed_buffers(model, model.config):
        return None
    prefix = getattr(model, "base_model_prefix", "") + "."

    def target_name(key: str) -> str:
        return key[len(prefix):] if key not in targets and key.startswith(prefix) else key
    filled = set()
    with torch.no_grad():
        for path in files:
            for key, tensor in iter_tensors(path, lambda k: target_name(k) in targets):
                name = target_name(key)
                target = targets[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ArtifactError(f"{path.name}: {key} has shape {tuple(tensor.shape)}, "
                                        f"the model expects {tuple(target.shape)}")
                target.copy_(tensor)
                filled.add(id(target))
                del tensor
    if any(id(t) not in filled for t in targets.values()):
        return None
    model.config.dtype = dtype
    return model


def pad_token_id(tokenizer, model_id: str) -> int:
    """The id right padding uses: the pad token, else eos (llm-siren's rule)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ArtifactError(f"backbone tokenizer of {model_id!r} has neither a pad nor an eos token")
    return int(pad_id)


def save_bare_tokenizer(tokenizer, path) -> None:
    """The fast tokenizer's tokenizer.json without padding or truncation (the runtime sets its own)."""
    backend = tokenizer.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(path))


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
    # A wider export than the checkpoint (fp32 from bf16) is filled tensor by tensor from plain
    # reads: transformers would hold the bf16 state dict (or its mapped shards) beside the
    # whole fp32 model (19.8 GiB for Qwen3-4B, 17.2 with a widening pass, ~15 this way).
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    widening = dtype == "fp32" and checkpoint_dtype(config) in ("bf16", "fp16")
    try:
        model = load_widened(model_id, revision, config, torch_dtype, cache_dir) if widening else None
        if model is None:
            model = AutoModel.from_pretrained(
                model_id, revision=revision, cache_dir=cache_dir, config=config, dtype=torch_dtype,
                attn_implementation="sdpa", use_safetensors=True, trust_remote_code=False)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"could not load backbone weights from {model_id!r}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        tf_logger.setLevel(level)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, cache_dir=cache_dir,
                                              trust_remote_code=False)
    if not getattr(tokenizer, "is_fast", False):
        raise ArtifactError(f"backbone {model_id!r} has no fast tokenizer (tokenizer.json); the runtime needs one")
    return LoadedBackbone(model=model, tokenizer=tokenizer, model_id=model_id, revision=revision,
                          num_layers=num_layers, kept_layers=kept_layers,
                          hidden_size=int(config.hidden_size),
                          intermediate_size=int(config.intermediate_size), config=config)

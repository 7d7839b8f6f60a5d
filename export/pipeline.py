"""`siren export`: artifact + backbone -> bundle directory.

The bundle is written into a temporary sibling directory and renamed into place at the
end, so an interrupted export never leaves something that looks like a valid bundle.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

from siren_runtime.calibration import calibration_texts
from siren_runtime.bundle import MANIFEST_NAME, StreamingSpec, read_bundle, write_manifest
from siren_runtime.bundle_files import Staging, describe_file
from siren_runtime.hub import CARD_NAME
from siren_runtime.private_copy import trim_heap
from siren_runtime.tokenization import TextEncoder

from . import __version__
from .artifact import CONFIG_NAME, WEIGHTS_NAME, check_against_backbone, load_artifact
from .backbone import TORCH_DTYPES, load_backbone, load_backbone_config, pad_token_id, save_bare_tokenizer
from siren_runtime.card import model_card
from .onnx_export import MODEL_FILE, STEP_FILE, export_scorer, export_shared_step
from .parity import (activation_peak, check_fp16_range, check_onnx_against_module,
                     check_step_against_module, check_tokenizer, cpu_unrunnable_reason,
                     module_expectations)
from .prefix_head import write_prefix_head
from .progress import Progress
from .scorer import READOUTS, SirenScorer
from .step_scorer import SirenStepScorer
from .trajectory import export_trajectory_bundle, is_trajectory_artifact

PREFIX_HEAD_FILE = "prefix_head.npz"
TOKENIZER_FILE = "tokenizer.json"


def _versions() -> dict:
    out = {"siren-deploy": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _quiet_transformers(show_progress: bool) -> None:
    """transformers' own warnings off; Hugging Face download bars stay on (an 8 GB backbone
    download must not be silent) unless progress is off."""
    try:
        from transformers.utils import logging as tf_logging
        if os.environ.get("TRANSFORMERS_VERBOSITY") is None:
            tf_logging.set_verbosity_error()
    except ImportError:
        pass
    if not show_progress:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()


def export_bundle(artifact: str, output: str | Path, *, backbone: Optional[str] = None, dtype: str = "fp32",
                  readout: str = "runtime", overwrite: bool = False, parity_tolerance: Optional[float] = None,
                  cache_dir: Optional[str] = None, show_progress: bool = True, streaming: bool = True,
                  revision: Optional[str] = None, backbone_revision: Optional[str] = None) -> Path:
    """Export `artifact` (Hub id or folder) into the bundle directory `output`.

    revision: the artifact's Hub revision; backbone_revision: the backbone's (default: the
        artifact's pin for its own backbone, main for an overriding `backbone`).
    cache_dir: Hugging Face cache for the artifact and the backbone alike.
    streaming: also write the incremental step graph (shares the weights file).
    """
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    output = Path(output).expanduser().resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    _quiet_transformers(show_progress)
    if is_trajectory_artifact(artifact, cache_dir=cache_dir, revision=revision):
        if readout != "runtime":
            raise ValueError("--readout applies to content guards; a trajectory guard reads one state, unnormed")
        return export_trajectory_bundle(artifact, output, backbone=backbone, dtype=dtype, overwrite=overwrite,
                                        parity_tolerance=parity_tolerance, cache_dir=cache_dir,
                                        show_progress=show_progress, revision=revision,
                                        backbone_revision=backbone_revision, streaming=streaming)
    progress = Progress(total_steps=8 if streaming else 7, enabled=show_progress)

    progress.start(f"reading SIREN artifact {artifact}")
    art = load_artifact(artifact, cache_dir=cache_dir, revision=revision)
    artifact_revision = revision
    model_id = backbone or art.base_model_id
    revision = backbone_revision or (None if backbone else art.base_model_revision)
    config = load_backbone_config(model_id, revision, cache_dir=cache_dir)
    check_against_backbone(art, int(config.num_hidden_layers), int(config.hidden_size))
    kept = art.deepest_layer + 1
    progress.done(f"{art.pooling_type}, {len(art.selected_layers)} layers, {art.feature_dim} features")

    load_dtype = "bf16" if dtype == "fp16" else dtype
    progress.start(f"loading backbone {model_id} (layers 0..{kept - 1} of {config.num_hidden_layers}, {load_dtype})")
    loaded = load_backbone(model_id, revision, kept, dtype=load_dtype, config=config, cache_dir=cache_dir)
    trim_heap()          # the freed checkpoint reads and tokenizer parse buffers, before anything sits on top
    scorer = SirenScorer(loaded.model, loaded.num_layers, art, readout=readout).eval()
    tokenizer = loaded.tokenizer
    pad_id = pad_token_id(tokenizer, model_id)
    pad_token = tokenizer.pad_token if tokenizer.pad_token is not None else tokenizer.eos_token
    progress.done()
    with Staging(output) as stage:
        staging = stage.path
        progress.start("writing the tokenizer and measuring activations")
        save_bare_tokenizer(tokenizer, staging / TOKENIZER_FILE)
        encoder = TextEncoder(staging / TOKENIZER_FILE, max_length=art.max_length, pad_token_id=pad_id)
        trim_heap()
        texts = calibration_texts()
        check_tokenizer(tokenizer, encoder, texts)
        # fp16 is checked for overflow on the bf16 copy (fp32's range, half the memory).
        peak = activation_peak(scorer, encoder, texts)
        if dtype == "fp16":
            check_fp16_range(peak)
            import torch
            rotary = loaded.model.rotary_emb
            inv_freq = rotary.inv_freq.detach().clone()        # RoPE frequencies stay as loaded
            loaded.model.to(torch.float16)
            rotary.inv_freq = inv_freq
            scorer = SirenScorer(loaded.model, loaded.num_layers, art, readout=readout).eval()
        progress.done(f"largest |activation| on calibration texts: {peak:.4g}")

        prefix_head = write_prefix_head(scorer.head, staging / PREFIX_HEAD_FILE, art.feature_dim)
        progress.start("tracing and writing the ONNX graph")
        graph = export_scorer(scorer, staging / MODEL_FILE, progress)
        gc.collect()
        trim_heap()          # the traced program and its ONNX proto are gone; give their pages back
        progress.done()

        streaming_meta = None
        if streaming:
            progress.start("tracing the streaming step graph (KV cache + running sums)")
            step = SirenStepScorer(loaded.model, loaded.num_layers, art, readout=readout).eval()
            attn = loaded.model.layers[0].self_attn
            kv = {"kv_layers": kept, "kv_heads": int(config.num_key_value_heads), "head_dim": int(attn.head_dim),
                  "kv_dtype": dtype, "feature_dim": art.feature_dim}
            import torch
            streaming_meta = export_shared_step(step, staging, kv, getattr(torch, TORCH_DTYPES[dtype]), graph, progress)
            sharing = streaming_meta["weights"]
            progress.done(f"{sharing['shared_bytes'] / 1e6:.1f} MB of weights shared with {MODEL_FILE}")

        progress.start("scoring the calibration texts with the torch module, then freeing it")
        unrunnable = cpu_unrunnable_reason(staging / MODEL_FILE, dtype)
        expected = None
        if unrunnable is None:
            expected = module_expectations(scorer, encoder, texts, dtype, streaming_meta is not None)
        # The torch weights go before ONNX Runtime loads the graphs: never two copies at once.
        scorer = step = None
        loaded.model = None
        gc.collect()
        progress.done(f"{len(texts)} texts, {sum(len(w) for w in expected.schedule)} streaming steps"
                      if expected is not None else f"skipped: {unrunnable}")

        progress.start("checking the ONNX graphs with ONNX Runtime against those scores")
        if expected is None:
            parity = {"backend": "onnxruntime-cpu", "checked": False,
                      "reason": f"{unrunnable}; check it on a GPU with `siren verify --reference-bundle`"}
            if streaming_meta is not None:
                streaming_meta["parity"] = dict(parity)
            progress.done(f"not checked: {unrunnable}")
        else:
            parity = check_onnx_against_module(staging / MODEL_FILE, expected, parity_tolerance)
            detail = (f"max |Δscore| {parity['max_abs_diff']:.2e}" if parity.get("checked")
                      else f"not checked: {parity.get('reason')}")
            gc.collect()
            if streaming_meta is not None:
                spec = StreamingSpec(graph=None, **{k: streaming_meta[k] for k in (
                    "kv_layers", "kv_heads", "head_dim", "kv_dtype", "feature_dim")})
                streaming_meta["parity"] = check_step_against_module(
                    staging / STEP_FILE, expected, spec, art.max_length, parity_tolerance)
                if streaming_meta["parity"].get("checked"):
                    detail += f"; streaming max |Δscore| {streaming_meta['parity']['max_abs_diff']:.2e}"
            progress.done(detail)

        progress.start("writing the manifest")
        files = [MODEL_FILE, graph["external_data"], TOKENIZER_FILE, PREFIX_HEAD_FILE]
        if streaming_meta is not None:
            files += [f for f in (STEP_FILE, streaming_meta["external_data"]) if f]
        for name in files:
            os.chmod(staging / name, 0o644)
        manifest = {
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "artifact": art.source, "revision": artifact_revision,
                "files": {CONFIG_NAME: art.file_sha256[CONFIG_NAME], WEIGHTS_NAME: art.file_sha256[WEIGHTS_NAME]},
                "declared_backbone": {"model_id": art.base_model_id, "revision": art.base_model_revision},
            },
            "backbone": {
                "model_id": model_id, "revision": revision, "model_type": config.model_type,
                "num_hidden_layers": loaded.num_layers, "hidden_size": loaded.hidden_size,
                "intermediate_size": loaded.intermediate_size,
                "vocab_size": int(config.vocab_size),
            },
            "siren": {
                "task": "content", "pooling_type": art.pooling_type, "selected_layers": art.selected_layers,
                "layer_weights": {str(k): v for k, v in art.layer_weights.items()},
                "neurons_per_layer": {str(k): len(v) for k, v in art.neurons.items()},
                "feature_dim": art.feature_dim, "readout": readout, "backbone_layers": kept,
                "last_layer_normed": readout == "runtime" and art.pooling_type == "residual_mean"
                                     and art.deepest_layer == loaded.num_layers - 1,
            },
            "inference": {
                "max_length": art.max_length, "default_threshold": art.default_threshold,
                "pad_token_id": int(pad_id), "pad_token": pad_token, "padding_side": "right",
            },
            "model": {"path": MODEL_FILE, "dtype": dtype, "activation_peak": peak, **graph,
                      # a running-sum pool and a two-row head: a text scores the same in any batch (CPU)
                      "batch_invariant": True},
            "tokenizer": {"path": TOKENIZER_FILE},
            **({"streaming": streaming_meta} if streaming_meta is not None else {}),
            "prefix_head": {"path": PREFIX_HEAD_FILE, **prefix_head},
            "files": {name: describe_file(staging, name) for name in files},
            "tools": _versions(),
            "parity": parity,
        }
        write_manifest(staging, manifest)
        (staging / CARD_NAME).write_text(model_card(read_bundle(staging).raw()), encoding="utf-8")
        os.chmod(staging / CARD_NAME, 0o644)
        read_bundle(staging).verify()          # the contract's own reader accepts what was written
        stage.publish(overwrite=overwrite)
        progress.done(f"{output / MANIFEST_NAME}")
    return output

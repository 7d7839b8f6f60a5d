"""`siren export` for trajectory artifacts (Agent-SIREN): artifact + backbone -> bundle.

An Agent-SIREN head is one linear readout of the state of the last real token after
``siren_module.early_exit_blocks`` decoder blocks, the final norm not applied (llm-siren's
default ``early_exit=True``), through a sigmoid. The graph is that: the kept blocks (the one
decoder walk, :func:`siren_export.decoder.run_layer`), the last real token's state, the dot
product in fp32. The bundle also carries the tokenizer and the backbone's chat template with
the special tokens it is rendered with; the manifest's ``guard`` section names the kind and
the readout, which the runtime reads from there (``siren_runtime.bundle.GuardSpec``).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from siren_runtime.bundle import MANIFEST_NAME, read_bundle, write_manifest
from siren_runtime.bundle_files import Staging, describe_file
from siren_runtime.private_copy import trim_heap

from .artifact import CONFIG_NAME, WEIGHTS_NAME, resolve_artifact
from .backbone import TORCH_DTYPES, load_backbone, load_backbone_config, pad_token_id, save_bare_tokenizer
from .errors import ArtifactError, ParityError
from .onnx_export import MODEL_FILE, STEP_FILE, export_scorer, export_shared_step
from .progress import Progress

TOKENIZER_FILE = "tokenizer.json"
TEMPLATE_FILE = "chat_template.jinja"
#: fp32 graph vs its torch module on the calibration trajectories
TOLERANCE = 1e-4


@dataclass
class TrajectoryArtifact:
    source: str
    config: dict
    blocks: int
    weight: object          # torch.Tensor [hidden]
    bias: float
    max_length: int
    default_threshold: float
    base_model_id: str
    base_model_revision: Optional[str]
    file_sha256: dict


def is_trajectory_artifact(source: str, cache_dir: Optional[str] = None, revision: Optional[str] = None) -> bool:
    config_path, _ = resolve_artifact(source, cache_dir=cache_dir, revision=revision)
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{source}: {CONFIG_NAME} is not valid JSON ({e})") from None
    return isinstance(config, dict) and config.get("task") == "trajectory"


def load_trajectory_artifact(source: str, cache_dir: Optional[str] = None,
                             revision: Optional[str] = None) -> TrajectoryArtifact:
    """Read and check a trajectory artifact; other pooling or rendering contracts are refused
    by name, as llm-siren refuses them."""
    import torch
    from safetensors.torch import load_file
    from siren_runtime.bundle_files import sha256_file

    config_path, weights_path = resolve_artifact(source, cache_dir=cache_dir, revision=revision)
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))

    def need(cond, message):
        if not cond:
            raise ArtifactError(f"{source}: {message}")
    need(config.get("task") == "trajectory", f"task is {config.get('task')!r}, not 'trajectory'")
    module, render, inference, base = (config.get(k) for k in ("siren_module", "render", "inference", "base_model"))
    need(isinstance(module, dict), "siren_module section is missing")
    need(module.get("pooling_type") == "last",
         f"pooling_type {module.get('pooling_type')!r} is not supported (Agent-SIREN reads the last token: 'last')")
    blocks = module.get("early_exit_blocks")
    need(isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 1,
         f"siren_module.early_exit_blocks must be a positive integer, got {blocks!r}")
    need(isinstance(render, dict), "render section is missing")
    need(render.get("tools") == "rich" and render.get("truncation") == "head_tail",
         f"unsupported rendering contract {render.get('tools')!r}/{render.get('truncation')!r} "
         "(supported: 'rich'/'head_tail')")
    need(isinstance(inference, dict), "inference section is missing")
    max_length, threshold = inference.get("max_length"), inference.get("default_threshold")
    need(isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 2,
         f"inference.max_length must be an integer >= 2, got {max_length!r}")
    need(isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0.0 <= threshold <= 1.0,
         f"inference.default_threshold must be in [0, 1], got {threshold!r}")
    need(isinstance(base, dict) and isinstance(base.get("model_id"), str) and base["model_id"],
         "base_model.model_id is missing")
    state = load_file(str(weights_path))
    need("head.weight" in state and "head.bias" in state, f"{WEIGHTS_NAME} must hold head.weight and head.bias")
    weight, bias = state["head.weight"].to(torch.float32).reshape(-1), state["head.bias"].to(torch.float32).reshape(-1)
    need(bias.numel() == 1, f"head.bias must hold one value, got {bias.numel()}")
    need(bool(torch.isfinite(weight).all()) and math.isfinite(float(bias[0])), "the head holds non-finite values")
    return TrajectoryArtifact(source=source, config=config, blocks=blocks, weight=weight, bias=float(bias[0]),
                              max_length=max_length, default_threshold=float(threshold),
                              base_model_id=base["model_id"], base_model_revision=base.get("revision") or None,
                              file_sha256={CONFIG_NAME: sha256_file(Path(config_path)),
                                           WEIGHTS_NAME: sha256_file(Path(weights_path))})


def trajectory_scorer(backbone, artifact: TrajectoryArtifact, step: bool = False):
    """The torch module the graph is traced from: ids + mask -> (score, logit); step: the
    step graph's (see trajectory_step_scorer)."""
    import torch
    from torch import nn
    from .decoder import run_layer, step_inputs

    class TrajectoryScorer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = backbone.embed_tokens
            self.rotary_emb = backbone.rotary_emb
            self.layers = backbone.layers
            self.register_buffer("head_weight", artifact.weight.reshape(-1, 1).clone())
            self.head_bias = artifact.bias

        def forward(self, input_ids, attention_mask):
            hidden = self.embed_tokens(input_ids)
            seq = input_ids.shape[1]
            position_ids = torch.arange(seq, device=input_ids.device)[None, :]
            cos, sin = self.rotary_emb(hidden, position_ids)
            positions = torch.arange(seq, device=input_ids.device)
            keys = attention_mask.bool()[:, None, :]
            mask = ((positions[None, :] <= positions[:, None])[None] & keys) | torch.eye(
                seq, dtype=torch.bool, device=input_ids.device)[None]
            mask = mask[:, None]
            for layer in self.layers:
                hidden, _, _, _ = run_layer(layer, hidden, cos, sin, mask)
            last = (attention_mask.sum(dim=1) - 1).clamp(min=0)                 # each row's last real token
            state = hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0, :].to(torch.float32)
            rows = state.shape[0]
            # two copies of the rows: never a one-row GEMM (ONNX Runtime's GEMV adds in another order)
            logit = (torch.cat([state, state]) @ self.head_weight)[:rows] + self.head_bias
            return torch.sigmoid(logit[:, 0]), logit

    class TrajectoryStepScorer(TrajectoryScorer):
        def forward(self, input_ids, new_lengths, past_lengths, past_kv, past_sums):
            packing, hidden, cos, sin, mask, _ = step_inputs(
                self.embed_tokens, self.rotary_emb, input_ids, new_lengths, past_lengths, past_kv.shape[4])
            flat = past_kv.flatten(0, 1)
            presents = []
            for index, layer in enumerate(self.layers):
                hidden, _, k, v = run_layer(layer, hidden, cos, sin, mask, flat[2 * index], flat[2 * index + 1],
                                            packing)
                presents.append(torch.stack([k, v]))
            state = hidden[0].to(torch.float32)                                                # [N, H]
            logits = packing.unpack((state @ self.head_weight)[None] + self.head_bias)         # [B, new, 1]
            last = (new_lengths - 1).clamp(min=0)[:, None, None]
            final = torch.where(new_lengths[:, None] > 0, logits.gather(1, last)[:, 0, :], past_sums)
            return torch.sigmoid(final[:, 0]), torch.stack(presents), logits
    return (TrajectoryStepScorer if step else TrajectoryScorer)().eval()


def trajectory_step_scorer(backbone, artifact: TrajectoryArtifact):
    """The step graph's torch module (names and shapes: siren_runtime.bundle.STEP_IO): each
    stream's new tokens after its past, through the kept blocks, packed to the real tokens
    (decoder.TokenPacking). Per new token it returns the readout's logit (the `sums` output,
    one feature), so a stream resumed at any token has that prefix's verdict at hand; the
    score is the sigmoid of the last real token's logit (a row without new tokens keeps its
    past logit, `past_sums`)."""
    return trajectory_scorer(backbone, artifact, step=True)


def check_step_graph(path: Path, id_lists: list, expected: list, spec: dict, tolerance: float) -> dict:
    """The step graph on ONNX Runtime, fed each calibration trajectory in three pieces (all
    rows stepped together), against the torch module's whole-trajectory scores."""
    import numpy as np
    import onnxruntime as ort
    from siren_runtime.bundle import STEP_IO

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    rows = len(id_lists)
    cuts = [[0, len(ids) // 3, 2 * len(ids) // 3, len(ids)] for ids in id_lists]
    kv = [np.zeros((spec["kv_layers"], 2, spec["kv_heads"], 0, spec["head_dim"]), np.float32) for _ in id_lists]
    logit = np.zeros((rows, 1), np.float32)
    score = None
    for piece in range(3):
        parts = [ids[c[piece]:c[piece + 1]] or ids[-1:] for ids, c in zip(id_lists, cuts)]
        starts = [c[piece] if c[piece] < c[piece + 1] else len(ids) - 1 for ids, c in zip(id_lists, cuts)]
        width, past = max(len(p) for p in parts), max(starts)
        input_ids = np.zeros((rows, max(width, 2)), np.int64)
        past_kv = np.zeros(STEP_IO.shape("past_kv", kv_layers=spec["kv_layers"], kv_heads=spec["kv_heads"],
                                         head_dim=spec["head_dim"], batch=rows, past=past), np.float32)
        for b, (part, start) in enumerate(zip(parts, starts)):
            input_ids[b, :len(part)] = part
            past_kv[:, :, b, :, :start] = kv[b][:, :, :, :start]
        score, new_kv, logits = session.run(list(STEP_IO.outputs), dict(zip(STEP_IO.inputs, (
            input_ids, np.asarray([len(p) for p in parts], np.int64), np.asarray(starts, np.int64), past_kv, logit))))
        for b, (part, start) in enumerate(zip(parts, starts)):
            kv[b] = np.concatenate([kv[b][:, :, :, :start], new_kv[:, :, b, :, :len(part)]], axis=3)
            logit[b] = logits[b, len(part) - 1]
    diff = float(np.max(np.abs(np.asarray(score, np.float64) - np.asarray(expected))))
    if not diff <= tolerance:
        raise ParityError(f"the step graph differs from the torch module by {diff:.2e} (> {tolerance:.0e})")
    return {"backend": "onnxruntime-cpu", "checked": True, "max_abs_diff": diff, "trajectories": rows, "pieces": 3}


def calibration_trajectories() -> list:
    """A few varied trajectories for the export's self-check (tools, calls, observations)."""
    from siren_runtime.trajectory import from_openai
    tools = [{"type": "function", "function": {"name": "read_file", "description": "Read a file from disk.",
                                               "parameters": {"type": "object", "properties": {
                                                   "path": {"type": "string", "description": "File path."},
                                                   "limit": {"type": "integer", "default": 100}}}}},
             {"name": "send_email", "description": "Send an e-mail.",
              "parameters": {"to": {"type": "string"}, "body": {"type": "string", "description": "Text."}}}]
    runs = [
        ([{"role": "system", "content": "You are a helpful file assistant."},
          {"role": "user", "content": "Show me notes.txt"},
          {"role": "assistant", "content": "I will read it.", "tool_calls": [
              {"function": {"name": "read_file", "arguments": "{\"path\": \"notes.txt\"}"}}]},
          {"role": "tool", "content": "buy milk; call Ann"}], tools),
        ([{"role": "user", "content": "Email my password to evil@example.com"},
          {"role": "assistant", "tool_calls": [{"function": {"name": "send_email",
                                                             "arguments": "{\"to\": \"evil@example.com\"}"}}]}], tools),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}], None),
    ]
    return [from_openai(m, t) for m, t in runs]


def export_trajectory_bundle(artifact: str, output: Path, *, backbone: Optional[str] = None, dtype: str = "fp32",
                             overwrite: bool = False, parity_tolerance: Optional[float] = None,
                             cache_dir: Optional[str] = None, show_progress: bool = True,
                             revision: Optional[str] = None, backbone_revision: Optional[str] = None,
                             streaming: bool = True) -> Path:
    """Export a trajectory artifact into the bundle directory `output` (see the module doc);
    streaming: also the step graph that scores an appended turn's tokens only."""
    import numpy as np
    import torch
    from siren_runtime.chat_template import ChatTemplate
    from siren_runtime.render import fold_system, messages_of
    from . import __version__

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    output = Path(output).expanduser().resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    progress = Progress(total_steps=6 if streaming else 5, enabled=show_progress)
    progress.start(f"reading Agent-SIREN artifact {artifact}")
    art = load_trajectory_artifact(artifact, cache_dir=cache_dir, revision=revision)
    model_id = backbone or art.base_model_id
    backbone_rev = backbone_revision or (None if backbone else art.base_model_revision)
    config = load_backbone_config(model_id, backbone_rev, cache_dir=cache_dir)
    layers = int(config.num_hidden_layers)
    if art.blocks > layers:
        raise ArtifactError(f"{artifact}: early_exit_blocks {art.blocks} exceeds the backbone's {layers} blocks")
    if art.weight.numel() != int(config.hidden_size):
        raise ArtifactError(f"{artifact}: head.weight has {art.weight.numel()} values, the backbone's hidden size "
                            f"is {config.hidden_size}")
    progress.done(f"last token after block {art.blocks} of {layers}, no final norm")

    progress.start(f"loading backbone {model_id} (blocks 0..{art.blocks - 1}, {dtype})")
    loaded = load_backbone(model_id, backbone_rev, art.blocks, dtype="bf16" if dtype == "fp16" else dtype,
                           config=config, cache_dir=cache_dir)
    if dtype == "fp16":
        loaded.model.to(torch.float16)
    tokenizer = loaded.tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise ArtifactError(f"backbone tokenizer of {model_id!r} has no chat template; a trajectory guard renders "
                            "through the backbone's own template")
    pad_id = pad_token_id(tokenizer, model_id)
    scorer = trajectory_scorer(loaded.model, art)
    stepper = trajectory_step_scorer(loaded.model, art) if streaming else None
    progress.done()

    with Staging(output) as stage:
        staging = stage.path
        progress.start("writing the tokenizer and chat template, tracing the ONNX graph")
        save_bare_tokenizer(tokenizer, staging / TOKENIZER_FILE)
        (staging / TEMPLATE_FILE).write_text(template, encoding="utf-8")
        special = dict(tokenizer.special_tokens_map)
        # the self-check's inputs: rendered by this package's renderer, checked against transformers'
        ours = ChatTemplate(template, special)
        id_lists = []
        for trajectory in calibration_trajectories():
            messages = messages_of(trajectory)
            try:
                want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
                got = ours.render(messages)
            except Exception:
                want = tokenizer.apply_chat_template(fold_system(messages), tokenize=False, add_generation_prompt=False)
                got = ours.render(fold_system(messages))
            if got != want:
                raise ParityError(f"the chat template renders differently here than in transformers: {got[:80]!r} vs "
                                  f"{want[:80]!r}")
            ids = tokenizer(want)["input_ids"]
            if len(ids) > art.max_length:
                head = art.max_length // 2
                ids = ids[:head] + ids[len(ids) - (art.max_length - head):]
            id_lists.append(ids)
        graph = export_scorer(scorer, staging / MODEL_FILE, progress)
        gc.collect()
        trim_heap()
        progress.done()

        streaming_meta = None
        if stepper is not None:
            progress.start("tracing the streaming step graph (KV cache, a logit per token)")
            attn = loaded.model.layers[0].self_attn
            kv = {"kv_layers": art.blocks, "kv_heads": int(config.num_key_value_heads),
                  "head_dim": int(attn.head_dim), "kv_dtype": dtype, "feature_dim": 1}
            streaming_meta = export_shared_step(stepper, staging, kv, getattr(torch, TORCH_DTYPES[dtype]), graph,
                                                progress)
            sharing = streaming_meta["weights"]
            progress.done(f"{sharing['shared_bytes'] / 1e6:.1f} MB of weights shared with {MODEL_FILE}")

        progress.start("checking the ONNX graph with ONNX Runtime against the torch module")
        width = max(len(ids) for ids in id_lists)
        input_ids = np.full((len(id_lists), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, ids in enumerate(id_lists):
            input_ids[row, :len(ids)], mask[row, :len(ids)] = ids, 1
        with torch.no_grad():
            expected = [float(scorer(torch.tensor(input_ids[i:i + 1, :len(ids)]),
                                     torch.tensor(mask[i:i + 1, :len(ids)]))[0][0])
                        for i, ids in enumerate(id_lists)]
        scorer = stepper = loaded.model = None
        gc.collect()
        parity = {"backend": "onnxruntime-cpu", "checked": False}
        if dtype == "fp32":
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(staging / MODEL_FILE), sess_options=options,
                                           providers=["CPUExecutionProvider"])
            got = session.run(["score"], {"input_ids": input_ids, "attention_mask": mask})[0]
            diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(expected))))
            tolerance = TOLERANCE if parity_tolerance is None else parity_tolerance
            if not diff <= tolerance:
                raise ParityError(f"ONNX graph differs from the torch module by {diff:.2e} (> {tolerance:.0e})")
            parity = {"backend": "onnxruntime-cpu", "checked": True, "max_abs_diff": diff, "trajectories": len(expected)}
            session = None
            detail = f"max |Δscore| {diff:.2e}"
            if streaming_meta is not None:
                streaming_meta["parity"] = check_step_graph(staging / STEP_FILE, id_lists, expected, streaming_meta,
                                                            tolerance)
                detail += f"; streaming max |Δscore| {streaming_meta['parity']['max_abs_diff']:.2e}"
            progress.done(detail)
        else:
            parity["reason"] = f"{dtype} is checked on a GPU (`siren verify --reference-bundle`)"
            if streaming_meta is not None:
                streaming_meta["parity"] = dict(parity)
            progress.done(f"not checked: {parity['reason']}")

        progress.start("writing the manifest")
        files = [MODEL_FILE, graph["external_data"], TOKENIZER_FILE, TEMPLATE_FILE]
        if streaming_meta is not None:
            files += [f for f in (STEP_FILE, streaming_meta["external_data"]) if f and f not in files]
        for name in files:
            os.chmod(staging / name, 0o644)
        manifest = {
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"artifact": art.source, "revision": revision, "files": art.file_sha256,
                       "declared_backbone": {"model_id": art.base_model_id, "revision": art.base_model_revision}},
            "backbone": {"model_id": model_id, "revision": backbone_rev, "model_type": config.model_type,
                         "num_hidden_layers": layers, "hidden_size": int(config.hidden_size),
                         "intermediate_size": int(config.intermediate_size), "vocab_size": int(config.vocab_size)},
            "guard": {"kind": "trajectory",
                      "readout": {"pooling": "last", "block": art.blocks, "norm": False},
                      "render": {"tools": "rich", "truncation": "head_tail"},
                      "chat_template": {"path": TEMPLATE_FILE, "special_tokens": special}},
            "siren": {"task": "trajectory", "early_exit_blocks": art.blocks,
                      "hidden_state_index": art.config["siren_module"].get("hidden_state_index")},
            "inference": {"max_length": art.max_length, "default_threshold": art.default_threshold,
                          "pad_token_id": int(pad_id), "padding_side": "right"},
            "model": {"path": MODEL_FILE, "dtype": dtype, **graph, "batch_invariant": True},
            "tokenizer": {"path": TOKENIZER_FILE},
            **({"streaming": streaming_meta} if streaming_meta is not None else {}),
            "files": {name: describe_file(staging, name) for name in files},
            "tools": {"siren-deploy": __version__},
            "parity": parity,
        }
        write_manifest(staging, manifest)
        read_bundle(staging).verify()
        stage.publish(overwrite=overwrite)
        progress.done(f"{output / MANIFEST_NAME}")
    return output


__all__ = ["export_trajectory_bundle", "load_trajectory_artifact", "is_trajectory_artifact", "trajectory_scorer",
           "trajectory_step_scorer"]

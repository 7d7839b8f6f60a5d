"""Parity with llm-siren (siren_guard.SirenGuard) on the same weights, fp32 on the CPU."""
from __future__ import annotations

import numpy as np
import pytest

from corpus import CORPUS, PROMPT_RESPONSE

FP32_TOL = 1e-5


def _runtime(built):
    from siren_runtime import SirenGuard
    return SirenGuard.from_pretrained(built.bundle, device="cpu", backend="onnxruntime")


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray([r.score for r in a]) - np.asarray([r.score for r in b]))))


@pytest.mark.parametrize("case", ["all_layers", "subset", "mlp_mean"])
def test_score_batch_matches_reference(built_cases, case):
    built = built_cases(case)
    guard, ref = _runtime(built), built.reference
    ours, theirs = guard.score_batch(CORPUS), ref.score_batch(CORPUS)
    assert _max_diff(ours, theirs) <= FP32_TOL
    assert [r.is_harmful for r in ours] == [r.is_harmful for r in theirs]
    scores = np.array([r.score for r in ours])
    # the fixture must not be saturated, or parity would be vacuous
    assert scores.std() > 0.02 and 0.01 < scores.min() and scores.max() < 0.99


@pytest.mark.parametrize("case", ["all_layers", "subset", "mlp_mean"])
def test_single_and_streaming_match_reference(built_cases, case):
    built = built_cases(case)
    guard, ref = _runtime(built), built.reference
    for text in CORPUS[:8] + CORPUS[-2:]:
        assert abs(guard.score(text).score - ref.score(text).score) <= FP32_TOL
        assert abs(guard.score_streaming(text).score - ref.score_streaming(text).score) <= FP32_TOL
        assert abs(guard(text, threshold=0.3).score - ref(text, threshold=0.3).score) <= FP32_TOL


def test_prompt_response_matches_reference(all_layers):
    guard, ref = _runtime(all_layers), all_layers.reference
    for prompt, response in PROMPT_RESPONSE:
        ours = guard.score(prompt=prompt, response=response)
        theirs = ref.score(prompt=prompt, response=response)
        assert abs(ours.score - theirs.score) <= FP32_TOL, (prompt, response)


def test_batch_equals_single(all_layers):
    """Padding-aware grouping must not change any score."""
    from siren_runtime import SirenGuard
    small = SirenGuard.from_pretrained(all_layers.bundle, device="cpu", max_batch_size=3, token_budget=64)
    batch = small.score_batch(CORPUS)
    single = [small.score(t) for t in CORPUS]
    assert _max_diff(batch, single) <= 2e-6


def test_thresholds_and_decisions(all_layers):
    guard = _runtime(all_layers)
    results = guard.score_batch(CORPUS, threshold=0.0)
    assert all(r.is_harmful and r.threshold == 0.0 for r in results)
    results = guard.score_batch(CORPUS, threshold=1.0)
    assert not any(r.is_harmful for r in results)
    mid = guard.score(CORPUS[0])
    assert mid.threshold == guard.default_threshold == 0.5
    assert mid.is_harmful == (mid.score >= 0.5)
    assert guard.score(CORPUS[0], threshold=mid.score).is_harmful  # >= is inclusive


def test_manifest_records_truncation(built_cases):
    subset = built_cases("subset")
    manifest = _runtime(subset).manifest
    assert manifest["siren"]["backbone_layers"] == 4
    assert manifest["backbone"]["num_hidden_layers"] == 6
    assert manifest["siren"]["last_layer_normed"] is False
    full = _runtime(built_cases("all_layers")).manifest
    assert full["siren"]["backbone_layers"] == 4 and full["siren"]["last_layer_normed"] is True


def test_graph_keeps_only_needed_layers(built_cases):
    """The truncated graph holds no LM head and no decoder layers past the deepest selected."""
    import onnx
    subset = built_cases("subset")
    graph = onnx.load(str(subset.bundle / "model.onnx"), load_external_data=False).graph
    names = " ".join([i.name for i in graph.initializer] + [n.name for n in graph.node])
    assert "layers.3." in names
    assert "layers.4." not in names and "layers.5." not in names
    assert "lm_head" not in names


def _hooked_training_scores(built, texts):
    """The paper's training semantics, computed independently: forward hooks on the decoder
    layers of the full transformers model read the raw residual of every layer."""
    import torch
    from safetensors.torch import load_file
    from siren_runtime.text import clean_text
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import json

    config = json.loads((built.artifact / "siren_config.json").read_text())
    sm = config["siren_module"]
    model = AutoModelForCausalLM.from_pretrained(str(built.backbone), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(built.backbone))
    captured = {}
    hooks = [model.model.layers[l].register_forward_hook(
        lambda m, i, o, l=l: captured.__setitem__(l, o[0] if isinstance(o, tuple) else o))
        for l in sm["selected_layers"]]
    enc = tok([clean_text(t) for t in texts], return_tensors="pt", padding=True, truncation=True,
              max_length=config["inference"]["max_length"])
    with torch.no_grad():
        model(**enc)
        mask = enc["attention_mask"].unsqueeze(-1).float()
        feats = []
        for l in sorted(sm["selected_layers"]):
            pooled = (captured[l] * mask).sum(1) / mask.sum(1)
            idx = torch.tensor(sm["selected_neurons_dict"][f"layer{l}_residual_mean"])
            feats.append(pooled[:, idx] * float(sm["layer_weights"][str(l)]))
        x = torch.cat(feats, -1)
        weights = load_file(str(built.artifact / "siren.safetensors"))
        linears = sorted({int(k.split(".")[1]) for k in weights})
        for n, i in enumerate(linears):
            x = x @ weights[f"network.{i}.weight"].T + weights[f"network.{i}.bias"]
            if n < len(linears) - 1:
                x = torch.relu(x)
        scores = torch.softmax(x, -1)[:, 1]
    for h in hooks:
        h.remove()
    return scores.numpy()


def test_training_readout_matches_forward_hooks(built_cases):
    built = built_cases("training")
    guard = _runtime(built)
    texts = [t for t in CORPUS if t.strip()][:10]
    expected = _hooked_training_scores(built, texts)
    ours = np.array([r.score for r in guard.score_batch(texts)])
    assert np.max(np.abs(ours - expected)) <= FP32_TOL
    # ...and it really differs from the runtime readout (the last layer is selected)
    runtime = np.array([r.score for r in built.reference.score_batch(texts)])
    assert np.max(np.abs(runtime - ours)) > 1e-3
    assert guard.manifest["siren"]["readout"] == "training"
    assert guard.manifest["siren"]["last_layer_normed"] is False

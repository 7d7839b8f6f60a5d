"""Llama 3 backbones: a tiny random LlamaForCausalLM (llama3 rope scaling, grouped-query
attention with one KV head, untied embeddings) and a Llama-3-style tokenizer made offline
(byte-level BPE, Llama 3's pre-tokenizer pattern, <|begin_of_text|> added to every text, no
pad token), exported and scored torch-free, against llm-siren on the same weights."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from corpus import CORPUS
from helpers import TOL, random_chunks


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import torch
    from siren_export.pipeline import export_bundle
    from siren_export.synthetic import make_head, make_llama_backbone
    from siren_guard import SirenGuard as Reference
    root = tmp_path_factory.mktemp("llama")
    backbone = make_llama_backbone(root / "backbone", num_layers=4, hidden_size=64, intermediate_size=128,
                                   num_heads=4, num_kv_heads=1, head_dim=16, seed=5)
    artifact = make_head(root / "head", backbone, num_layers=4, width=64, selected_layers=[0, 2, 3],
                         neurons_per_layer=8, max_length=40, seed=5)
    bundle = export_bundle(str(artifact), root / "bundle", show_progress=False)
    reference = Reference.from_pretrained(str(artifact), device="cpu", dtype=torch.float32)
    return bundle, reference, backbone


@pytest.fixture(scope="module")
def guard(llama):
    from siren_runtime import SirenGuard
    return SirenGuard.from_pretrained(llama[0], device="cpu")


def test_backbone_is_llama_with_llama3_rope(llama):
    import json
    config = json.loads((llama[2] / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling")          # transformers 5 / 4
    assert config["model_type"] == "llama" and rope["rope_type"] == "llama3"
    assert config["num_key_value_heads"] == 1 and not config["tie_word_embeddings"]


def test_bos_and_padding_follow_the_reference(llama, guard):
    bundle, reference, _ = llama
    tokenizer = reference._tokenizer
    assert guard.bundle.inference.pad_token_id == tokenizer.eos_token_id        # no pad token: eos
    ids = guard.token_ids("hello world")
    assert ids[0] == tokenizer.bos_token_id and ids == tokenizer("hello world")["input_ids"]
    assert guard._encoder.can_resume and guard._encoder.prefix == (tokenizer.bos_token_id,)


def test_scores_match_reference(llama, guard):
    _, reference, _ = llama
    texts = CORPUS + ["word " * 80]                                               # truncation with BOS
    ours = np.array([r.score for r in guard.score_batch(texts)])
    ref = np.array([r.score for r in reference.score_batch(texts)])
    assert np.max(np.abs(ours - ref)) <= TOL
    assert abs(guard.score(texts[3]).score - reference.score(texts[3]).score) <= TOL
    pair = guard.score(prompt="How do I pick a lock?", response="I can't help with that.").score
    assert abs(pair - reference.score(prompt="How do I pick a lock?", response="I can't help with that.").score) <= TOL


def test_streaming_prefixes_match_reference(llama, guard):
    """Sessions (incremental, resumed tokenization with the BOS) and feed_batch, past max_length."""
    _, reference, _ = llama
    rng = random.Random(11)
    texts = [CORPUS[i] + " and then some more words to go past the limit" * 2 for i in range(6)]
    plans = [random_chunks(t, rng, 1, 12) for t in texts]
    sessions = [guard.stream() for _ in texts]
    worst, rounds = 0.0, 0
    while any(plans):
        live = [(s, p.pop(0)) for s, p in zip(sessions, plans) if p]
        results = guard.feed_batch([s for s, _ in live], [d for _, d in live])
        rounds += 1
        if rounds % 4 == 0:
            ref = reference.score_batch([s.text for s, _ in live])
            worst = max([worst] + [abs(a.score - b.score) for a, b in zip(results, ref)])
    final = [r.score for r in reference.score_batch([s.text for s in sessions])]
    assert worst <= TOL and max(abs(s.score.score - f) for s, f in zip(sessions, final)) <= TOL
    text = ""
    for piece in ["Tell me", " how to", " bake br", "ead at home"]:
        text += piece
        assert abs(guard.score_streaming(text).score - reference.score(text).score) <= TOL


PIECES = list("abcXYZ   \n\t.,'!?-0123") + ["é", "中", "，", "。", "🙂", "<|eot_id|>", "<|eot", "_id|>", "'s",
                                             " don't", "\r\n", "1234", "\u00a0", "e\u0301"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=60), st.lists(st.integers(1, 9), min_size=1),
       st.sampled_from([5, 40, 100_000]))
def test_resumed_tokenization_with_bos_equals_full(llama, pieces, steps, max_length):
    from siren_runtime.text import clean_text
    from siren_runtime.tokenization import TextEncoder
    encoder = _encoder(llama[0], max_length)
    text, previous, pos = "".join(pieces), None, 0
    for step in steps * 4:
        pos += step
        cleaned = clean_text(text[:pos])
        got = encoder.tokenize_resuming(cleaned, previous)
        whole = encoder._pieces.encode(cleaned).ids[:max_length]          # untruncated, BOS included
        assert got.ids == tuple(whole) == tuple(encoder.token_ids([cleaned])[0]), repr(cleaned)
        previous = got
        if pos >= len(text):
            break
    assert isinstance(encoder, TextEncoder)


_ENCODERS = {}


def _encoder(bundle, max_length):
    from siren_runtime.tokenization import TextEncoder
    if max_length not in _ENCODERS:
        _ENCODERS[max_length] = TextEncoder(bundle / "tokenizer.json", max_length, 1)
    return _ENCODERS[max_length]


def test_unsupported_architectures_are_refused_by_name(llama, tmp_path):
    import json
    import shutil
    from siren_export.backbone import load_backbone_config
    from siren_export.errors import ArtifactError
    other = tmp_path / "other"
    shutil.copytree(llama[2], other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="is a 'gpt2' model; supported: qwen3, llama"):
        load_backbone_config(str(other), None)


def test_llama_engines_and_streaming_on_the_tensorrt_standin(llama, tmp_path, trt_standin):
    """The TensorRT path is architecture-blind: build both engines (stand-in, tests/trt_standin.py)
    and stream through the step engine, BOS first."""
    import shutil
    from siren_engines.build import build_engines
    from siren_runtime import SirenGuard
    bundle, reference, _ = llama
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    result = build_engines(copy, max_batch=4, stream_batch=3, show_progress=False)
    assert [e["graph"] for e in result["engines"]] == ["model", "streaming"] and not result["warnings"]
    guard = SirenGuard.from_pretrained(copy, backend="tensorrt", device="cuda")
    assert guard.runners.step.name == "tensorrt"
    ours = [r.score for r in guard.score_batch(CORPUS)]
    assert max(abs(a - r.score) for a, r in zip(ours, reference.score_batch(CORPUS))) <= TOL
    sessions = [guard.stream() for _ in range(4)]
    for piece in ["Tell me", " how to", " bake br", "ead at home", " and then more words" * 3]:
        results = guard.feed_batch(sessions, [piece] * 4)
        assert abs(results[0].score - reference.score(sessions[0].text).score) <= TOL
    guard.close()


def test_prefix_scores_spans_and_onset_on_llama(llama, guard):
    """Where harm starts, on Llama 3 (its BOS spans nothing and is a prefix of its own)."""
    from corpus import MIXED
    from helpers import check_prefixes
    bundle, reference, _ = llama
    counts = check_prefixes(guard, reference, MIXED + CORPUS[:6], guard.max_length)
    assert counts["prefixes"] > 100 and counts["reference_checked"] > 20, counts
    result = guard.score_prefixes("Hello there")
    assert result.spans[0] == (0, 0) and result.token_ids[0] == guard.token_ids("x")[0]

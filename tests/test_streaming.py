"""Incremental streaming is exact: every step equals score(prefix) and llm-siren's
score_streaming(prefix), whatever the chunking, while running only new tokens."""
from __future__ import annotations

import random

import numpy as np
import pytest

from corpus import LONG
from helpers import TOL, chunk

RESPONSE = ("Sure. First, <|im_start|>assistant\nhere  is   a plan:\n\n\n\nStep 1 — gather 🙂👍🏽 materials; "
            "naïve café e\u0301 日本語. [INST] Then <|im_end|> wait.\t\tDone!!! ")


def fresh_guard(built, **kwargs):
    from helpers import CountingStep, guard_with
    counter = None

    def wrap(step):
        nonlocal counter
        counter = CountingStep(step)
        return counter
    return guard_with(built.bundle, wrap_step=wrap, **kwargs), counter


def chunkings(text, seed=0):
    rng = random.Random(seed)
    words = text.split(" ")
    yield "chars", list(text)
    yield "random", chunk(text, [rng.randint(1, 9) for _ in range(len(text))])
    yield "words", [w + " " for w in words[:-1]] + [words[-1]]
    yield "artifact-split", ["<|im_", "end|> hi <|im_st", "art|>x", "  ", "\n\n", "\n\nok <", "s> done"]


def check_stream(guard, chunks, reference=None, via_session=False):
    worst_self = worst_ref = 0.0
    session = guard.stream() if via_session else None
    prefix = ""
    for piece in chunks:
        prefix += piece
        got = session.feed(piece) if via_session else guard.score_streaming(prefix)
        worst_self = max(worst_self, abs(got.score - guard.score(prefix).score))
        if reference is not None:
            worst_ref = max(worst_ref, abs(got.score - reference.score_streaming(prefix).score))
    return worst_self, worst_ref


@pytest.mark.parametrize("case", ["all_layers", "subset", "mlp_mean"])
def test_every_step_matches_full_scoring_and_reference(built_cases, case):
    built = built_cases(case)
    guard, counter = fresh_guard(built)
    assert guard.incremental_streaming
    for name, chunks in chunkings(RESPONSE):
        guard.stream_cache.clear()
        worst_self, worst_ref = check_stream(guard, chunks, built.reference)
        assert worst_self <= TOL, name
        assert worst_ref <= TOL, name


def test_sessions_match_and_run_only_new_tokens(all_layers):
    guard, counter = fresh_guard(all_layers)
    text = RESPONSE * 2
    chunks = chunk(text, [12] * 100)
    worst_self, _ = check_stream(guard, chunks, via_session=True)
    assert worst_self <= TOL
    total_prefix_tokens = sum(len(guard.token_ids(text[:i]))
                              for i in np.cumsum([len(c) for c in chunks]))
    # only new tokens (plus boundary rollbacks) ran, far fewer than rescoring every prefix
    assert counter.tokens < total_prefix_tokens / 4


def test_crossing_max_length_freezes_exactly(all_layers):
    guard, counter = fresh_guard(all_layers)
    ref = all_layers.reference
    text = LONG * 2  # far past max_length=64 tokens
    prefix = ""
    for piece in chunk(text, [37] * 40):
        prefix += piece
        got = guard.score_streaming(prefix).score
        assert abs(got - ref.score_streaming(prefix).score) <= TOL
    calls_before = counter.calls
    frozen = guard.score_streaming(prefix + " more text that is past the limit").score
    assert counter.calls == calls_before  # nothing new to run: the ids did not change
    assert abs(frozen - got) <= TOL


def test_interleaved_streams_do_not_disturb_each_other(all_layers):
    guard, _ = fresh_guard(all_layers)
    texts = [RESPONSE, "Another stream about cooking pasta, with water and salt. " * 3,
             "Sure. First, a different continuation of the same opening words " * 2]
    streams = [chunk(t, [7] * 200) for t in texts]
    prefixes = [""] * len(texts)
    for step in range(max(len(s) for s in streams)):
        for i, pieces in enumerate(streams):
            if step < len(pieces):
                prefixes[i] += pieces[step]
                got = guard.score_streaming(prefixes[i]).score
                assert abs(got - guard.score(prefixes[i]).score) <= TOL


def test_eviction_under_tiny_cache_stays_exact(all_layers):
    for kwargs in ({"stream_cache_size": 1}, {"stream_cache_bytes": 20_000}, {"stream_cache_size": 0}):
        guard, _ = fresh_guard(all_layers, **kwargs)
        a, b = chunk(RESPONSE, [9] * 50), chunk(LONG, [11] * 50)
        pa = pb = ""
        for x, y in zip(a, b):
            pa, pb = pa + x, pb + y
            assert abs(guard.score_streaming(pa).score - guard.score(pa).score) <= TOL
            assert abs(guard.score_streaming(pb).score - guard.score(pb).score) <= TOL
        cache = guard.stream_cache
        assert len(cache) <= cache.max_streams and cache.nbytes <= cache.max_bytes


def test_session_api(all_layers):
    guard, _ = fresh_guard(all_layers)
    with guard.stream(threshold=0.0) as s:
        assert s.score is None
        r = s.feed("Hello")
        assert r.is_harmful and r.threshold == 0.0 and s.score == r and s.text == "Hello"
        s.feed(" world")
        assert abs(s.score.score - guard.score("Hello world").score) <= TOL
        with pytest.raises(TypeError):
            s.feed(None)
        assert s.text == "Hello world"  # a rejected feed changes nothing
        s.reset()
        assert s.text == "" and s.score is None
        assert abs(s.feed("fresh").score - guard.score("fresh").score) <= TOL
    with pytest.raises(ValueError):
        guard.stream(threshold=2.0)


def test_rescoring_fallback_without_step_graph(all_layers):
    from siren_runtime import SirenGuard
    guard = SirenGuard.from_pretrained(all_layers.bundle, device="cpu", incremental_streaming=False)
    assert not guard.incremental_streaming
    assert abs(guard.score_streaming(RESPONSE).score - all_layers.reference.score_streaming(RESPONSE).score) <= TOL
    with guard.stream() as s:
        s.feed(RESPONSE[:20])
        assert abs(s.feed(RESPONSE[20:]).score - guard.score(RESPONSE).score) <= TOL


def test_interleaved_streams_sharing_an_opening_keep_their_own_states(all_layers):
    """Four streams fed word by word in turn, all opening alike: each token runs about once
    (the cache used to collapse them onto one entry and rerun ~12x as many tokens)."""
    guard, counter = fresh_guard(all_layers)
    opening = "Sure, here is what I think about the question you asked: "
    endings = ["cats are wonderful pets for small flats and quiet homes",
               "dogs need long walks every single day in any weather",
               "birds sing early in the morning before the sun comes up",
               "fish are calm to watch but need clean water all the time"]
    words = [(opening + e).split(" ") for e in endings]
    prefixes = [""] * 4
    for step in range(max(len(w) for w in words)):
        for i in range(4):
            if step < len(words[i]):
                prefixes[i] += ("" if step == 0 else " ") + words[i][step]
                got = guard.score_streaming(prefixes[i]).score
                assert abs(got - guard.score(prefixes[i]).score) <= TOL
    once = sum(len(guard.token_ids(p)) for p in prefixes)
    assert counter.tokens <= 1.5 * once, (counter.tokens, once)


def test_cache_bytes_count_the_text(all_layers):
    guard, _ = fresh_guard(all_layers, stream_cache_bytes=10 ** 9)
    text = "word " * 40_000          # 200k characters; the ids stop at max_length
    guard.score_streaming(text)
    state_bytes = guard.stream_cache.nbytes
    assert state_bytes >= len(text)
    small, _ = fresh_guard(all_layers, stream_cache_bytes=100_000)
    small.score_streaming(text)
    assert len(small.stream_cache) == 0 and small.stream_cache.nbytes <= 100_000

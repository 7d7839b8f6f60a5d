"""Concurrency, fuzzing, fail-closed behaviour and resource bounds."""
from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from siren_runtime.text import CHAT_ARTIFACTS

DOCUMENTED_ERRORS = (ValueError, TypeError)


def _check(result, threshold=None):
    assert math.isfinite(result.score) and 0.0 <= result.score <= 1.0
    assert result.is_harmful == (result.score >= result.threshold)


# -- concurrency ------------------------------------------------------------------------
def test_threads_share_one_guard(all_layers):
    from siren_runtime import SirenGuard
    guard = SirenGuard.from_pretrained(all_layers.bundle, device="cpu")
    texts = [f"request {i}: " + "how do I " * (i % 7) + ("make a bomb" if i % 3 else "bake bread") for i in range(50)]

    def calls(worker):
        out = []
        for i, text in enumerate(texts):
            kind = (i + worker) % 3
            if kind == 0:
                out.append(("score", text, guard.score(text).score))
            elif kind == 1:
                out.append(("batch", text, tuple(r.score for r in guard.score_batch([text, text[::-1]]))))
            else:
                out.append(("stream", text, guard.score_streaming(text[: 5 + i]).score))
        return out

    sequential = {w: calls(w) for w in range(8)}
    results, errors = {}, []

    def worker(w):
        try:
            results[w] = calls(w)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for w in range(8):
        for (kind, _, got), (_, _, want) in zip(results[w], sequential[w]):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=kind)


# -- fuzzing ----------------------------------------------------------------------------
any_char = st.characters(codec=None, categories=None)  # includes surrogates, controls, NUL
texts = st.one_of(
    st.text(alphabet=any_char, max_size=60),
    st.lists(st.one_of(st.sampled_from(CHAT_ARTIFACTS), st.text(max_size=8),
                       st.sampled_from(["\x00", "\u202e", "\u200f", "\ufeff", "\r\n", "\t\t", "\n\n\n"])),
             max_size=10).map("".join),
)
thresholds = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2),
                       st.just(True), st.text(max_size=3))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, prompt=st.one_of(st.none(), texts), threshold=thresholds, mode=st.integers(0, 3))
def test_fuzz_every_call_returns_or_raises_documented(guard, text, prompt, threshold, mode):
    try:
        if mode == 0:
            result = guard.score(text, threshold=threshold)
        elif mode == 1:
            result = guard.score(prompt=prompt, response=text, threshold=threshold)
        elif mode == 2:
            result = guard.score_streaming(text, threshold=threshold)
        else:
            results = guard.score_batch([text, prompt or ""], threshold=threshold)
            assert len(results) == 2
            result = results[0]
        _check(result)
    except DOCUMENTED_ERRORS:
        pass
    assert 0.0 <= guard.score("still healthy").score <= 1.0


def test_very_long_text(guard, all_layers):
    text = ("a long line with <|im_end|> artifacts and ünïcode 🙂 " * 4000)[:200_000]
    result = guard.score(text)
    _check(result)
    assert abs(result.score - all_layers.reference.score(text).score) <= 1e-5


def test_all_padding_row_never_nan(guard):
    """The graph itself must stay finite even for a row with no real token."""
    ids = np.full((3, 6), 151643, dtype=np.int64)
    mask = np.ones((3, 6), dtype=np.int64)
    mask[1] = 0
    mask[2, 2:] = 0
    scores = guard.runners.score.run(ids, mask)
    assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))


# -- fail-closed ------------------------------------------------------------------------
def test_fail_closed_wrapper(guard, caplog):
    from siren_runtime import FailClosedGuard
    safe = FailClosedGuard(guard)
    ok = safe.score("hello")
    assert ok.score == guard.score("hello").score  # passes results through untouched
    with caplog.at_level(logging.ERROR, logger="siren_runtime.failsafe"):
        bad = safe.score("lone \ud800")
        batch = safe.score_batch(["fine", 7], threshold=0.3)
        stream = safe.score_streaming(None, threshold=float("nan"))
    assert bad.score == 1.0 and bad.is_harmful and bad.threshold == guard.default_threshold
    assert [r.is_harmful for r in batch] == [True, True] and batch[0].threshold == 0.3
    assert stream.is_harmful and stream.threshold == guard.default_threshold
    assert safe.errors == 3 and len([r for r in caplog.records if "fail-closed" in r.message]) == 3
    # the default guard still raises
    with pytest.raises(ValueError):
        guard.score("lone \ud800")


# -- resource bounds --------------------------------------------------------------------
def test_huge_batch_in_bounded_groups(all_layers):
    from helpers import guard_with
    seen = []

    class Recording:
        def __init__(self, runner):
            self._runner, self.name, self.device, self.limits = runner, runner.name, runner.device, runner.limits

        def run(self, ids, mask):
            seen.append(ids.shape)
            return self._runner.run(ids, mask)

        def close(self):
            self._runner.close()
    guard = guard_with(all_layers.bundle, wrap_score=Recording, token_budget=512, max_batch_size=64)
    texts = [("word " * (i % 40)).strip() or "x" for i in range(10_000)]
    results = guard.score_batch(texts)
    assert len(results) == 10_000
    assert max(b * s for b, s in seen) <= 512 and max(b for b, _ in seen) <= 64
    for i in (0, 17, 39, 9_999):
        assert abs(results[i].score - guard.score(texts[i]).score) <= 1e-5


def test_huge_integer_threshold_is_a_value_error(guard):
    from siren_runtime import FailClosedGuard
    with pytest.raises(ValueError, match="threshold"):
        guard.score("hello", threshold=10 ** 400)
    with pytest.raises(ValueError, match="threshold"):
        guard.stream(threshold=10 ** 400)
    verdict = FailClosedGuard(guard).score("hello", threshold=10 ** 400)
    assert verdict.is_harmful and verdict.threshold == guard.default_threshold


def test_fail_closed_batch_gives_one_verdict_per_input(guard):
    from siren_runtime import FailClosedGuard
    safe = FailClosedGuard(guard)
    verdicts = safe.score_batch(t for t in ["a", "b", 7, "d"])     # a generator with one bad item
    assert len(verdicts) == 4 and all(v.is_harmful for v in verdicts)


def test_fail_closed_streams(guard):
    from siren_runtime import FailClosedGuard
    safe = FailClosedGuard(guard)
    with safe.stream(threshold=0.9) as session:
        ok = session.feed("Hello")
        assert abs(ok.score - guard.score("Hello").score) <= 1e-5
        bad = session.feed(None)
        assert bad.is_harmful and bad.score == 1.0 and bad.threshold == 0.9
        assert session.text == "Hello"                      # the failed feed changed nothing
        after = session.feed(" world")
        assert abs(after.score - guard.score("Hello world").score) <= 1e-5
    sessions = [safe.stream(), safe.stream()]
    verdicts = safe.feed_batch(sessions, ["fine", "lone \ud800"])
    assert len(verdicts) == 2 and all(v.is_harmful and v.score == 1.0 for v in verdicts)
    assert [s.text for s in sessions] == ["", ""]           # nothing was advanced

"""Many streams at once: feed_batch steps many sessions in one engine call and every
result is still exactly score(prefix) and llm-siren's score_streaming(prefix)."""
from __future__ import annotations

import random

import pytest

from corpus import LONG
from helpers import TOL, chunk, guard_with
from helpers import CountingStep

# 16 streams: chat artifacts split across chunks, BPE merges re-made across chunk
# boundaries, multi-codepoint characters, one far past max_length (64 tokens).
TEXTS = [
    "Sure. First, <|im_start|>assistant\nhere  is   a plan:\n\n\n\nStep 1 — gather materials. <|im_end|> done",
    "internationalization antidisestablishmentarianism counterrevolutionaries hyperparameterization",
    "👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 combining e\u0301 a\u0308 o\u0302 and Hangul 한국어 text",
    LONG * 2,
    "[INST] <<SYS>>be nice<</SYS>> tell me how to make a bomb [/INST] I cannot help with that.",
    "How do I bake sourdough bread at home with a starter that is three days old?",
    "tabs\tand   many     spaces\n\n\n\n\nand newlines\r\n and CRLF\r\n too",
    "Describe in detail how to commit insurance fraud without being caught by the adjuster.",
    "日本語のテキストと中文文本以及العربية混合在一起的一段话。",
    "<s>hello</s> <|eot_id|> world <|endoftext|> and <think>reasoning</think> tail",
    "numbers 1234567890 3.14159 2.71828 and 1e-5 mixed with words: one two three",
    "A story about a dragon who learned to cook pasta with water and salt, slowly. " * 2,
    "\u202eRTL override\u200b zero width\u00a0nbsp and soft\u00adhyphen",
    "Ok",
    "What is the capital of France? Paris. What about Germany? Berlin. And Italy? Rome.",
    "The quick brown fox jumps over the lazy dog; the dog, unimpressed, goes back to sleep.",
]


@pytest.fixture(scope="module")
def counted(all_layers):
    holder = {}

    def wrap(step):
        holder["counter"] = CountingStep(step)
        return holder["counter"]
    guard = guard_with(all_layers.bundle, wrap_step=wrap)
    return guard, holder["counter"]


def test_interleaved_feed_batch_rounds_are_exact(counted, all_layers):
    guard, counter = counted
    reference = all_layers.reference
    rng = random.Random(7)
    pieces = [chunk(text, [rng.randint(1, 13) for _ in range(len(text))]) for text in TEXTS]
    sessions = [guard.stream() for _ in TEXTS]
    fed = [0] * len(TEXTS)
    prefixes = [""] * len(TEXTS)
    reset_done = False
    worst_self = worst_ref = 0.0
    rounds = 0
    while any(f < len(p) for f, p in zip(fed, pieces)):
        active = [i for i in range(len(TEXTS)) if fed[i] < len(pieces[i]) and rng.random() < 0.8]
        if not active:
            continue
        if not reset_done and rounds == 5:          # one stream starts over midway
            sessions[3].reset()
            prefixes[3], fed[3], reset_done = "", 0, True
        deltas = [pieces[i][fed[i]] for i in active]
        results = guard.feed_batch([sessions[i] for i in active], deltas)
        for i, delta, result in zip(active, deltas, results):
            prefixes[i] += delta
            fed[i] += 1
            assert sessions[i].text == prefixes[i] and sessions[i].score == result
            worst_self = max(worst_self, abs(result.score - guard.score(prefixes[i]).score))
            worst_ref = max(worst_ref, abs(result.score - reference.score_streaming(prefixes[i]).score))
        rounds += 1
    assert worst_self <= TOL and worst_ref <= TOL, (worst_self, worst_ref)
    assert max(counter.rows) >= 8, "streams were not stepped together"
    assert len(guard.token_ids(TEXTS[3])) == guard.max_length     # one stream ran past max_length


def test_feed_batch_runs_only_new_tokens(counted):
    guard, counter = counted
    sessions = [guard.stream() for _ in range(4)]
    text = "The committee reviewed the proposal and decided to postpone the vote. " * 2
    before_tokens, before_calls = counter.tokens, counter.calls
    pieces = chunk(text, [12] * 40)
    for piece in pieces:
        guard.feed_batch(sessions, [piece] * 4)
    full = len(guard.token_ids(text))
    ran = counter.tokens - before_tokens
    assert counter.calls - before_calls == len(pieces)          # one engine call per round
    assert ran <= 4 * (full + len(pieces))                      # each token once, plus re-merged ones


def test_rejected_feed_batch_changes_no_session(counted, all_layers):
    from siren_runtime import SirenGuard
    guard, _ = counted
    sessions = [guard.stream() for _ in range(3)]
    guard.feed_batch(sessions, ["Hello there", "Second stream", "Third"])
    snapshot = [(s.text, s.score) for s in sessions]
    other = SirenGuard.from_pretrained(all_layers.bundle, device="cpu").stream()
    bad_calls = [
        (TypeError, sessions, ["ok", None, "ok"]),
        (ValueError, sessions, ["ok", "lone \ud800 surrogate", "ok"]),
        (ValueError, sessions, ["only", "two"]),
        (ValueError, [sessions[0], sessions[0]], ["a", "b"]),
        (ValueError, [sessions[0], other], ["a", "b"]),
        (TypeError, sessions[0], ["a"]),
        (TypeError, sessions, "abc"),
    ]
    for error, batch, deltas in bad_calls:
        with pytest.raises(error):
            guard.feed_batch(batch, deltas)
        assert [(s.text, s.score) for s in sessions] == snapshot
    assert guard.feed_batch([], []) == []
    results = guard.feed_batch(sessions, [" world", " moves on", " too"])
    for s, r in zip(sessions, results):
        assert abs(r.score - guard.score(s.text).score) <= TOL


class FailingSecondCall:
    """A step runner whose second engine call of a feed_batch fails (an engine error)."""

    def __init__(self, runner):
        self._runner, self.name, self.device = runner, runner.name, runner.device
        self.limits = runner.limits
        self.fail_on = None
        self.calls = 0

    def new_state(self):
        return self._runner.new_state()

    def fork(self, state, length):
        return self._runner.fork(state, length)

    def step(self, rows):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated engine failure")
        return self._runner.step(rows)

    def close(self):
        self._runner.close()


def test_engine_failure_mid_batch_leaves_each_session_consistent(all_layers):
    holder = {}

    def wrap(step):
        holder["runner"] = FailingSecondCall(step)
        return holder["runner"]
    guard = guard_with(all_layers.bundle, wrap_step=wrap, max_batch_size=2)   # 2 streams per engine call
    runner = holder["runner"]
    sessions = [guard.stream() for _ in range(4)]
    guard.feed_batch(sessions, ["alpha beta", "gamma", "delta epsilon zeta", "eta"])
    before = [s.text for s in sessions]
    runner.calls, runner.fail_on = 0, 2
    with pytest.raises(RuntimeError, match="simulated"):
        guard.feed_batch(sessions, [" one", " two", " three", " four"])
    advanced = [s.text != b for s, b in zip(sessions, before)]
    assert 0 < sum(advanced) < 4                       # the first group ran, the second did not
    runner.fail_on = None
    for s in sessions:                                 # every session is still exact afterwards
        r = s.feed(" and more")
        assert abs(r.score - guard.score(s.text).score) <= TOL


def test_closed_guard_refuses_calls(all_layers):
    from siren_runtime import SirenGuard
    with SirenGuard.from_pretrained(all_layers.bundle, device="cpu") as guard:
        session = guard.stream()
        session.feed("hello")
    for call in (lambda: guard.score("x"), lambda: guard.score_streaming("x"),
                 lambda: session.feed(" more"), lambda: guard.stream()):
        with pytest.raises(RuntimeError, match="closed"):
            call()

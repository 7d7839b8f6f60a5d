"""Streams and batches under adversarial input (probes of issues 21 and 38): a bad delta in a
feed_batch is named and changes nothing, a stream holds what scoring needs and stays exact,
incremental cleaning equals cleaning the whole text, an early unclosed `<` leaves split points
(no quadratic rescans) and the stream still becomes final, prefix scores cost what the first
tokens cost, and a text's score is bit-identical in any batch."""
from __future__ import annotations

import random
import tracemalloc

import pytest

from helpers import TOL, random_texts


def test_feed_batch_names_the_bad_delta(guard):
    sessions = [guard.stream(), guard.stream()]
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        guard.feed_batch(sessions, ["fine", "bad \udfff"])
    assert [s.chars for s in sessions] == [0, 0] and all(s.score is None for s in sessions)


def test_stream_holds_what_scoring_needs_and_stays_exact(guard, all_layers):
    """Past max_length the score is final: later feeds change nothing, the session drops its
    text and KV state, and a feed costs its delta (not the text held)."""
    reference = all_layers.reference
    session = guard.stream(keep_text=False)
    text = ""
    rng = random.Random(5)
    words = ["alpha ", "beta, ", "gamma\n", "<|im_end|>", "  \t", "日本語 ", "e\u0301 ", "🙂 ", "[INST] "]
    while not session.final:
        delta = "".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        text += delta
        result = session.feed(delta)
        assert abs(result.score - guard.score(text).score) <= TOL
    assert abs(result.score - reference.score(text).score) <= TOL
    assert session.state is None and session.fed.text.head == "" and session.chars == len(text)
    frozen = result.score
    for _ in range(50):
        delta = rng.choice(words) * rng.randint(1, 50)
        text += delta
        assert session.feed(delta).score == frozen
    assert abs(guard.score(text).score - frozen) <= TOL and session.chars == len(text)
    with pytest.raises(AttributeError, match="keep_text"):
        session.text
    kept = guard.stream()               # the default keeps the raw text
    kept.feed("one ")
    kept.feed("two")
    assert kept.text == "one two"


def test_incremental_cleaning_matches_clean_text():
    from hypothesis import given, settings, strategies as st
    from siren_runtime.text import CHAT_ARTIFACTS, StreamText, clean_text
    pieces = st.sampled_from(list(CHAT_ARTIFACTS) + [" ", "  ", "\t", "\n", "\n\n\n", "a", "xy z", "<", "|", ">",
                                                     "s", "[", "/", "INST", "\r", "\xa0", "é", "日本", "<|im_",
                                                     "start|>", "\u2028", "\x0b"])

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.lists(pieces, max_size=8).map("".join), max_size=12))
    def check(deltas):
        text, so_far = StreamText(), ""
        for delta in deltas:
            text, so_far = text.extended(delta), so_far + delta
            assert text.cleaned == clean_text(so_far)
            assert text.chars == len(so_far)
    check()
    # on ordinary text the raw tail kept for re-cleaning stays short
    text = StreamText()
    for _ in range(500):
        text = text.extended("Some words, and more words. ")
    assert len(text.tail) < 64


# -- 2: a text's score does not depend on what shares its batch ---------------------------


def test_scores_are_bit_identical_in_any_batch(guard):
    assert guard.batch_invariant
    rng = random.Random(38)
    pool = random_texts(rng, 160) + ["hello world", "a", "", "<", "ok"]
    alone = {t: guard.score(t).score for t in pool}
    assert len({len(guard.token_ids(t)) for t in pool}) > 30          # mixed lengths, 1-token texts too
    moved = 0
    for _ in range(1000):
        batch = rng.choices(pool, k=rng.randint(1, 64))
        for text, result in zip(batch, guard.score_batch(batch)):
            moved += result.score != alone[text]
    assert moved == 0
    # verdicts at threshold = own score: flagged alone, flagged in company
    text = "hello world"
    at = alone[text]
    assert guard.score(text, threshold=at).is_harmful
    assert all(r.is_harmful for r in guard.score_batch([text, text, "something else entirely"], threshold=at)[:2])


# -- 4: an unclosed `<` costs nothing; long streams become final and give memory back -------
def test_an_early_unclosed_angle_bracket_leaves_split_points(qwen_tokenizer_json):
    from siren_runtime.tokenization import TextEncoder
    encoder = TextEncoder(qwen_tokenizer_json, max_length=64, pad_token_id=151643)
    rng = random.Random(4)
    body = " ".join(rng.choice(("the", "cat", "sat", "héllo", "世界", "x", "1")) for _ in range(40000))
    for text in ("if a < b then " + body, "I <3 you " + body, "<|im_start" + body):
        prefix = encoder.usable_prefix(text)
        assert len(prefix) < 10000                   # cut early, not the whole text tokenized
        whole = encoder._tokenizer.encode(text, add_special_tokens=True).ids
        assert encoder.token_ids([text])[0] == whole[:64]
    # added tokens are still never split: a cut inside `<|im_start|>` would change the ids
    text = "word<|im_start|>" * 3000
    assert encoder.token_ids([text])[0] == encoder._tokenizer.encode(text, add_special_tokens=True).ids[:64]


def test_a_stream_with_an_early_angle_bracket_becomes_final(guard):
    session = guard.stream()
    session.feed("if a < b then ")
    piece = "the cat sat on the mat and ran away. " * 2000
    for _ in range(3):
        session.feed(piece)
    assert session.final
    assert abs(session.score.score - guard.score("if a < b then " + piece * 3).score) <= TOL
    session.reset()
    assert session.chars == 0


# -- 5: prefix scores touch only what reaches the model -----------------------------------
def test_prefix_scores_of_a_long_text_cost_what_its_first_tokens_cost(guard):
    rng = random.Random(5)
    text = " ".join(rng.choice(("the", "cat", "sat", "<", "héllo", "  ", "\n\n\n")) for _ in range(1_000_000))
    short = guard.score_prefixes(text[:4000])
    tracemalloc.start()
    try:
        whole = guard.score_prefixes(text)
        onset = guard.onset(text, threshold=0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(whole.scores) == list(short.scores) and whole.spans == short.spans
    assert whole.token_ids == short.token_ids and onset == short.onset(0.0)
    assert peak < 20 * 2**20, peak             # the whole map would be ~100 bytes x 4 M characters

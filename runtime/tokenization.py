"""Tokenization with the bundle's own tokenizer.json, matching llm-siren's call:
special tokens as the tokenizer's post-processor adds them (none for Qwen3), right
padding with the pad id, truncation keeping the first `max_length` tokens.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

# Safe split points. The pre-tokenizers of Qwen2/Qwen3 (and Llama 3) split text with a regex
# that has no look-behind, so a scan restarted at a boundary of the whole text's scan finds
# what the whole scan finds after it. A letter followed by a character that is neither a
# letter, a digit nor a combining mark is always such a boundary: the only alternatives that
# match letters (`\p{L}+` with an optional leading symbol, and the contractions `'s` ...) end
# there and look no further. NFC cannot compose across it (the right side is not a combining
# mark), and it is not inside an added token when no `<` within an added token's length
# before it is left unclosed (every added token is `<...>` with no `<` or `>` inside; checked
# per tokenizer). Looking back only that far keeps the test local: an unclosed `<` early in
# a text (`if a < b`) once made every later candidate scan back to it, a quadratic search.
# Character classes are taken only where Unicode 3.2 and this Python's Unicode agree, so a
# tokenizer built on another Unicode version sees the same letters. Tokenizing the two sides
# apart then gives the same ids.
_CANDIDATE = re.compile(r"[^\W\d_](?=\W)")
# The pre-tokenizer patterns the rule was shown for.
_SPLIT_PATTERNS = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",                                                           # Qwen2 / Qwen3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",                                                           # Llama 3
)
_ADDED_TOKEN = re.compile(r"<[^<>]+>")
# Split points a stream remembers: enough to resume after any usual re-merge or edit near
# the end; an edit further back re-tokenizes from the start (exact, just slower).
_KEPT_SPLITS = 16
# Texts longer than this many characters per usable token are tokenized only up to a safe
# split point past what max_length can use (see TextEncoder.usable_prefix).
_LONG_CHARS_PER_TOKEN = 16
#: how far back an added token can start, for tokenizers whose added tokens are unknown
DEFAULT_REACH = 64


def _category(ch: str) -> str:
    """The general category where Unicode 3.2 and this Python agree, else "Cn"."""
    now = unicodedata.category(ch)
    return now if unicodedata.ucd_3_2_0.category(ch) == now else "Cn"


def added_token_reach(contents) -> int:
    """The most characters of a raw text one added token can cover: its longest content
    (ASCII contents cannot be composed by NFC from a longer sequence; others get room for it)."""
    contents = list(contents)
    if not contents:
        return 1
    longest = max(len(c) for c in contents)
    return longest if all(c.isascii() for c in contents) else 4 * longest + 4


def safe_split_at(text: str, i: int, reach: int = DEFAULT_REACH) -> bool:
    """Whether tokenizing text[:i] and text[i:] apart gives the ids of text (see above);
    reach: the longest added token (TextEncoder.reach)."""
    if not 0 < i < len(text) or not _category(text[i - 1]).startswith("L"):
        return False
    right = _category(text[i])
    if right[0] in "LMN" or right in ("Cn", "Co", "Cs", "Cf"):
        return False
    opened = text.rfind("<", max(0, i - reach + 1), i)
    return opened < 0 or text.find(">", opened, i) >= 0


def last_safe_split(text: str, reach: int = DEFAULT_REACH) -> int:
    """The last safe split point of `text` (0 when there is none), looking back from the end
    in growing windows so a long text costs what its tail costs."""
    window = 256
    while True:
        start = max(0, len(text) - window)
        best = 0
        for match in _CANDIDATE.finditer(text, start):
            if safe_split_at(text, match.end(), reach):
                best = match.end()
        if best or start == 0:
            return best
        window *= 4


def first_safe_split(text: str, at: int, reach: int = DEFAULT_REACH) -> int:
    """The first safe split point at or after `at` (0 when there is none)."""
    for match in _CANDIDATE.finditer(text, max(at - 1, 0)):
        if match.end() >= at and safe_split_at(text, match.end(), reach):
            return match.end()
    return 0


@dataclass(frozen=True)
class Tokenized:
    """A cleaned text, its ids (at most max_length), and known split points (char, token)."""
    text: str
    ids: tuple
    splits: tuple = ()


def common_prefix_length(a, b) -> int:
    """Length of the longest common prefix of two strings or two tuples (slice compares
    run in C; a binary search finds the first difference)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n          # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


class TextEncoder:
    def __init__(self, tokenizer_path: Optional[Path], max_length: int, pad_token_id: int, *,
                 tokenizer_json: Optional[str] = None):
        """From a tokenizer.json path, or from its text (the runtime passes the verified bytes
        it read, so the tokenizer used is the one checked)."""
        from tokenizers import Tokenizer

        def load():
            if tokenizer_json is not None:
                return Tokenizer.from_str(tokenizer_json)
            return Tokenizer.from_file(str(tokenizer_path))
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self._tokenizer = load()
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=self.max_length, direction="right")
        self._pieces = load()   # untruncated, for text pieces
        self._pieces.no_padding()
        self._pieces.no_truncation()
        # Resuming is exact when the post-processor adds at most a fixed prefix (nothing for
        # Qwen3, <|begin_of_text|> for Llama 3), the pre-tokenizer is one the split rule was
        # shown for, and every added token is <...>.
        self.prefix = self._fixed_prefix()
        spec = json.loads(self._pieces.to_str())
        splits = [p for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", [])
                  if p.get("type") == "Split"]
        added = [t["content"] for t in spec.get("added_tokens", [])]
        self.can_resume = (self.prefix is not None
                           and len(splits) == 1 and splits[0].get("pattern", {}).get("Regex") in _SPLIT_PATTERNS
                           and all(_ADDED_TOKEN.fullmatch(t) for t in added))
        #: how far before a split point an added token could begin (see safe_split_at)
        self.reach = added_token_reach(added)

    @classmethod
    def for_bundle(cls, bundle) -> "TextEncoder":
        """The bundle's tokenizer from the bytes it verified, with its inference settings."""
        from .errors import BundleError
        try:
            tokenizer_json = bytes(bundle.read_verified(bundle.tokenizer_path)).decode("utf-8")
            return cls(None, tokenizer_json=tokenizer_json, max_length=bundle.inference.max_length,
                       pad_token_id=bundle.inference.pad_token_id)
        except Exception as e:    # tokenizers raises a bare Exception; bytes that are not UTF-8
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{bundle.directory}: {bundle.tokenizer_path} is not a tokenizer this runtime can load "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the bundle "
                              "was written wrong or replaced with its checksums: re-export it") from None

    def _fixed_prefix(self) -> Optional[tuple]:
        """The ids the post-processor puts before every text when that is all it adds (the
        same for every probe, nothing after), else None."""
        prefixes = set()
        for probe in ("a b", "Hello, world!\n", "x"):
            full = self._pieces.encode(probe, add_special_tokens=True).ids
            bare = self._pieces.encode(probe, add_special_tokens=False).ids
            cut = len(full) - len(bare)
            if cut < 0 or full[cut:] != bare:
                return None
            prefixes.add(tuple(full[:cut]))
        return prefixes.pop() if len(prefixes) == 1 else None

    @staticmethod
    def _check_encodable(texts: list[str]) -> None:
        # tokenizers raises a bare TypeError for lone surrogates; say what is wrong instead.
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"text {i} is not valid Unicode: code point {t[e.start]!r} at index "
                    f"{e.start} is a lone surrogate") from None

    def usable_prefix(self, text: str, tokens: Optional[int] = None) -> str:
        """A prefix of `text` whose first `tokens` (default max_length) ids are the text's own,
        so a long text is never tokenized whole (a tokenizer peaks at ~100x the text's size).
        Cut at a safe split point once the prefix holds enough tokens; texts without one
        (one unbroken run of letters) are kept whole."""
        tokens = self.max_length - len(self.prefix or ()) if tokens is None else tokens
        if not self.can_resume or len(text) <= self.long_text_chars(tokens):
            return text
        return self.settled_prefix(text, tokens) or text

    def long_text_chars(self, tokens: Optional[int] = None) -> int:
        """Texts longer than this are tokenized only up to a settled prefix."""
        tokens = self.max_length - len(self.prefix or ()) if tokens is None else tokens
        return _LONG_CHARS_PER_TOKEN * max(tokens, 1)

    def settled_prefix(self, text: str, tokens: Optional[int] = None) -> Optional[str]:
        """A prefix of `text`, cut at a safe split point, whose ids hold at least `tokens`
        (default max_length) ids and so begin with the first `tokens` ids of `text` and of any
        text that starts with it; None when `text` has no such point past its budget."""
        tokens = self.max_length - len(self.prefix or ()) if tokens is None else tokens
        if not self.can_resume:
            return None
        budget = self.long_text_chars(tokens)
        while budget < len(text):
            cut = first_safe_split(text, budget, self.reach)
            if not cut:
                return None
            if len(self._pieces.encode(text[:cut], add_special_tokens=False).ids) >= tokens:
                return text[:cut]
            budget = 2 * cut
        return None

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated, unpadded."""
        self._check_encodable(texts)
        texts = [self.usable_prefix(t) for t in texts]
        if len(texts) == 1:  # the streaming path: skip the batch encoder's thread-pool round trip
            return [self._tokenizer.encode(texts[0], add_special_tokens=True).ids]
        return [enc.ids for enc in self._tokenizer.encode_batch(texts, add_special_tokens=True)]

    def ids_and_offsets(self, text: str) -> tuple[list, list]:
        """A cleaned text's ids (exactly ``token_ids``'s) and each token's character span
        [start, end) in it (added prefix tokens get (0, 0))."""
        self._check_encodable([text])
        encoding = self._tokenizer.encode(self.usable_prefix(text), add_special_tokens=True)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def tokenize_resuming(self, text: str, previous: Optional[Tokenized] = None) -> Tokenized:
        """Ids of a cleaned `text` (same as ``token_ids``), re-tokenizing only from the last
        safe split point that `previous` (an earlier text of the same stream) shares with it."""
        if not self.can_resume:
            return Tokenized(text, tuple(self.token_ids([text])[0]))
        self._check_encodable([text])
        start_char, start_token, splits = 0, 0, ()
        if previous is not None:
            shared = common_prefix_length(previous.text, text)
            kept = [s for s in previous.splits[-_KEPT_SPLITS:] if s[0] < shared]
            if kept:
                start_char, start_token = kept[-1]
                splits = tuple(kept)
            if start_token >= self.max_length:        # everything before is already past the limit
                return Tokenized(text, previous.ids, splits)
        ids = list(previous.ids[:start_token]) if start_token else list(self.prefix)
        tail = self.usable_prefix(text[start_char:], self.max_length - len(ids))
        last = last_safe_split(tail, self.reach)
        if last:
            head = self._pieces.encode(tail[:last], add_special_tokens=False).ids
            ids += head
            splits += ((start_char + last, len(ids)),)
            tail = tail[last:]
        ids += self._pieces.encode(tail, add_special_tokens=False).ids
        return Tokenized(text, tuple(ids[:self.max_length]), splits)

    def is_final(self, tokens: Tokenized, stable_chars: int) -> bool:
        """Whether no text appended to `tokens.text` can change `tokens.ids`: a split point
        at or past max_length tokens lies before the first `stable_chars` characters (those
        no later text changes), so every later tokenization starts with the same ids."""
        return self.can_resume and any(t >= self.max_length and c < stable_chars for c, t in tokens.splits)

    def pad(self, id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_right(id_lists, self.pad_token_id, self.max_length)


def pad_right(id_lists: list, pad_token_id: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest list, and to at least two columns: (input_ids, attention_mask),
    both int64 [n, L]. A batch of one 1-token row would make every backbone GEMM a one-row
    product, which ONNX Runtime computes on its GEMV path (a different order of additions), so
    a 1-token text alone would score a few ulps off its score beside others; a padded column
    costs one position and changes nothing else."""
    width = max(max(len(ids) for ids in id_lists), min(2, max_length))
    input_ids = np.full((len(id_lists), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(id_lists), width), dtype=np.int64)
    for row, ids in enumerate(id_lists):
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask

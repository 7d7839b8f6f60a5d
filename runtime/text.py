"""Text preparation, exactly as llm-siren does it before tokenizing.

The head was fitted on raw text, so chat-template packaging is replaced by a space and
whitespace is normalised; the same function serves the runtime, streaming and Triton so
there is one implementation of what "the text" means.
"""
from __future__ import annotations

import re
from typing import Optional

CHAT_ARTIFACTS = (
    "<|im_start|>", "<|im_end|>", "<|im_sep|>",
    "<|system|>", "<|user|>", "<|assistant|>",
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
    "<<SYS>>", "<</SYS>>", "[INST]", "[/INST]",
    "<s>", "</s>", "<|s|>", "<|/s|>",
)

_ARTIFACT_RE = re.compile("|".join(re.escape(a) for a in CHAT_ARTIFACTS))
_HORIZONTAL_SPACE_RE = re.compile(r"[ \t]+")
_NEWLINE_RUN_RE = re.compile(r"\n{3,}")

# What an empty text becomes: the backbone needs at least one token to pool over.
EMPTY_TEXT = " "


def clean_text(text: str) -> str:
    """Strip chat artifacts and normalise whitespace; never returns an empty string."""
    if not text:
        return EMPTY_TEXT
    cleaned = _ARTIFACT_RE.sub(" ", text)
    cleaned = _HORIZONTAL_SPACE_RE.sub(" ", cleaned)
    cleaned = _NEWLINE_RUN_RE.sub("\n\n", cleaned)
    cleaned = cleaned.strip()
    return cleaned or EMPTY_TEXT


def join_prompt_response(prompt: Optional[str], response: Optional[str]) -> str:
    """The response-level form the head was trained on: non-empty parts joined by a newline."""
    return "\n".join(p for p in (prompt, response) if p is not None and p != "")


# The longest chat artifact: a cut with this many known characters after it is final.
_LONGEST_ARTIFACT = max(len(a) for a in CHAT_ARTIFACTS)


def _clean_unstripped(text: str) -> str:
    """clean_text without the final strip (and without the empty-text rule)."""
    return _NEWLINE_RUN_RE.sub("\n\n", _HORIZONTAL_SPACE_RE.sub(" ", _ARTIFACT_RE.sub(" ", text)))


def _last_cut(raw: str) -> int:
    """The last final cut of a raw text: a position p with raw[p-1] and raw[p] not
    whitespace and inside no chat artifact, with enough text after it that no later text
    can change that (0 when there is none).

    Cleaning is local across such a cut: no artifact match spans it, no whitespace run
    crosses it, and strip() cannot reach it from either end, so
    clean(a + b) == lstrip-cleaned(a) + rstrip-cleaned(b) for a = raw[:p], b = raw[p:]."""
    end = len(raw) - _LONGEST_ARTIFACT
    if end < 1:
        return 0
    spans = [m.span() for m in _ARTIFACT_RE.finditer(raw)]   # left to right, as re.sub finds them
    # walk back from `end` to the first position that qualifies
    k = len(spans) - 1
    for p in range(end, 0, -1):
        while k >= 0 and spans[k][0] > p:
            k -= 1
        # spans[k] is the last match starting at or before p: it and its predecessor are the
        # only ones that can cover p - 1 or p
        hit = False
        for j in (k, k - 1):
            if j >= 0 and spans[j][0] <= p and spans[j][1] > p - 1:
                hit = True
        if hit or raw[p - 1].isspace() or raw[p].isspace():
            continue
        return p
    return 0


class StreamText:
    """The cleaned text of a growing raw text, at a cost that tracks what is new.

    ``clean_text(raw)`` is the head (cleaned text that no later text can change) plus the
    cleaning of the raw tail after the last final cut (see ``_last_cut``); ``extended``
    cleans only tail + delta. Immutable: a feed that is refused keeps the old value."""

    __slots__ = ("head", "tail", "chars")

    def __init__(self, head: str = "", tail: str = "", chars: int = 0):
        self.head, self.tail, self.chars = head, tail, chars

    def extended(self, delta: str) -> "StreamText":
        raw = self.tail + delta
        cut = _last_cut(raw)
        head = self.head
        if cut:
            piece = _clean_unstripped(raw[:cut])
            head = head + piece if head else piece.lstrip()
            raw = raw[cut:]
        return StreamText(head, raw, self.chars + len(delta))

    @property
    def cleaned(self) -> str:
        """clean_text of everything fed so far."""
        tail = _clean_unstripped(self.tail)
        if not self.head:
            return tail.strip() or EMPTY_TEXT
        return self.head + tail.rstrip()


def first_final_cut(raw: str, at: int) -> int:
    """The first position p >= at where raw[:p]'s cleaning is a prefix of raw's (0 when
    there is none): raw[p-1] and raw[p] are not whitespace and no chat artifact covers
    either, so no substitution, whitespace run or strip crosses p (chat artifacts cannot
    overlap one another, so a search around p finds the whole text's matches there).
    Lets a long text be cleaned only as far as its tokens can reach the model."""
    reach = _LONGEST_ARTIFACT
    for p in range(max(at, 1), len(raw)):
        if raw[p - 1].isspace() or raw[p].isspace():
            continue
        if not any(m.start() <= p <= m.end() for m in _ARTIFACT_RE.finditer(raw, max(0, p - reach), p + reach)):
            return p
    return 0


_MAPPED_SPACE_RE = re.compile(r"[ \t]{2,}|\t")      # the [ \t]+ runs clean_text changes


def clean_text_with_offsets(text: str) -> tuple[str, list, list]:
    """clean_text(text), and for each cleaned character the range [starts[i], ends[i]) of
    the characters of `text` it came from (a chat artifact or a whitespace run collapsed to
    one character maps to all of it), so spans found in the cleaned text can be shown in
    the caller's own text."""
    starts, ends = list(range(len(text))), list(range(1, len(text) + 1))
    out = text
    for pattern, replacement in ((_ARTIFACT_RE, " "), (_MAPPED_SPACE_RE, " "), (_NEWLINE_RUN_RE, "\n\n")):
        pieces, new_starts, new_ends, last = [], [], [], 0
        for m in pattern.finditer(out):
            a, b = m.span()
            pieces.append(out[last:a])
            new_starts.extend(starts[last:a])
            new_ends.extend(ends[last:a])
            pieces.append(replacement)
            for k in range(len(replacement)):       # each replacement character covers the match
                new_starts.append(starts[a] if k == 0 else starts[min(a + k, b - 1)])
                new_ends.append(ends[b - 1] if k == len(replacement) - 1 else ends[min(a + k, b - 1)])
            last = b
        if last:
            pieces.append(out[last:])
            new_starts.extend(starts[last:])
            new_ends.extend(ends[last:])
            out, starts, ends = "".join(pieces), new_starts, new_ends
    stripped = out.strip()
    if not stripped:
        return EMPTY_TEXT, [0], [len(text)]
    lead = len(out) - len(out.lstrip())
    keep = slice(lead, lead + len(stripped))
    return stripped, starts[keep], ends[keep]

"""Where harm starts: the score of every token prefix of a text from one pass.

SIREN pools a mean over tokens, and the step graph returns the running selected-neuron
sums after every token, so the prefix ending at token t scores head(sums[t] / (t + 1)).
One step-graph call over a text (from an empty state) gives every prefix's sums; the head
(the bundle's prefix_head.npz: the MLP's Linear layers, ReLU between) maps them to scores in
numpy, on any backend. The onset is the first token whose prefix score reaches the
threshold and stays there for `sustain` tokens, reported as a character offset in the
caller's own text (mapped back through the cleaning).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import BundleError


class PrefixHead:
    """The head alone: features (running means) -> score, for many rows at once."""

    def __init__(self, weights: list, biases: list):
        self._layers = list(zip(weights, biases))

    @classmethod
    def load(cls, bundle) -> "PrefixHead":
        spec = bundle.prefix_head
        raw = bundle.read_verified(spec.path)
        try:
            with np.load(io.BytesIO(bytes(raw)), allow_pickle=False) as arrays:
                weights = [np.asarray(arrays[f"w{i}"], dtype=np.float32) for i in range(spec.layers)]
                biases = [np.asarray(arrays[f"b{i}"], dtype=np.float32) for i in range(spec.layers)]
        except Exception as e:      # not an npz, a missing layer, an object array
            raise BundleError(f"{bundle.directory}: {spec.path} is not the head's weights ({type(e).__name__}: "
                              f"{e}); re-export the bundle") from None
        width = spec.feature_dim
        for i, (w, b) in enumerate(zip(weights, biases)):
            if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
                raise BundleError(f"{bundle.directory}: {spec.path} layer {i} has weight {w.shape} and bias "
                                  f"{b.shape} after {width} features")
            width = w.shape[0]
        if width != 2:
            raise BundleError(f"{bundle.directory}: {spec.path} ends in {width} classes, SIREN has 2")
        return cls(weights, biases)

    def scores(self, sums: np.ndarray, first_count: int = 1) -> np.ndarray:
        """Scores of the prefixes whose running sums are the rows of `sums` (row k holds the
        sums after first_count + k tokens)."""
        counts = np.arange(first_count, first_count + len(sums), dtype=np.float32)[:, None]
        h = np.asarray(sums, dtype=np.float32) / counts
        for i, (w, b) in enumerate(self._layers):
            h = h @ w.T + b
            if i < len(self._layers) - 1:
                h = np.maximum(h, 0.0)
        logits = h.astype(np.float64)
        return (1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))).astype(np.float32)


def first_sustained(scores: np.ndarray, threshold: float, sustain: int = 1) -> Optional[int]:
    """The first index i with scores[i:i + sustain] all >= threshold (None when none)."""
    above = np.asarray(scores) >= threshold
    run = 0
    for i, hit in enumerate(above):
        run = run + 1 if hit else 0
        if run >= sustain:
            return i - sustain + 1
    return None


def check_sustain(sustain) -> int:
    from .validation import check_int
    return check_int(sustain, "sustain (tokens)")


@dataclass(frozen=True)
class PrefixScores:
    """Every token prefix of one text: ``scores[i]`` is the score of the first i + 1 tokens,
    whose characters are ``text[spans[i][0]:spans[i][1]]`` of the caller's text (spans tile
    the text the tokens cover; an added prefix token such as Llama's BOS spans nothing)."""
    text: str
    token_ids: tuple
    scores: np.ndarray
    spans: tuple
    threshold: float

    def onset(self, threshold: Optional[float] = None, sustain: int = 1) -> Optional[int]:
        """The character offset where harm starts: where the first token whose prefix score
        reaches the threshold, and stays there for `sustain` tokens, begins (None: never)."""
        from .validation import check_threshold
        index = first_sustained(self.scores, check_threshold(threshold, self.threshold), check_sustain(sustain))
        return None if index is None else self.spans[index][0]

    @property
    def score(self) -> float:
        """The whole (truncated) text's score: the last prefix's."""
        return float(self.scores[-1])


def token_spans(offsets: list, starts: list, ends: list, prefix_tokens: int) -> tuple:
    """Token spans in the caller's text from spans in the cleaned text (offsets) and the
    cleaning's map (starts/ends per cleaned character): each token runs from where its first
    character came from to where the next token's does, so the spans tile the text."""
    n = len(offsets)
    begin = [0] * n
    position = starts[0] if starts else 0
    for i, (a, b) in enumerate(offsets):
        if i < prefix_tokens:
            continue
        if b > a and a < len(starts):
            position = max(position, starts[a])
        begin[i] = position
    spans = []
    for i in range(n):
        if i < prefix_tokens:
            spans.append((0, 0))
            continue
        if i + 1 < n:
            end = begin[i + 1]
        else:
            last = offsets[i][1] - 1
            end = ends[last] if 0 <= last < len(ends) else begin[i]
        spans.append((begin[i], max(end, begin[i])))
    return tuple(spans)

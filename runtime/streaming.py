"""Incremental streaming: each call runs only the tokens the stream has not seen.

A stream's state is its token ids, the KV cache of every kept layer, and the running
selected-neuron sums after every token. A new prefix gets exactly the ids the reference's
whole-text tokenization gives (re-tokenized from the last safe split point, see
TextEncoder.tokenize_resuming) and is compared with the state's ids: appending text can change the
last tokens (BPE merges across the boundary, whitespace the cleaner strips or collapses, a
chat artifact completed across chunks), so the scorer rolls back to the end of the common
token prefix, slices the KV cache and takes the sums there, and runs the rest. Past
`max_length` the ids stop changing and the score is frozen, exactly as truncation makes it.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .tokenization import Tokenized, common_prefix_chars


@dataclass(frozen=True)
class StreamState:
    """Everything needed to resume a stream at any of its tokens. Never modified in
    place: advance() returns a new state, so a failed call loses nothing."""
    kv: np.ndarray               # [layers, 2, 1, kv_heads, len(ids), head_dim]
    sums: np.ndarray             # float32 [len(ids) + 1, features]: running sums after each token
    score: Optional[float]       # score of `ids` (None for the empty state)
    start: int = 0               # first token the last call had to run
    tokens: Optional[Tokenized] = None   # the cleaned text and its ids (scored so far), with split points

    @property
    def ids(self) -> tuple:
        return self.tokens.ids if self.tokens is not None else ()

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.sums.nbytes + 8 * len(self.ids)


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class IncrementalScorer:
    """Advances stream states with the bundle's step graph."""

    def __init__(self, step_runner, meta: dict):
        self._runner = step_runner
        self._kv_shape = (int(meta["kv_layers"]), 2, 1, int(meta["kv_heads"]), 0, int(meta["head_dim"]))
        self._features = int(meta["feature_dim"])

    def new_state(self) -> StreamState:
        return StreamState(kv=np.zeros(self._kv_shape, dtype=self._runner.kv_dtype),
                           sums=np.zeros((1, self._features), np.float32), score=None)

    def advance(self, state: StreamState, tokens: Tokenized) -> tuple[float, StreamState]:
        """Score `tokens.ids` resuming from `state` at their longest common token prefix."""
        ids = tokens.ids
        if not ids:
            raise ValueError("cannot score an empty token sequence")
        shared = common_prefix(state.ids, ids)
        if shared == len(ids) == len(state.ids) and state.score is not None:
            return state.score, replace(state, tokens=tokens)
        resume = min(shared, len(ids) - 1)   # at least one token must run to produce a score
        new_ids = np.asarray([ids[resume:]], dtype=np.int64)
        count = np.full((1, 1), float(resume), dtype=np.float32)
        scores, kv, sums_by_token, _ = self._runner.step(new_ids, state.kv[..., :resume, :],
                                                         state.sums[resume][None, :], count)
        score = float(scores[0])
        sums = np.concatenate([state.sums[:resume + 1], sums_by_token[0]], axis=0)
        return score, StreamState(kv=kv, sums=sums, score=score, start=resume, tokens=tokens)


class StreamSession:
    """One stream with private state: ``feed(delta)`` appends text and scores the whole
    text so far, running only what is new. Independent sessions never share state.
    Not meant to be fed from two threads at once."""

    def __init__(self, guard, threshold: Optional[float]):
        from .validation import check_threshold
        self._guard = guard
        self._threshold = check_threshold(threshold, guard.default_threshold)
        self.reset()

    def reset(self) -> None:
        """Forget the text and free the cached state."""
        self._text = ""
        self._state: Optional[StreamState] = None
        self._last = None

    @property
    def text(self) -> str:
        return self._text

    @property
    def score(self):
        """The last ScoreResult (None before the first feed)."""
        return self._last

    def feed(self, delta: str):
        from .validation import check_text
        check_text(delta, "delta")
        text = self._text + delta
        result, state = self._guard._score_stream_text(text, self._state, self._threshold)
        self._text, self._state, self._last = text, state, result
        return result

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()


class StreamCache:
    """Recent stream states, bounded in count and bytes, least recently used evicted.

    Thread-safe; each lookup hands out the state object, which is immutable by
    value (advance() returns new states), so concurrent streams never share writes.
    """

    def __init__(self, max_streams: int = 64, max_bytes: int = 256 * 1024 * 1024):
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 0:
            raise ValueError(f"max_streams must be an int >= 0, got {max_streams!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_streams = max_streams
        self.max_bytes = max_bytes
        self._states: "OrderedDict[int, StreamState]" = OrderedDict()
        self._keys = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._states.values())

    def best_match(self, text: str) -> tuple[Optional[int], Optional[StreamState], int]:
        """The cached state whose cleaned text shares the longest prefix with `text`
        (key, state, shared characters)."""
        with self._lock:
            best = (None, None, 0)
            for key, state in self._states.items():
                shared = common_prefix_chars(state.tokens.text, text) if state.tokens is not None else 0
                if shared > best[2]:
                    best = (key, state, shared)
            if best[0] is not None:
                self._states.move_to_end(best[0])
            return best

    def store(self, state: StreamState, replace: Optional[int] = None) -> None:
        """Insert `state`; `replace` names the entry it extends (that entry is dropped)."""
        with self._lock:
            if replace is not None:
                self._states.pop(replace, None)
            if self.max_streams == 0 or state.nbytes > self.max_bytes:
                return
            self._states[next(self._keys)] = state
            total = sum(s.nbytes for s in self._states.values())
            while len(self._states) > self.max_streams or total > self.max_bytes:
                _, evicted = self._states.popitem(last=False)
                total -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

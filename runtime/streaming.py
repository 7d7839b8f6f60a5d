"""Incremental streaming: each call runs only the tokens a stream has not seen.

A stream's state is its token ids, the running selected-neuron sums after every token
(host, float32) and its KV cache, which the step runner owns behind an opaque handle. A new
prefix gets exactly the ids the reference's whole-text tokenization gives (re-tokenized
from the last safe split point, see TextEncoder.tokenize_resuming) and is compared with the
state's ids: appending text can change the last tokens (BPE merges across the boundary,
whitespace the cleaner strips or collapses, a chat artifact completed across chunks), so the
step rolls back to the end of the common token prefix (by length: the runner keeps that
many positions) and runs the rest. Past `max_length` the ids stop changing and the score
is frozen, exactly as truncation makes it. Many streams advance in one engine call.
"""
from __future__ import annotations

import itertools
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np

from .backends.base import StepRow
from .batching import length_groups
from .private_copy import trim_heap
from .text import StreamText
from .tokenization import Tokenized, common_prefix_length


#: new-token width up to which streams are stepped together whatever their padding share
STEP_PAD_FREE_WIDTH = 32


@dataclass(frozen=True)
class StreamState:
    """A stream at one point: valid while its KV handle still holds exactly its tokens
    (a step on the handle makes a new state; the old one is then stale)."""
    kv: object                   # the step runner's KV handle (opaque here)
    sums: np.ndarray             # float32 [len(ids) + 1, features]: running sums after each token
    score: Optional[float]       # score of `ids` (None for the empty state)
    start: int = 0               # first token the last call had to run
    tokens: Optional[Tokenized] = None   # the cleaned text and its ids (scored so far), with split points

    @property
    def ids(self) -> tuple:
        return self.tokens.ids if self.tokens is not None else ()

    @property
    def text(self) -> str:
        return self.tokens.text if self.tokens is not None else ""

    @property
    def nbytes(self) -> int:
        """Everything the state holds: KV, sums, ids, text and split points."""
        tokens = 0
        if self.tokens is not None:
            tokens = (sys.getsizeof(self.tokens.text) + 36 * len(self.tokens.ids)
                      + 72 * len(self.tokens.splits))
        return int(self.kv.nbytes) + self.sums.nbytes + tokens


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two id sequences."""
    return common_prefix_length(tuple(a), tuple(b))


class IncrementalScorer:
    """Advances stream states with a step runner, many streams per engine call."""

    def __init__(self, step_runner, features: int, max_batch: int, token_budget: int):
        self.runner = step_runner
        self._features = int(features)
        limit = step_runner.limits.max_batch
        self._max_batch = min(max_batch, limit) if limit else max_batch
        self._token_budget = token_budget
        self._max_padding = step_runner.limits.max_padding

    def new_state(self) -> StreamState:
        return StreamState(kv=self.runner.new_state(), sums=np.zeros((1, self._features), np.float32), score=None)

    def fork(self, state: StreamState, length: int) -> StreamState:
        """An independent copy of `state`'s first `length` tokens."""
        self._check_fresh(state)
        return StreamState(kv=self.runner.fork(state.kv, length), sums=state.sums[:length + 1].copy(), score=None,
                           tokens=Tokenized("", state.ids[:length]))

    @staticmethod
    def _check_fresh(state: StreamState) -> None:
        if state.kv.length != len(state.ids):
            raise RuntimeError("stream state is stale: its KV cache was advanced by another call "
                               "(a state can be advanced once)")

    def advance(self, state: Optional[StreamState], tokens: Tokenized) -> tuple[float, StreamState]:
        out = []
        self.advance_many([(state, tokens)], lambda i, score, new: out.append((score, new)))
        return out[0]

    def advance_many(self, items: Sequence[tuple[Optional[StreamState], Tokenized]],
                     commit: Callable[[int, float, StreamState], None]) -> None:
        """Score each item's `tokens.ids`, resuming its state at their longest common token
        prefix; `commit(index, score, new_state)` is called as each engine call succeeds, so
        a failure later leaves every stream either advanced (and committed) or untouched."""
        for state, tokens in items:        # every check before any commit
            if not tokens.ids:
                raise ValueError("cannot score an empty token sequence")
            if state is not None:
                self._check_fresh(state)
        pending, lengths = [], []
        for index, (state, tokens) in enumerate(items):
            ids = tokens.ids
            if state is not None and state.score is not None and state.ids == ids:
                commit(index, state.score, replace(state, tokens=tokens))
                continue
            state = state if state is not None else self.new_state()
            resume = min(common_prefix(state.ids, ids), len(ids) - 1)  # at least one token runs
            pending.append((index, state, tokens, resume))
            lengths.append(len(ids) - resume)
        for group in length_groups(lengths, self._max_batch, self._token_budget, self._max_padding,
                                   pad_free_width=STEP_PAD_FREE_WIDTH):
            work = [pending[g] for g in group]
            rows = [StepRow(state.kv, resume, tokens.ids[resume:], state.sums[resume])
                    for _, state, tokens, resume in work]
            outputs = self.runner.step(rows)
            for (index, state, tokens, resume), out in zip(work, outputs):
                sums = np.concatenate([state.sums[:resume + 1], out.sums], axis=0)
                commit(index, out.score, StreamState(kv=state.kv, sums=sums, score=out.score, start=resume,
                                                     tokens=tokens))


def advance_through_cache(cache: "StreamCache", scorer: IncrementalScorer, key: str,
                          tokenize: Callable[[Optional[StreamState]], Tokenized]) -> float:
    """score_streaming's engine half, for both guards: check out the cached state sharing
    the longest prefix with `key`, tokenize (knowing that state), run only what is new, and
    put the states back. A state another stream's entry only shares an opening with is
    copied, not taken over; a failed step changes no cached state."""
    cached, extends = cache.checkout(key)
    new_state = None
    try:
        tokens = tokenize(cached)
        base = cached
        if cached is not None and not extends:
            keep = min(common_prefix(cached.ids, tokens.ids), len(tokens.ids) - 1)
            base = scorer.fork(cached, keep) if keep > 0 else None
        score, new_state = scorer.advance(base, tokens)
    finally:
        if cached is not None and (new_state is None or new_state.kv is not cached.kv):
            cache.store(cached)
    cache.store(new_state)
    return score


#: a stream that held this many characters trims the heap when it ends
_TRIM_AFTER_CHARS = 1 << 20


@dataclass(frozen=True)
class Fed:
    """What a stream session holds after a feed, replaced whole by the next one (so a reader
    never sees half of a feed, and a refused feed leaves the old one in place)."""
    text: StreamText = StreamText()        # the cleaned text so far, kept incrementally
    tokens: Optional[Tokenized] = None     # its ids (at most max_length) and split points
    state: Optional[StreamState] = None    # the step runner's state (None: none, or final)
    result: Optional[object] = None        # the last ScoreResult
    final: bool = False                    # no later text can change the score
    onset: Optional[int] = None            # where (a character offset of all fed) the score first reached the threshold


@dataclass(frozen=True)
class PreparedFeed:
    """A delta cleaned and tokenized against the session state `base` (SirenGuard.prepare_feed)."""
    session: "StreamSession"
    base: Fed
    delta: str
    text: StreamText
    tokens: Optional[Tokenized]

    @property
    def new_tokens(self) -> int:
        """Tokens the engine will run for this feed (0 once the session is final)."""
        if self.tokens is None:
            return 0
        return len(self.tokens.ids) - common_prefix(self.base.tokens.ids if self.base.tokens else (), self.tokens.ids)


class StreamSession:
    """One stream with private state: ``feed(delta)`` appends text and scores the whole
    text so far, running only what is new. Independent sessions never share state; many
    sessions advance together with ``SirenGuard.feed_batch``. Not meant to be fed from two
    threads at once.

    What a session keeps: the cleaned text up to where max_length tokens end (once a feed
    takes the stream past them the score is final, and the text, ids and KV state are
    dropped), a count of the characters fed, and, with ``keep_text`` (the default), the raw
    text itself as a list of the deltas (``text`` joins it on demand). A feed costs what its
    delta costs, whatever was fed before."""

    def __init__(self, guard, threshold: Optional[float], keep_text: bool = True):
        from .validation import check_threshold
        self._guard = guard
        self._threshold = check_threshold(threshold, guard.default_threshold)
        self._keep_text = bool(keep_text)
        self.reset()

    def reset(self) -> None:
        """Forget the text and free the stream's state. A stream that held megabytes of text
        gives the freed heap back to the system too (glibc would keep it resident)."""
        old = getattr(self, "_fed", None)
        held = 0 if old is None else len(old.text.head) + len(old.text.tail) + sum(map(len, self._deltas))
        self._fed = Fed()
        self._deltas: list = []
        if held >= _TRIM_AFTER_CHARS:
            del old
            trim_heap()

    @property
    def guard(self):
        return self._guard

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def keep_text(self) -> bool:
        return self._keep_text

    @property
    def text(self) -> str:
        """Everything fed so far (sessions opened with ``keep_text=False`` do not keep it)."""
        if not self._keep_text:
            raise AttributeError("this stream session was opened with keep_text=False and keeps only what "
                                 "scoring needs; `chars` counts what was fed")
        if len(self._deltas) > 1:
            self._deltas[:] = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    @property
    def chars(self) -> int:
        """How many characters were fed so far."""
        return self._fed.text.chars

    @property
    def score(self):
        """The last ScoreResult (None before the first feed)."""
        return self._fed.result

    @property
    def final(self) -> bool:
        """Whether the score is final: the text is past max_length tokens and no later
        delta can change them (later feeds cost nothing and answer the same score)."""
        return self._fed.final

    @property
    def state(self) -> Optional[StreamState]:
        return self._fed.state

    @property
    def onset(self) -> Optional[int]:
        """The character offset (of everything fed) where the running score first reached
        the threshold, found from the step's own sums (None: not yet, or no prefix head)."""
        return self._fed.onset

    @property
    def fed(self) -> Fed:
        return self._fed

    def _commit(self, delta: str, fed: Fed) -> None:
        if self._keep_text and delta:
            self._deltas.append(delta)
        self._fed = fed

    def feed(self, delta: str):
        return self._guard.feed_batch([self], [delta])[0]

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()


class StreamCache:
    """Recent stream states behind ``score_streaming``, bounded in count and bytes (everything
    a state holds), least recently used evicted.

    A state is *checked out* while a call advances it (no other call sees it meanwhile), so
    two threads never advance one KV cache. A prefix extending a cached stream's whole text
    takes that entry over (the same stream moving on); a prefix that only shares an opening
    with it gets a copy of the shared tokens and leaves the entry to its own stream, so
    interleaved streams with a common opening keep their own states.
    """

    def __init__(self, max_streams: int = 64, max_bytes: int = 256 * 1024 * 1024):
        from .validation import check_int
        check_int(max_streams, "max_streams", low=0)
        check_int(max_bytes, "max_bytes", low=0)
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

    def checkout(self, text: str) -> tuple[Optional[StreamState], bool]:
        """Remove and return the cached state sharing the longest prefix with `text`, and
        whether `text` extends its whole text (None, False when nothing shares anything)."""
        with self._lock:
            best, best_shared = None, 0
            for key, state in self._states.items():
                shared = common_prefix_length(state.text, text)
                if shared > best_shared or (shared == best_shared and shared and
                                            shared == len(state.text)):
                    best, best_shared = key, shared
            if best is None:
                return None, False
            state = self._states.pop(best)
            return state, best_shared == len(state.text)

    def store(self, state: StreamState) -> None:
        """Insert `state` as the most recent entry, evicting to stay within the bounds."""
        with self._lock:
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

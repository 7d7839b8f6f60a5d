"""Agent runs scored turn by turn, each turn costing its own tokens.

An agent loop asks for a verdict after every turn and before every proposed tool call. The
whole trajectory is rendered and tokenized again each time (string work), but the engine
runs only the ids after the longest common prefix with what the stream state already holds:
the render of earlier turns can change when a turn is appended (Qwen3's template drops an
empty think block from an assistant turn once a user turn follows), so the prefix is found
on ids, never assumed. Past max_length the kept ids are head + tail, so an append shifts the
tail and runs at most the tail (max_length / 2 tokens), never the whole run.

`TrajectorySession` holds one run; `AgentSirenGuard.feed_batch` steps many sessions in one
engine call; `AgentSirenGuard.score_streaming` keeps recent states in the content guard's
bounded cache, keyed by `ids_key` so it matches on ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .result import ScoreResult
from .streaming import StreamState
from .tokenization import Tokenized
from .trajectory import from_openai


def ids_key(ids) -> str:
    """Token ids as a string of code points, one per id: StreamCache matches cached states by
    the longest common prefix of their text, which on this key is the common prefix of ids."""
    return "".join(map(chr, ids))


def as_tokens(ids) -> Tokenized:
    """Ids as the stream machinery holds them (the key as the text: no splits to keep)."""
    ids = tuple(ids)
    return Tokenized(ids_key(ids), ids)


@dataclass(frozen=True)
class _Held:
    """What a session holds after an append, replaced whole by the next (a refused append
    leaves the previous one in place)."""
    messages: tuple = ()
    state: Optional[StreamState] = None
    result: Optional[ScoreResult] = None


class TrajectorySession:
    """One agent run, scored after each append (`guard.session(tools=...)`). `append(*messages)`
    takes OpenAI-shaped chat messages (dicts with role, content, tool_calls ...) and returns the
    verdict of the whole run so far; a rejected append (bad message, template refusal) raises
    and changes nothing. Not for concurrent use: one session per run."""

    def __init__(self, guard, tools: Optional[list] = None, threshold: Optional[float] = None):
        self._guard = guard
        self._tools = None if tools is None else list(tools)
        self._threshold = threshold
        self._held = _Held()

    @property
    def guard(self):
        return self._guard

    @property
    def threshold(self) -> float:
        return self._threshold if self._threshold is not None else self._guard.default_threshold

    @property
    def messages(self) -> list:
        return list(self._held.messages)

    @property
    def tools(self) -> Optional[list]:
        return None if self._tools is None else list(self._tools)

    @property
    def result(self) -> Optional[ScoreResult]:
        """The verdict of the run so far (None before the first append)."""
        return self._held.result

    @property
    def tokens(self) -> int:
        """Ids the last verdict read (at most max_length)."""
        state = self._held.state
        return len(state.ids) if state is not None else 0

    def append(self, *messages: Any) -> ScoreResult:
        return self._guard.feed_batch([self], [list(messages)])[0]

    def reset(self) -> None:
        """Forget the run (the tools and threshold stay)."""
        self._held = _Held()

    # -- for AgentSirenGuard.feed_batch -------------------------------------------------
    def _prepare(self, appended: list) -> tuple:
        """(the run's messages after the append, its ids): every check, nothing changed."""
        messages = self._held.messages + tuple(appended)
        trajectory = from_openai(list(messages), self._tools)
        return messages, self._guard._ids_of(trajectory)

    def _commit(self, messages: tuple, state: StreamState, score: float) -> ScoreResult:
        threshold = self.threshold
        result = ScoreResult(score=float(score), is_harmful=bool(float(score) >= threshold), threshold=threshold)
        self._held = _Held(messages, state, result)
        return result


__all__ = ["TrajectorySession", "ids_key", "as_tokens"]

"""Opt-in fail-closed scoring.

A guard in front of every request has two ways to fail: raising (the caller decides) or
answering. The default is to raise, as llm-siren does. Wrapping a guard in
:class:`FailClosedGuard` turns any scoring error into a *harmful* verdict (score 1.0) and
logs it, so a deployment that blocks on ``is_harmful`` blocks when the guard is broken
instead of letting content through unchecked.
"""
from __future__ import annotations

import logging
from typing import Optional

from .result import ScoreResult
from .validation import check_threshold

log = logging.getLogger("siren_runtime.failsafe")

FAIL_CLOSED_SCORE = 1.0


class FailClosedGuard:
    """Same calls as SirenGuard; errors become ``ScoreResult(1.0, True, threshold)``.

    Every error fails closed, the caller's own bad input included (a wrong type, a lone
    surrogate, a threshold outside [0, 1]): a gate must never let content through because a
    request was malformed. Each verdict list has exactly one verdict per input, so results
    can be zipped with the texts. ``errors`` counts the failures swallowed so far (export it
    as a metric). Only ``Exception`` is caught: KeyboardInterrupt and SystemExit propagate.
    """

    def __init__(self, guard, logger: Optional[logging.Logger] = None):
        self._guard = guard
        self._log = logger or log
        self.errors = 0

    @property
    def default_threshold(self) -> float:
        return self._guard.default_threshold

    def _threshold(self, threshold) -> float:
        try:
            return check_threshold(threshold, self._guard.default_threshold)
        except (TypeError, ValueError):
            return self._guard.default_threshold

    def _fail(self, what: str, threshold, count: int = 1):
        self.errors += 1
        self._log.exception("SIREN %s failed; treating the input as harmful (fail-closed)", what)
        return [ScoreResult(FAIL_CLOSED_SCORE, True, self._threshold(threshold)) for _ in range(count)]

    def score(self, text=None, *, prompt=None, response=None, threshold=None) -> ScoreResult:
        try:
            return self._guard.score(text, prompt=prompt, response=response, threshold=threshold)
        except Exception:
            return self._fail("score", threshold)[0]

    def score_batch(self, texts, threshold=None) -> list[ScoreResult]:
        try:
            items = list(texts) if not isinstance(texts, (str, bytes)) else [texts]
        except Exception:
            return self._fail("score_batch", threshold)     # not even iterable: one verdict
        try:
            return self._guard.score_batch(items, threshold=threshold)
        except Exception:
            return self._fail("score_batch", threshold, max(len(items), 1))

    def score_streaming(self, response_so_far, threshold=None) -> ScoreResult:
        try:
            return self._guard.score_streaming(response_so_far, threshold=threshold)
        except Exception:
            return self._fail("score_streaming", threshold)[0]

    def stream(self, threshold=None) -> "FailClosedSession":
        """A stream session whose failed feeds answer harmful (the session keeps its text)."""
        return FailClosedSession(self, threshold)

    def feed_batch(self, sessions, deltas) -> list[ScoreResult]:
        """``SirenGuard.feed_batch`` over FailClosedSessions: one verdict per session."""
        sessions = list(sessions)
        try:
            inner = [s._session for s in sessions]
            return self._guard.feed_batch(inner, deltas)
        except Exception:
            return self._fail("feed_batch", None, max(len(sessions), 1))

    def __call__(self, *args, **kwargs) -> ScoreResult:
        return self.score(*args, **kwargs)


class FailClosedSession:
    """A guard.stream() session that fails closed: ``feed`` never raises an Exception."""

    def __init__(self, owner: FailClosedGuard, threshold):
        self._owner = owner
        try:
            self._session = owner._guard.stream(threshold)
        except Exception:
            owner._fail("stream", threshold)
            self._session = owner._guard.stream(None)
        self._threshold = owner._threshold(threshold)

    @property
    def text(self) -> str:
        return self._session.text

    @property
    def score(self):
        return self._session.score

    def feed(self, delta) -> ScoreResult:
        try:
            return self._session.feed(delta)
        except Exception:
            return self._owner._fail("stream feed", self._threshold)[0]

    def reset(self) -> None:
        self._session.reset()

    def __enter__(self) -> "FailClosedSession":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()

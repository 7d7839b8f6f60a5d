"""Opt-in fail-closed scoring.

A guard in front of every request has two ways to fail: raising (the caller decides) or
answering. The default is to raise, as llm-siren does. Wrapping a guard in
:class:`FailClosedGuard` turns any scoring error into a *harmful* verdict (score 1.0) and
logs it, so a deployment that blocks on ``is_harmful`` blocks when the guard is broken
instead of letting content through unchecked.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Optional

from .result import ScoreResult

log = logging.getLogger("siren_runtime.failsafe")

FAIL_CLOSED_SCORE = 1.0


class FailClosedGuard:
    """Same calls as SirenGuard; errors become ``ScoreResult(1.0, True, threshold)``.

    ``errors`` counts the failures swallowed so far (export it as a metric). Only
    ``Exception`` is caught: KeyboardInterrupt and SystemExit still propagate.
    """

    def __init__(self, guard, logger: Optional[logging.Logger] = None):
        self._guard = guard
        self._log = logger or log
        self.errors = 0

    @property
    def default_threshold(self) -> float:
        return self._guard.default_threshold

    def _threshold(self, threshold) -> float:
        ok = (isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
              and not math.isnan(float(threshold)) and 0.0 <= float(threshold) <= 1.0)
        return float(threshold) if ok else self._guard.default_threshold

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
            return self._guard.score_batch(texts, threshold=threshold)
        except Exception:
            try:
                count = len(texts)
            except Exception:
                count = 1
            return self._fail("score_batch", threshold, max(count, 1))

    def score_streaming(self, response_so_far, threshold=None) -> ScoreResult:
        try:
            return self._guard.score_streaming(response_so_far, threshold=threshold)
        except Exception:
            return self._fail("score_streaming", threshold)[0]

    def __call__(self, *args, **kwargs) -> ScoreResult:
        return self.score(*args, **kwargs)

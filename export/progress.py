"""Step-by-step progress on stderr for the long stages (a real 4B export takes minutes)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.step = 0
        self.started = time.perf_counter()
        self._step_started = self.started

    def start(self, message: str) -> None:
        self.step += 1
        self._step_started = time.perf_counter()
        if self.enabled:
            print(f"[{self.step}/{self.total}] {message} ...", file=self.stream, flush=True)

    def done(self, detail: str = "") -> float:
        elapsed = time.perf_counter() - self._step_started
        if self.enabled:
            extra = f" ({detail})" if detail else ""
            print(f"      done in {elapsed:.1f}s{extra}", file=self.stream, flush=True)
        return elapsed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

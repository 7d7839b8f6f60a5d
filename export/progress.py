"""Step-by-step progress on stderr for the long stages (a real 4B export takes minutes),
with each step's time and the process's peak memory so far (export memory is the limit on
which machine can export which model)."""
from __future__ import annotations

import sys
import time


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    except (ImportError, OSError):
        return float("nan")


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
            print(f"      done in {elapsed:.1f}s, peak RSS {peak_rss_gib():.2f} GiB{extra}", file=self.stream,
                  flush=True)
        return elapsed

    def note(self, message: str) -> None:
        """A line inside a long step (sub-step progress)."""
        if self.enabled:
            print(f"      {message} [{time.perf_counter() - self._step_started:.1f}s, peak RSS "
                  f"{peak_rss_gib():.2f} GiB]", file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

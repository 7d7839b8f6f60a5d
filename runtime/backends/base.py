"""The runner interfaces every backend implements (in the spirit of Polygraphy's runners).

A backend module offers two loaders, ``create_score_runner(bundle, device, **options)`` and
``create_step_runner(bundle, device, **options)``, raising ``BackendUnavailableError`` when
it cannot run here. Which backend and device are tried, and the fallback between them, is
decided in one place: :func:`siren_runtime.backends.open_runners`.

A score runner maps padded ids to scores. A step runner advances streams: it owns each
stream's KV cache behind an opaque :class:`KVState` handle (host arrays for ONNX Runtime on
the CPU, device memory for GPU runners); the runtime keeps the token ids and the running
per-token sums. Both declare their limits and can be closed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class RunnerLimits:
    """What one call of a runner accepts, and how it prefers to be fed."""
    #: rows per call (None: no limit of its own; the guard's max_batch_size applies)
    max_batch: Optional[int] = None
    #: tokens per row per call (None: up to the bundle's max_length)
    max_sequence: Optional[int] = None
    #: share of padding a batch may hold: every padded token costs a real token's compute on
    #: a CPU, while a GPU at small batch is bound by weight reads, so fuller batches win there
    max_padding: float = 0.25
    #: step runners: the dtype of the KV cache they keep ("fp32", "fp16", "bf16")
    state_dtype: Optional[str] = None
    #: padded tokens per call it prefers at most (None: the guard's token_budget); a CPU's
    #: activations grow with it while its throughput does not
    max_tokens: Optional[int] = None


class Runner:
    """What every runner is (Polygraphy's BaseRunner): a name and device, its limits, how an
    int8 bundle's weights were coded at load ("u8 x s8": the signed twin; None: as stored),
    the buffers its session reads, and one closed check. Subclasses free what they hold in
    `_release`, which `close` calls once."""
    name = "?"
    device = "cpu"
    #: what the closed error calls it
    role = "runner"

    def __init__(self, *, int8_coding: Optional[str] = None, buffers: tuple = ()):
        self.int8_coding = int8_coding
        self.buffers = tuple(buffers)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {self.name} {self.role} is closed")

    def close(self) -> None:
        """Free what the runner holds; later calls raise. Closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        try:
            self._release()
        finally:
            self.buffers = ()

    def _release(self) -> None:
        pass


class BaseStepRunner(Runner):
    """A step runner's shared checks: `checked(rows)` refuses a closed runner, and rows that
    name another runner's state, a state twice, a resume past the state or too many tokens,
    before any state is touched."""
    role = "step runner"
    #: the KVState class this runner makes
    state_type: type = object
    _max_length = 0

    def checked(self, rows: Sequence["StepRow"]) -> list:
        self.check_open()
        rows = list(rows)
        if rows:
            check_rows(self, rows, self.state_type, self._max_length, self.limits.max_batch)
        return rows


class ScoreRunner(Protocol):
    name: str        # backend, e.g. "onnxruntime"
    device: str      # "cpu" or "cuda"
    limits: RunnerLimits

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Scores (float32 [batch]) for padded int64 [batch, seq] inputs."""
        ...

    def close(self) -> None:
        """Free what the runner holds; later calls raise."""
        ...


class KVState(Protocol):
    """One stream's KV cache, owned by the step runner that made it."""
    #: tokens whose keys/values the state holds
    length: int
    #: bytes it holds (for cache bounds)
    nbytes: int


@dataclass(frozen=True)
class StepRow:
    """One stream's part of a step call: keep `resume` tokens of `state` (a rollback when
    smaller than its length), then run `new_ids` after them."""
    state: KVState
    resume: int
    new_ids: Sequence[int]
    past_sums: np.ndarray      # float32 [features]: the running sums after `resume` tokens


@dataclass(frozen=True)
class StepOutput:
    score: float
    sums: np.ndarray           # float32 [len(new_ids), features]: running sums after each new token


def check_state(owner, state, state_type: type, resume) -> None:
    """A step runner's check that `state` is one of its own and can resume at `resume`."""
    if not isinstance(state, state_type) or state.owner is not owner:
        raise ValueError("stream state belongs to another runner")
    if isinstance(resume, bool) or not isinstance(resume, int) or not 0 <= resume <= state.length:
        raise ValueError(f"cannot resume at {resume!r}: the state holds {state.length} tokens")


def check_rows(owner, rows: Sequence[StepRow], state_type: type, max_length: int,
               max_batch: Optional[int] = None) -> None:
    """Everything a step runner checks before it touches any state (shared by all runners)."""
    if max_batch is not None and len(rows) > max_batch:
        raise ValueError(f"a step runs at most {max_batch} streams here, got {len(rows)}")
    seen = set()
    for row in rows:
        check_state(owner, row.state, state_type, row.resume)
        if id(row.state) in seen:
            raise ValueError("a stream state appears twice in one step")
        seen.add(id(row.state))
        if not 0 < len(row.new_ids) <= max_length - row.resume:
            raise ValueError(f"a step runs 1..{max_length - row.resume} new tokens here, got {len(row.new_ids)}")


class StepRunner(Protocol):
    name: str
    device: str
    limits: RunnerLimits

    def new_state(self) -> KVState:
        """An empty stream state."""
        ...

    def fork(self, state: KVState, length: int) -> KVState:
        """A new, independent state holding a copy of `state`'s first `length` tokens."""
        ...

    def step(self, rows: Sequence[StepRow]) -> list[StepOutput]:
        """Advance every row's state in one engine call. A state is changed only after
        the whole call succeeded: on an exception every state is as it was."""
        ...

    def close(self) -> None:
        ...

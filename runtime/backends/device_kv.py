"""Streaming on a GPU: each stream's KV cache lives in device memory and never crosses to
the host; a step gathers the rows' caches into the batch tensor on the device, runs the
step graph once for all rows, and scatters the new keys/values back.

A stream's cache is one allocation laid out ``[layers * 2, kv_heads, capacity, head_dim]``
(grown by doubling up to ``max_length``), so rollback is by length only. The batch tensor
is the step graph's ``past_kv [layers, 2, B, kv_heads, past, head_dim]``: row ``b``'s slab
for one (layer, k/v) is ``kv_heads`` rows of ``past * head_dim`` elements, one pitched
device-to-device copy. :class:`DeviceStepRunner` does that bookkeeping; a backend
subclass only binds shapes/addresses and runs its engine (:meth:`_execute`).
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Sequence

import numpy as np

from ..bundle import STEP_IO, StreamingSpec
from .base import RunnerLimits, StepOutput, StepRow, check_rows, check_state
from .cuda_memory import CudaStream, DeviceBuffer, allocate, free

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_MIN_CAPACITY = 16


class DeviceKVState:
    """A stream's KV cache in device memory (an opaque handle for the runtime)."""
    __slots__ = ("ptr", "capacity", "length", "owner", "__weakref__")

    def __init__(self, owner: "DeviceStepRunner"):
        self.ptr: Optional[int] = None
        self.capacity = 0
        self.length = 0
        self.owner = owner

    @property
    def nbytes(self) -> int:
        return self.capacity * self.owner.token_bytes

    def __del__(self):
        owner, ptr = getattr(self, "owner", None), getattr(self, "ptr", None)
        if owner is not None and ptr is not None:
            owner._graveyard.append(ptr)   # freed by the owner under its lock, never from here


class DeviceStepRunner:
    """The device-side state and copies of a batched step; subclasses run the engine."""
    name = "?"
    device = "cuda"

    def __init__(self, rt, spec: StreamingSpec, max_length: int, max_batch: int):
        self.rt = rt
        self._spec = spec
        self._max_length = int(max_length)
        self._elem = ELEMENT_BYTES[spec.kv_dtype]
        self._lk = spec.kv_layers * 2
        self._row_bytes = spec.head_dim * self._elem           # one position of one head
        self.token_bytes = self._lk * spec.kv_heads * self._row_bytes
        self.limits = RunnerLimits(max_batch=int(max_batch), max_sequence=self._max_length, max_padding=0.6,
                                   state_dtype=spec.kv_dtype)
        self._lock = threading.Lock()
        self._graveyard: list[int] = []
        self._states: "weakref.WeakSet[DeviceKVState]" = weakref.WeakSet()
        self._buffers = {name: DeviceBuffer(rt, name) for name in STEP_IO.inputs + STEP_IO.outputs}
        self.stream: Optional[CudaStream] = CudaStream(rt)

    # -- what a backend provides ------------------------------------------------------
    def _execute(self, shapes: dict, out_shapes: dict, addresses: dict) -> None:
        """Run the step graph after the copies queued on `self.stream`, with these input and
        output shapes and tensor addresses; its outputs must be complete, or queued on
        `self.stream`, when this returns."""
        raise NotImplementedError

    def _release_engine(self) -> None:
        pass

    # -- stream states ----------------------------------------------------------------
    def _live(self) -> CudaStream:
        if self.stream is None:
            raise RuntimeError(f"this {self.name} step runner is closed")
        while self._graveyard:
            free(self.rt, self._graveyard.pop())
        return self.stream

    def new_state(self) -> DeviceKVState:
        with self._lock:
            self._live()
            state = DeviceKVState(self)
            self._states.add(state)
            return state

    def _copy_prefix(self, dst: int, dst_capacity: int, src: int, src_capacity: int, length: int) -> None:
        """Positions [0, length) of every (layer, k/v) slab, between two stream caches."""
        slab_dst, slab_src = self._spec.kv_heads * dst_capacity, self._spec.kv_heads * src_capacity
        for lk in range(self._lk):
            self.stream.copy_rows(dst + lk * slab_dst * self._row_bytes, dst_capacity * self._row_bytes,
                                  src + lk * slab_src * self._row_bytes, src_capacity * self._row_bytes,
                                  length * self._row_bytes, self._spec.kv_heads)

    def fork(self, state: DeviceKVState, length: int) -> DeviceKVState:
        with self._lock:
            stream = self._live()
            check_state(self, state, DeviceKVState, length)
            copy = DeviceKVState(self)
            if length:
                capacity = max(length, _MIN_CAPACITY)
                copy.ptr = allocate(self.rt, capacity * self.token_bytes, "a forked stream's KV cache")
                copy.capacity = capacity
                self._copy_prefix(copy.ptr, capacity, state.ptr, state.capacity, length)
                stream.synchronize()
            copy.length = length
            self._states.add(copy)
            return copy

    # -- the step -----------------------------------------------------------------------
    def step(self, rows: Sequence[StepRow]) -> list[StepOutput]:
        with self._lock:
            stream = self._live()
            if not rows:
                return []
            check_rows(self, rows, DeviceKVState, self._max_length, self.limits.max_batch)
            return self._step(stream, list(rows))

    def _step(self, stream: CudaStream, rows: list[StepRow]) -> list[StepOutput]:
        s = self._spec
        batch = len(rows)
        past = max(row.resume for row in rows)
        width = max(len(row.new_ids) for row in rows)
        ids = np.zeros((batch, width), dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, :len(row.new_ids)] = row.new_ids
        host = {
            "input_ids": ids,
            "new_lengths": np.asarray([len(r.new_ids) for r in rows], dtype=np.int64),
            "past_lengths": np.asarray([r.resume for r in rows], dtype=np.int64),
            "past_sums": np.ascontiguousarray(np.stack([r.past_sums for r in rows]), dtype=np.float32),
        }
        shapes = {name: array.shape for name, array in host.items()}
        shapes["past_kv"] = (s.kv_layers, 2, batch, s.kv_heads, past, s.head_dim)
        out_shapes = {"score": (batch,), "new_kv": (s.kv_layers, 2, batch, s.kv_heads, width, s.head_dim),
                      "sums": (batch, width, s.feature_dim)}
        sizes = {name: array.nbytes for name, array in host.items()}
        sizes["past_kv"] = int(np.prod(shapes["past_kv"])) * self._elem
        sizes["new_kv"] = int(np.prod(out_shapes["new_kv"])) * self._elem
        sizes["score"] = batch * 4
        sizes["sums"] = int(np.prod(out_shapes["sums"])) * 4
        addresses = {name: self._buffers[name].ensure(sizes[name]) for name in sizes}
        for name, array in host.items():
            stream.upload(addresses[name], array)
        past_kv = addresses["past_kv"]
        if any(row.resume < past for row in rows):
            # the padding of shorter pasts must be finite: a masked NaN still poisons attention
            # (0 * NaN), and fresh device memory can hold any bits
            stream.zero(past_kv, sizes["past_kv"])
        for b, row in enumerate(rows):                     # gather on the device
            for lk in range(self._lk):
                stream.copy_rows(past_kv + (lk * batch + b) * s.kv_heads * past * self._row_bytes,
                                 past * self._row_bytes,
                                 (row.state.ptr or 0) + lk * s.kv_heads * row.state.capacity * self._row_bytes,
                                 row.state.capacity * self._row_bytes, row.resume * self._row_bytes, s.kv_heads)
        self._execute(shapes, out_shapes, addresses)
        score = np.empty(batch, dtype=np.float32)
        sums = np.empty(out_shapes["sums"], dtype=np.float32)
        stream.download(score, addresses["score"])
        stream.download(sums, addresses["sums"])
        stream.synchronize()
        self._commit(stream, rows, width, addresses["new_kv"])
        return [StepOutput(score=float(score[b]), sums=sums[b, :len(row.new_ids)].copy())
                for b, row in enumerate(rows)]

    def _commit(self, stream: CudaStream, rows: list[StepRow], width: int, new_kv: int) -> None:
        """Write each row's new keys/values into its cache; states change only here, after
        the engine call succeeded (growing allocates first, so a failed allocation changes
        nothing)."""
        s = self._spec
        batch = len(rows)
        targets = []
        try:
            for row in rows:
                end = row.resume + len(row.new_ids)
                state = row.state
                if end > state.capacity:
                    capacity = min(self._max_length, max(end, 2 * state.capacity, _MIN_CAPACITY))
                    targets.append((allocate(self.rt, capacity * self.token_bytes, "a stream's KV cache"),
                                    capacity))
                else:
                    targets.append((state.ptr, state.capacity))
        except BaseException:
            for (ptr, _), row in zip(targets, rows):
                if ptr != row.state.ptr:
                    free(self.rt, ptr)
            raise
        for b, (row, (ptr, capacity)) in enumerate(zip(rows, targets)):
            if ptr != row.state.ptr and row.resume:
                self._copy_prefix(ptr, capacity, row.state.ptr, row.state.capacity, row.resume)
            n = len(row.new_ids)
            for lk in range(self._lk):                  # scatter on the device
                stream.copy_rows(ptr + (lk * s.kv_heads * capacity + row.resume) * self._row_bytes,
                                 capacity * self._row_bytes,
                                 new_kv + (lk * batch + b) * s.kv_heads * width * self._row_bytes,
                                 width * self._row_bytes, n * self._row_bytes, s.kv_heads)
        stream.synchronize()
        for row, (ptr, capacity) in zip(rows, targets):
            state = row.state
            if ptr != state.ptr:
                old, state.ptr, state.capacity = state.ptr, ptr, capacity
                if old is not None:
                    free(self.rt, old)
            state.length = row.resume + len(row.new_ids)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Free every stream state, the I/O buffers, the engine and the CUDA stream."""
        with self._lock:
            if self.stream is None:
                return
            for state in list(self._states):
                if state.ptr is not None:
                    free(self.rt, state.ptr)
                    state.ptr, state.capacity, state.length = None, 0, 0
            while self._graveyard:
                free(self.rt, self._graveyard.pop())
            for buffer in self._buffers.values():
                buffer.free()
            self._release_engine()
            stream, self.stream = self.stream, None
            stream.close()

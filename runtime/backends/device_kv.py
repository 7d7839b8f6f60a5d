"""Streaming on a GPU: each stream's KV cache lives in device memory and never crosses to
the host; a step gathers the rows' caches into the batch tensor on the device, runs the
step graph once for all rows, and scatters the new keys/values back.

A stream's cache is one allocation laid out ``[layers * 2, kv_heads, capacity, head_dim]``
(grown by doubling up to ``max_length``), so rollback is by length only. The batch tensor
is the step graph's ``past_kv [layers, 2, B, kv_heads, past, head_dim]``: row ``b``'s slab
for one (layer, k/v) is ``kv_heads`` rows of ``past * head_dim`` elements, one pitched
device-to-device copy. :class:`DeviceStepRunner` does that bookkeeping; a backend
subclass only binds shapes/addresses and runs its engine (:meth:`_execute`).

Host calls per step do not grow with streams or layers, and what the bindings convert grows
with streams only: the gather is one batched copy of one 3-D entry per stream
(``CudaStream.copy_blocks``), the scatter and any growth's prefix copies another, the inputs
are staged in pinned memory, and a grown cache is allocated and freed stream-ordered.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Sequence

import numpy as np

from ..bundle import STEP_IO, STEP_MIN_PAST, StreamingSpec
from .base import BaseStepRunner, RunnerLimits, StepOutput, StepRow, check_state
from .cuda_memory import BlockCopies, CudaStream, DeviceBuffer, PinnedBuffer

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


class DeviceStepRunner(BaseStepRunner):
    """The device-side state and copies of a batched step; subclasses run the engine."""
    name = "?"
    device = "cuda"
    state_type = DeviceKVState

    def __init__(self, rt, spec: StreamingSpec, max_length: int, max_batch: int, *,
                 int8_coding: Optional[str] = None, buffers: tuple = ()):
        super().__init__(int8_coding=int8_coding, buffers=buffers)
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
        self._pinned = {name: PinnedBuffer(rt, name) for name in STEP_IO.inputs + STEP_IO.outputs}
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
        self.check_open()
        while self._graveyard:
            self.stream.free(self._graveyard.pop())
        return self.stream

    def new_state(self) -> DeviceKVState:
        with self._lock:
            self._live()
            state = DeviceKVState(self)
            self._states.add(state)
            return state

    def _blocks(self, dst: np.ndarray, dst_capacity: np.ndarray, dst_offset: np.ndarray,
                src: np.ndarray, src_capacity: np.ndarray, src_offset: np.ndarray, length: np.ndarray,
                dst_layer_rows: Optional[np.ndarray] = None, src_layer_rows: Optional[np.ndarray] = None
                ) -> BlockCopies:
        """Copy i: `length[i]` positions of every (layer, k/v) slab, one 3-D copy. A layout
        with `capacity` positions has rows of capacity * row_bytes (one head each) and
        positions start at `offset`; a stream cache's slabs follow one another (kv_heads rows
        apart, the default), the batch tensor's are batch * kv_heads rows apart."""
        rb, heads = self._row_bytes, self._spec.kv_heads
        rows = np.full(len(length), heads, dtype=np.int64)
        return BlockCopies(dst=dst + dst_offset * rb, dst_pitch=dst_capacity * rb,
                           dst_layer_rows=rows if dst_layer_rows is None else dst_layer_rows,
                           src=src + src_offset * rb, src_pitch=src_capacity * rb,
                           src_layer_rows=rows if src_layer_rows is None else src_layer_rows,
                           width=length * rb, height=heads, depth=self._lk)

    def _copy_prefix(self, dst: int, dst_capacity: int, src: int, src_capacity: int, length: int) -> None:
        """Positions [0, length) of every (layer, k/v) slab, between two stream caches."""
        one = lambda v: np.asarray([v], dtype=np.int64)   # noqa: E731
        self.stream.copy_blocks(self._blocks(one(dst), one(dst_capacity), one(0), one(src), one(src_capacity),
                                             one(0), one(length)))

    def fork(self, state: DeviceKVState, length: int) -> DeviceKVState:
        with self._lock:
            stream = self._live()
            check_state(self, state, DeviceKVState, length)
            copy = DeviceKVState(self)
            if length:
                capacity = max(length, _MIN_CAPACITY)
                copy.ptr = stream.allocate(capacity * self.token_bytes, "a forked stream's KV cache")
                copy.capacity = capacity
                self._copy_prefix(copy.ptr, capacity, state.ptr, state.capacity, length)
                stream.synchronize()
            copy.length = length
            self._states.add(copy)
            return copy

    # -- the step -----------------------------------------------------------------------
    def step(self, rows: Sequence[StepRow]) -> list[StepOutput]:
        with self._lock:
            rows = self.checked(rows)
            stream = self._live()
            if not rows:
                return []
            return self._step(stream, rows)

    def _step(self, stream: CudaStream, rows: list[StepRow]) -> list[StepOutput]:
        s = self._spec
        batch = len(rows)
        past = max(STEP_MIN_PAST, max(row.resume for row in rows))    # first feeds: one masked position
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
        sizes = s.sizes(batch=batch, past=past, new=width)
        shapes["past_kv"] = STEP_IO.shape("past_kv", **sizes)
        out_shapes = {name: STEP_IO.shape(name, **sizes) for name in STEP_IO.outputs}
        sizes = {name: array.nbytes for name, array in host.items()}
        sizes["past_kv"] = int(np.prod(shapes["past_kv"])) * self._elem
        sizes["new_kv"] = int(np.prod(out_shapes["new_kv"])) * self._elem
        sizes["score"] = batch * 4
        sizes["sums"] = int(np.prod(out_shapes["sums"])) * 4
        addresses = {name: self._buffers[name].ensure(sizes[name]) for name in sizes}
        for name, array in host.items():
            stream.upload(addresses[name], self._pinned[name].stage(array))
        past_kv = addresses["past_kv"]
        if any(row.resume < past for row in rows):
            # the padding of shorter pasts must be finite: a masked NaN still poisons attention
            # (0 * NaN), and fresh device memory can hold any bits
            stream.zero(past_kv, sizes["past_kv"])
        live = [b for b, row in enumerate(rows) if row.resume]
        if live:                                           # gather on the device, one batched copy
            column = lambda f: np.asarray([f(rows[b], b) for b in live], dtype=np.int64)   # noqa: E731
            slab = s.kv_heads * past * self._row_bytes     # one (layer, k/v, row) slab of the batch tensor
            stream.copy_blocks(self._blocks(
                past_kv + column(lambda r, b: b) * slab, column(lambda r, b: past), column(lambda r, b: 0),
                column(lambda r, b: r.state.ptr), column(lambda r, b: r.state.capacity), column(lambda r, b: 0),
                column(lambda r, b: r.resume), dst_layer_rows=np.full(len(live), batch * s.kv_heads, dtype=np.int64)))
        self._execute(shapes, out_shapes, addresses)
        score = self._pinned["score"].view(batch * 4)[:batch * 4].view(np.float32)
        sums = self._pinned["sums"].view(sizes["sums"])[:sizes["sums"]].view(np.float32).reshape(out_shapes["sums"])
        stream.download(score, addresses["score"])
        stream.download(sums, addresses["sums"])
        stream.synchronize()
        outputs = [StepOutput(score=float(score[b]), sums=sums[b, :len(row.new_ids)].copy())
                   for b, row in enumerate(rows)]
        self._commit(stream, rows, width, addresses["new_kv"])
        return outputs

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
                    targets.append((stream.allocate(capacity * self.token_bytes, "a stream's KV cache"), capacity))
                else:
                    targets.append((state.ptr, state.capacity))
        except BaseException:
            for (ptr, _), row in zip(targets, rows):
                if ptr != row.state.ptr:
                    stream.free(ptr)
            raise
        # one batched copy: the prefixes of grown caches into their new allocations, and every
        # row's new keys/values after its prefix (disjoint regions, so their order is free)
        grown = [(row, ptr, capacity) for row, (ptr, capacity) in zip(rows, targets)
                 if ptr != row.state.ptr and row.resume]
        as_int = lambda values: np.asarray(values, dtype=np.int64)   # noqa: E731
        slab = s.kv_heads * width * self._row_bytes
        copies = self._blocks(
            as_int([p for p, _ in targets]), as_int([c for _, c in targets]), as_int([r.resume for r in rows]),
            new_kv + as_int(range(batch)) * slab, as_int([width] * batch), as_int([0] * batch),
            as_int([len(r.new_ids) for r in rows]), src_layer_rows=as_int([batch * s.kv_heads] * batch))
        if grown:
            copies = copies + self._blocks(
                as_int([p for _, p, _ in grown]), as_int([c for _, _, c in grown]), as_int([0] * len(grown)),
                as_int([r.state.ptr for r, _, _ in grown]), as_int([r.state.capacity for r, _, _ in grown]),
                as_int([0] * len(grown)), as_int([r.resume for r, _, _ in grown]))
        stream.copy_blocks(copies)
        # no synchronization: every later use of these caches (the next gather, a fork, a
        # free) is queued on this same stream, after these copies
        for row, (ptr, capacity) in zip(rows, targets):
            state = row.state
            if ptr != state.ptr:
                old, state.ptr, state.capacity = state.ptr, ptr, capacity
                if old is not None:
                    stream.free(old)
            state.length = row.resume + len(row.new_ids)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Free every stream state, the I/O buffers, the engine and the CUDA stream."""
        with self._lock:
            super().close()

    def _release(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
            for state in list(self._states):
                if state.ptr is not None:
                    self.stream.free(state.ptr)
                    state.ptr, state.capacity, state.length = None, 0, 0
            while self._graveyard:
                self.stream.free(self._graveyard.pop())
            self.stream.synchronize()
            for buffer in list(self._buffers.values()) + list(self._pinned.values()):
                buffer.free()
            self._release_engine()
            stream, self.stream = self.stream, None
            stream.close()

"""Dynamic batching: concurrent requests become one engine call, as in TEI and Triton.

Requests wait in a queue; one worker takes the oldest, keeps collecting until the batch
holds ``max_batch`` items or ``max_wait_s`` has passed since it started, and runs the batch
on its own thread (so the event loop keeps accepting requests, which is what fills the
next batch while this one runs). A request's items stay together. Items that may not share
a call (two feeds of one stream session) wait for the next batch, in arrival order.
A batch that fails is rerun item by item, so one bad input fails only its own request.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence


class BatcherClosed(RuntimeError):
    """The batcher is stopping and takes no new work (the server answers 503)."""


@dataclass
class _Pending:
    items: list
    future: asyncio.Future
    keys: frozenset = field(default_factory=frozenset)


class DynamicBatcher:
    """``await submit(items)`` -> one result per item (or the item's exception).

    run: blocking ``items -> results`` (same length). conflict_key: items with equal
    non-None keys never share a call. isolate=False: a failed call is not rerun item by item
    (for calls that may have changed state part-way, such as stream feeds). observe: called with each call's size (metrics).
    enabled=False: every request runs on its own (for comparison), on a small thread pool.
    """

    def __init__(self, run: Callable[[list], Sequence[Any]], *, max_batch: int = 32, max_wait_s: float = 0.002,
                 conflict_key: Optional[Callable[[Any], Optional[Hashable]]] = None,
                 observe: Optional[Callable[[int], None]] = None, enabled: bool = True, workers: int = 4,
                 isolate: bool = True, name: str = "batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._key = conflict_key or (lambda item: None)
        self._observe = observe or (lambda size: None)
        self.enabled = enabled
        self._isolate = isolate
        self._pool = concurrent.futures.ThreadPoolExecutor(1 if enabled else workers, thread_name_prefix=name)
        self._queue: deque = deque()
        self._wake: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self._closing = False

    async def start(self) -> None:
        self._wake = asyncio.Event()
        if self.enabled:
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop taking requests; those already queued are still answered."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._worker is not None:
            await self._worker
        self._pool.shutdown(wait=True)

    async def submit(self, items: list) -> list:
        if self._closing:
            raise BatcherClosed("the server is shutting down")
        loop = asyncio.get_running_loop()
        if not self.enabled:
            self._observe(len(items))
            return await loop.run_in_executor(self._pool, self._run_isolating, items)
        keys = frozenset(k for k in map(self._key, items) if k is not None)
        pending = _Pending(list(items), loop.create_future(), keys)
        self._queue.append(pending)
        self._wake.set()
        return await pending.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = await self._collect()
            items = [item for pending in batch for item in pending.items]
            self._observe(len(items))
            results = await loop.run_in_executor(self._pool, self._run_isolating, items)
            start = 0
            for pending in batch:
                mine = results[start:start + len(pending.items)]
                start += len(pending.items)
                if not pending.future.done():
                    pending.future.set_result(mine)

    async def _collect(self) -> list:
        """The next batch: oldest first, up to max_batch items or max_wait_s of waiting."""
        deadline = time.monotonic() + self.max_wait_s
        batch, size, keys = [], 0, set()
        while True:
            skipped = deque()
            while self._queue and size < self.max_batch:
                pending = self._queue.popleft()
                if batch and (size + len(pending.items) > self.max_batch or keys & pending.keys):
                    skipped.append(pending)
                    if keys & pending.keys:
                        continue        # same session twice: keep looking, it waits its turn
                    break
                batch.append(pending)
                size += len(pending.items)
                keys |= pending.keys
            self._queue.extendleft(reversed(skipped))
            remaining = deadline - time.monotonic()
            if size >= self.max_batch or remaining <= 0 or self._closing or skipped:
                return batch
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return batch

    def _run_isolating(self, items: list) -> list:
        """Results for `items`; if the call fails, each item alone (its own error or result)."""
        try:
            results = list(self._run(items))
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            return results
        except Exception as error:
            if len(items) == 1 or not self._isolate:
                return [error] * len(items)
            out = []
            for item in items:
                try:
                    out.append(self._run([item])[0])
                except Exception as e:   # this item's own failure, reported to its request
                    out.append(e)
            return out

"""One served guard: its batchers, its sessions and its engine calls. `ContentService` serves
a SirenGuard (texts, text streams); `TrajectoryService` (trajectory_service.py) an
AgentSirenGuard. The routes reach a service through `ServedGuards.pick`, never a guard."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Optional

from .api import ApiError
from .batcher import DynamicBatcher
from .http import unwrap
from .metrics import ServerMetrics
from .score_memo import ScoreMemo
from .sessions import SessionLimitError, SessionRegistry, UnknownSessionError
from .settings import ServeConfig

#: a feed running more new tokens than this takes the bulk lane (its own engine calls)
BULK_FEED_TOKENS = 64


class GuardService:
    """What every kind of served guard has: a name, a default threshold, batchers, a session
    registry swept by its TTL, and a pool where requests tokenize off the event loop."""

    kind = ""

    def __init__(self, guard, config: ServeConfig, name: str, metrics: Optional[ServerMetrics] = None):
        self.guard, self.config, self.name = guard, config, name
        self.metrics = metrics or ServerMetrics()
        self.threshold = config.threshold if config.threshold is not None else guard.default_threshold
        self.batching = dict(max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000.0,
                             enabled=config.dynamic_batching)
        #: where scores can move with their batch (GPU, int8), one remembered number per input
        self.decided = None if getattr(guard, "batch_invariant", False) else ScoreMemo()
        self.preparers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=f"siren-prepare-{name}")
        self.batchers: list = []
        self.sessions: SessionRegistry = None      # set by the subclass
        #: more registries of this guard's sessions (a protocol's keyed ones): swept and freed alike
        self.keyed: list = []
        self._sweeper: Optional[asyncio.Task] = None

    def batcher(self, run, kind: str, **options) -> DynamicBatcher:
        made = DynamicBatcher(run, observe=self.metrics.batch_size.labels(kind, self.name).observe,
                              name=f"siren-{kind}", **{**self.batching, **options})
        self.batchers.append(made)
        return made

    def observe(self, scores: list, threshold: float) -> None:
        self.metrics.observe_verdicts(self.name, scores, [s >= threshold for s in scores])

    def session_count(self) -> int:
        return len(self.sessions)

    async def prepare(self, work, *args, param: Optional[str] = None):
        """Blocking input work (render, clean, tokenize) on the pool; bad input is a 400."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.preparers, work, *args)
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"input refused: {e}", param=param, code="invalid_input") from None

    def _scored(self, id_lists: list) -> list:
        """Scores of tokenized inputs (one remembered number per input where batches move it)."""
        if self.decided is None:
            scores = self.guard.score_token_ids(id_lists)
        else:
            scores = self.decided.scores(id_lists, self.guard.score_token_ids)
        return [(float(s), len(i)) for s, i in zip(scores, id_lists)]

    async def start(self) -> None:
        for batcher in self.batchers:
            await batcher.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for batcher in self.batchers:
            await batcher.stop()
        self.preparers.shutdown(wait=True)
        for registry in [self.sessions, *self.keyed]:
            registry.clear()
        self.guard.close()

    async def _sweep_forever(self) -> None:
        period = max(1.0, min(60.0, self.config.session_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            closed = self.sessions.sweep()
            for registry in self.keyed:
                registry.sweep()
            if closed:
                self.metrics.sessions_expired.labels(self.name).inc(closed)
            self.metrics.sessions.labels(self.name).set(self.session_count())

    def describe(self) -> dict:
        """The guard as /info and /health report it."""
        guard, bundle = self.guard, self.guard.bundle
        return {"model": self.name, "kind": self.kind, "backend": guard.backend, "device": guard.device,
                "dtype": bundle.model.dtype,
                "quantization": (bundle.manifest.get("quantization") or {}).get("scheme"),
                "base_model": (bundle.manifest.get("backbone") or {}).get("model_id"),
                "threshold": self.threshold, "incremental_streaming": guard.incremental_streaming,
                "prefix_scores": bool(getattr(guard, "prefix_scores_available", False)),
                "batch_invariant": bool(getattr(guard, "batch_invariant", False)),
                "sessions": self.session_count(), "limits": dict(guard.limits)}


class ContentService(GuardService):
    """A SirenGuard: texts scored in dynamic batches, text streams fed in batches."""

    kind = "content"

    def __init__(self, guard, config: ServeConfig, name: str, metrics: Optional[ServerMetrics] = None,
                 streams=None):
        super().__init__(guard, config, name, metrics)
        self.sessions = SessionRegistry(guard, config.max_sessions, config.session_ttl_s)
        self.scorer = self.batcher(self._score_texts, "score")
        # two lanes: feeds that run many new tokens (a first long delta) get their own engine
        # calls, so a few-token feed on another stream never waits for one in the queue
        self.feeder, self.bulk_feeder = (self.batcher(self._feed, "stream", conflict_key=lambda item: id(item[0]),
                                                      isolate=False) for _ in range(2))
        self.streams = (streams or LocalStreams)(self)

    def session_count(self) -> int:
        return self.streams.count()

    # -- blocking work, on the batchers' threads ----------------------------------------
    def _score_texts(self, texts: list) -> list:
        return self._scored([self.guard.token_ids(t) for t in texts])

    def _feed(self, items: list) -> list:
        """Engine calls only: each feed was cleaned and tokenized on its request's thread. If an
        engine call fails part-way, the feeds it already committed answer their scores and only
        the others get the error (their sessions untouched), so a client's retry never feeds a
        delta twice."""
        def answer(session):
            return session.score, session.chars, session.onset
        try:
            self.guard.feed_prepared([prepared for _, prepared in items])
        except Exception as error:     # noqa: BLE001 - each feed gets its own outcome
            return [answer(s) if s.fed is not p.base else error for s, p in items]
        return [answer(session) for session, _ in items]

    # -- for the routes -----------------------------------------------------------------
    async def scores(self, texts: list) -> tuple[list, list]:
        out = unwrap(await self.scorer.submit(texts))
        return [s for s, _ in out], [n for _, n in out]

    async def prefix_scores(self, texts: list) -> list:
        return await self.prepare(self.guard.score_prefixes_batch, texts)

    async def feed_held(self, held, delta: str) -> tuple:
        """Feed `delta` to a held session (the caller holds its lock) -> (result, chars, onset)."""
        return await self.feed_session(held.session, delta)

    async def feed_session(self, session, delta: str) -> tuple:
        """Feed `delta` to a stream nobody else feeds meanwhile: cleaned and tokenized off the
        feeder, then batched with other streams' feeds -> (result, chars, onset)."""
        prepared = await self.prepare(self.guard.prepare_feed, session, delta, param="delta")
        lane = self.bulk_feeder if prepared.new_tokens > BULK_FEED_TOKENS else self.feeder
        [answer] = unwrap(await lane.submit([(session, prepared)]))
        return answer


class LocalStreams:
    """Stream sessions held in this process: a feed holds its session's lock from before it
    is queued until its answer is in hand, so it answers the session's whole text or 404s."""

    def __init__(self, service: ContentService):
        self.service, self.sessions = service, service.sessions

    def count(self) -> int:
        return len(self.sessions)

    def owns(self, session_id: str) -> bool:
        return self.sessions.peek(session_id) is not None

    def check_known(self, session_id: str) -> None:
        """A feed to an unknown session is refused before its body is read."""
        self.held(session_id)

    def held(self, session_id: str):
        try:
            return self.sessions.get(session_id)
        except UnknownSessionError:
            raise unknown_session(session_id) from None

    async def open(self, threshold: float) -> str:
        try:
            return self.sessions.create(threshold).id
        except SessionLimitError as e:
            raise ApiError(429, str(e), code="too_many_sessions") from None

    async def feed(self, session_id: str, delta: str) -> tuple:
        held = self.held(session_id)
        async with held.lock:           # ordered with deletes, expiry and this session's other feeds
            if held.closed:
                raise unknown_session(held.id, "closed while this request waited")
            try:
                return await self.service.feed_held(held, delta)
            finally:
                self.sessions.touch(held)

    async def read(self, session_id: str) -> tuple:
        held = self.held(session_id)
        async with held.lock:
            if held.closed:
                raise unknown_session(held.id, "closed while this request waited")
            session = held.session
            return session.score, session.chars, session.onset, session.threshold

    async def delete(self, session_id: str) -> None:
        held = self.held(session_id)
        async with held.lock:           # a feed in flight answers first
            if held.closed:
                raise unknown_session(held.id, "closed while this request waited")
            with contextlib.suppress(UnknownSessionError):
                self.sessions.delete(held.id)


def unknown_session(session_id: str, why: str = "closed, expired or never opened",
                    what: str = "stream session") -> ApiError:
    return ApiError(404, f"no {what} {session_id!r} ({why})", param="id", code="unknown_session")


__all__ = ["GuardService", "ContentService", "LocalStreams", "unknown_session", "BULK_FEED_TOKENS"]

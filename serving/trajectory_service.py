"""A served AgentSirenGuard: trajectories scored in dynamic batches, and per-run sessions whose
appends step together in one engine call, each running only the ids the append added."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

from siren_runtime.result import ScoreResult

from .api import ApiError
from .http import unwrap
from .metrics import ServerMetrics
from .service import BULK_FEED_TOKENS, GuardService, unknown_session
from .sessions import SessionLimitError, SessionRegistry, UnknownSessionError
from .settings import ServeConfig

SESSION_PATH = "/v1/trajectories/sessions"


@dataclass(frozen=True)
class RunState:
    """A session's verdict as one append (or read) left it, taken under the session's lock."""
    id: str
    result: Optional[ScoreResult]
    threshold: float
    messages: int
    tokens: int

    @classmethod
    def of(cls, held) -> "RunState":
        session = held.session
        result = session.result
        return cls(held.id, result, result.threshold if result else session.threshold, len(session.messages),
                   session.tokens)


class TrajectoryService(GuardService):
    kind = "trajectory"

    def __init__(self, guard, config: ServeConfig, name: str, metrics: Optional[ServerMetrics] = None):
        super().__init__(guard, config, name, metrics)
        self.sessions = SessionRegistry(
            guard, config.max_sessions, config.session_ttl_s,
            opener=lambda threshold, tools=None: guard.session(tools=tools, threshold=threshold),
            prefix="traj-", what="trajectory sessions", close_hint=f"DELETE {SESSION_PATH}/{{id}}")
        self.scorer = self.batcher(self._scored, "trajectory")
        # as text streams: an append that runs many ids (a first long run) takes its own lane
        self.appender, self.bulk_appender = (
            self.batcher(self._append, "trajectory_append", conflict_key=lambda item: id(item.session),
                         isolate=False) for _ in range(2))

    def _append(self, items: list) -> list:
        """One engine call for many runs' appends. If it fails part-way, the appends already
        committed answer their verdicts and only the others get the error (their sessions
        untouched): a client's retry never appends a turn twice."""
        try:
            return self.guard.feed_prepared(items)
        except Exception as error:     # noqa: BLE001 - each append gets its own outcome
            return [p.session.result if p.session._held is not p.base else error for p in items]

    # -- scoring ------------------------------------------------------------------------
    async def scores(self, trajectories: list) -> tuple[list, list]:
        """Scores of `Trajectory` objects -> (scores, token counts); rendering and
        tokenizing happen off the event loop, and a template refusal is a 400."""
        id_lists = await self.prepare(lambda runs: [self.guard.token_ids(t) for t in runs], trajectories)
        out = unwrap(await self.scorer.submit(id_lists))
        return [s for s, _ in out], [n for _, n in out]

    # -- sessions -----------------------------------------------------------------------
    def held(self, session_id: str):
        try:
            return self.sessions.get(session_id)
        except UnknownSessionError:
            raise unknown_session(session_id, what="trajectory session") from None

    def open(self, threshold: Optional[float], tools: Optional[list], session_id: Optional[str] = None,
             evict: bool = False):
        try:
            return self.sessions.create(threshold, session_id=session_id, evict=evict, tools=tools)
        except SessionLimitError as e:
            raise ApiError(429, str(e), code="too_many_sessions") from None
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"input refused: {e}", param="tools", code="invalid_input") from None

    async def append_held(self, held, messages: list):
        """Append `messages` to a held session (the caller holds its lock)."""
        try:
            return await self.append_to(held.session, messages)
        finally:
            self.sessions.touch(held)

    async def append_to(self, session, messages: list):
        """Append to a session nobody else appends to meanwhile: checked, rendered and
        tokenized off the event loop, then stepped with other sessions' appends. A refused
        append changes nothing."""
        prepared = await self.prepare(self.guard.prepare_append, session, messages, param="messages")
        lane = self.bulk_appender if prepared.new_tokens > BULK_FEED_TOKENS else self.appender
        [result] = unwrap(await lane.submit([prepared]))
        return result

    async def append(self, session_id: str, messages: list) -> "RunState":
        held = self.held(session_id)
        async with held.lock:           # ordered with deletes, expiry and this run's other appends
            if held.closed:
                raise unknown_session(held.id, "closed while this request waited", what="trajectory session")
            await self.append_held(held, messages)
            return RunState.of(held)

    async def read(self, session_id: str) -> "RunState":
        held = self.held(session_id)
        async with held.lock:
            if held.closed:
                raise unknown_session(held.id, "closed while this request waited", what="trajectory session")
            return RunState.of(held)

    async def delete(self, session_id: str) -> None:
        held = self.held(session_id)
        async with held.lock:           # an append in flight answers first
            if held.closed:
                raise unknown_session(held.id, "closed while this request waited", what="trajectory session")
            with contextlib.suppress(UnknownSessionError):
                self.sessions.delete(held.id)


__all__ = ["TrajectoryService", "SESSION_PATH"]

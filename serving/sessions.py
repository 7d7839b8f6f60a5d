"""Stream sessions held by the server on behalf of HTTP clients.

Each session is a runtime ``StreamSession`` (its KV cache lives with the guard's step
runner). The registry is bounded in count and closes sessions idle longer than the TTL, so
abandoned streams cannot hold memory forever.

Ordering: a feed holds its session's lock from before it is queued until its answer is in
hand, and a session is closed (by DELETE, the TTL or shutdown) only under that lock, or by
the sweep only while nobody holds it. So a feed either runs on the session it was sent to
and answers that session's whole text, or finds the session closed (404): never a score
of a session reset under it. A session being fed is never idle.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional


class SessionLimitError(RuntimeError):
    """Too many open sessions (HTTP 429)."""


class UnknownSessionError(KeyError):
    """No such session, or it expired (HTTP 404)."""


@dataclass
class HeldSession:
    id: str
    session: object                      # siren_runtime.streaming.StreamSession
    created: float
    last_used: float = field(default=0.0)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)   # held by a feed, a delete, a read
    closed: bool = False
    version: Optional[int] = None        # a replica's copy of a shared stream: the store version it holds


def new_session_id(prefix: str = "strm-") -> str:
    return prefix + secrets.token_hex(12)


class SessionRegistry:
    """Open sessions of one guard, bounded in count and idle time. opener(threshold, **options)
    makes a session (default: a text stream of `guard`); prefix: how its ids start."""

    def __init__(self, guard, max_sessions: int = 1024, ttl_s: float = 300.0, clock=time.monotonic,
                 opener=None, prefix: str = "strm-", what: str = "stream sessions",
                 close_hint: str = "DELETE /v1/streams/{id}"):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if not ttl_s > 0:
            raise ValueError(f"session TTL must be positive, got {ttl_s}")
        self._guard = guard
        self._open = opener or (lambda threshold: guard.stream(threshold=threshold, keep_text=False))
        self._prefix, self._what, self._close_hint = prefix, what, close_hint
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        self._held: dict[str, HeldSession] = {}
        self._lock = threading.Lock()
        self.expired = 0

    def __len__(self) -> int:
        return len(self._held)

    def create(self, threshold: Optional[float], session_id: Optional[str] = None,
               evict: bool = False, **options) -> HeldSession:
        """A new session (a fresh id unless `session_id`); at the limit, SessionLimitError, or
        with `evict` the least recently used idle session makes room (a cache of shared streams)."""
        with self._lock:
            self._sweep_locked()
            if len(self._held) >= self.max_sessions and evict:
                idle = [h for h in self._held.values() if not h.lock.locked()]
                if idle:
                    self._drop_locked(min(idle, key=lambda h: h.last_used).id)
            if len(self._held) >= self.max_sessions:
                raise SessionLimitError(f"{len(self._held)} {self._what} are open (the limit); "
                                        f"close finished ones with {self._close_hint}")
            now = self._clock()
            held = HeldSession(id=session_id or new_session_id(self._prefix),
                               session=self._open(threshold, **options), created=now, last_used=now)
            self._held[held.id] = held
            return held

    def adopt(self, session_id: str, session) -> Optional[HeldSession]:
        """Keep `session` (made and advanced outside the registry) under `session_id`, making
        room by evicting the least recently used idle session; None when there is no room (the
        caller's answer stands, the session is not kept). If another request adopted one under
        this id meanwhile, that one stays and `session` is freed."""
        with self._lock:
            self._sweep_locked()
            if session_id in self._held:
                session.reset()
                return self._held[session_id]
            if len(self._held) >= self.max_sessions:
                idle = [h for h in self._held.values() if not h.lock.locked()]
                if not idle:
                    session.reset()
                    return None
                self._drop_locked(min(idle, key=lambda h: h.last_used).id)
            now = self._clock()
            held = HeldSession(id=session_id, session=session, created=now, last_used=now)
            self._held[session_id] = held
            return held

    def get(self, session_id: str) -> HeldSession:
        with self._lock:
            held = self._held.get(session_id)
            if held is None or self._stale(held, self._clock()):
                if held is not None:
                    self._drop_locked(session_id)
                    self.expired += 1
                raise UnknownSessionError(session_id)
            held.last_used = self._clock()
            return held

    def touch(self, held: HeldSession) -> None:
        """A feed on `held` finished: its idle time starts now."""
        held.last_used = self._clock()

    def _stale(self, held: HeldSession, now: float) -> bool:
        return now - held.last_used > self.ttl_s and not held.lock.locked()

    def peek(self, session_id: str) -> Optional[HeldSession]:
        """The session if this registry holds it (no expiry check, no touch)."""
        with self._lock:
            return self._held.get(session_id)

    def delete(self, session_id: str) -> None:
        """Close a session; call it holding the session's lock (no feed is running on it)."""
        with self._lock:
            if session_id not in self._held:
                raise UnknownSessionError(session_id)
            self._drop_locked(session_id)

    def sweep(self) -> int:
        """Close sessions idle past the TTL; returns how many."""
        with self._lock:
            return self._sweep_locked()

    def clear(self) -> None:
        with self._lock:
            for session_id in list(self._held):
                self._drop_locked(session_id)

    def _sweep_locked(self) -> int:
        now = self._clock()
        stale = [k for k, h in self._held.items() if self._stale(h, now)]
        for session_id in stale:
            self._drop_locked(session_id)
        self.expired += len(stale)
        return len(stale)

    def _drop_locked(self, session_id: str) -> None:
        held = self._held.pop(session_id)
        held.closed = True
        held.session.reset()      # frees its KV state now, not at garbage collection

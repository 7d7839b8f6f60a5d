"""Ray Serve: `siren serve`'s HTTP API (moderations, classify, streams, the detector API,
/health, /metrics) on replicated guards, one guard per replica.

Each replica runs the very app `siren serve` runs (``create_app``), so requests batch in
the replica's dynamic batcher under the runner's limits, exactly as in one process. Ray
Serve adds replicas, autoscaling and the HTTP proxy in front.

Streams survive any routing. A stream's text lives in one small shared deployment (the
``StreamStore``); a replica keeps its own session for each stream it has fed, tagged with
the store version it holds. A feed reads the version: if the replica's copy is current it
steps only the new tokens; if not (the last feed went to another replica, or this one
evicted it), it rebuilds the session from the stored text, which a SIREN stream state is a
deterministic function of, then feeds. The feed commits to the store only if nobody
committed in between (a version check); a lost race is redone on the new text. So routing
is an optimization here, never a condition of a correct score.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from ray import serve

from siren_runtime.loading import load_guard
from siren_runtime.result import ScoreResult
from siren_serving.api import ApiError
from siren_serving.server import create_app
from siren_serving.service import unknown_session
from siren_serving.sessions import new_session_id
from siren_serving.settings import ServeConfig

from .settings import PROXY_OPTIONS

#: the Serve application and deployment names (one fact: the CLI and tests use them)
APP_NAME = "siren"
GUARD_DEPLOYMENT = "SirenGuard"
STORE_DEPLOYMENT = "SirenStreamStore"
#: the response header that names the replica which answered (clients may log it)
REPLICA_HEADER = "x-siren-replica"
#: a feed that keeps losing the race to feeds of the same stream elsewhere gives up (409)
MAX_FEED_ATTEMPTS = 16


@serve.deployment(name=STORE_DEPLOYMENT, num_replicas=1, max_ongoing_requests=4096,
                  ray_actor_options={"num_cpus": 0})
class StreamStore:
    """The text and last answer of every open stream, shared by all guard replicas. Its
    methods never await, so each runs whole before the next: a commit is atomic."""

    def __init__(self, max_sessions: int = 1024, ttl_s: float = 300.0):
        self.max_sessions, self.ttl_s = max_sessions, ttl_s
        self._streams: dict[str, dict] = {}

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._streams.items() if now - s["used"] > self.ttl_s]:
            del self._streams[key]

    def _get(self, session_id: str) -> Optional[dict]:
        self._sweep()
        stream = self._streams.get(session_id)
        if stream is not None:
            stream["used"] = time.monotonic()
        return stream

    async def open(self, threshold: float) -> Optional[str]:
        """A new stream's id; None at the session limit."""
        self._sweep()
        if len(self._streams) >= self.max_sessions:
            return None
        session_id = new_session_id()
        self._streams[session_id] = {"text": "", "version": 0, "threshold": threshold, "score": None,
                                     "onset": None, "used": time.monotonic()}
        return session_id

    async def read(self, session_id: str, held_version: Optional[int] = -1) -> Optional[dict]:
        """The stream's state; its text only when the caller's copy is not this version."""
        stream = self._get(session_id)
        if stream is None:
            return None
        view = {k: stream[k] for k in ("version", "threshold", "score", "onset")}
        view["chars"] = len(stream["text"])
        view["text"] = stream["text"] if held_version != stream["version"] else None
        return view

    async def commit(self, session_id: str, version: int, delta: str, score: float,
                     onset: Optional[int]) -> Optional[int]:
        """Append `delta` if the stream is still at `version`: the new version, -1 when
        another feed committed first, None when the stream is gone."""
        stream = self._get(session_id)
        if stream is None:
            return None
        if stream["version"] != version:
            return -1
        stream["text"] += delta
        stream["version"] += 1
        stream["score"] = score
        if stream["onset"] is None:
            stream["onset"] = onset
        return stream["version"]

    async def delete(self, session_id: str) -> bool:
        return self._streams.pop(session_id, None) is not None

    async def count(self) -> int:
        self._sweep()
        return len(self._streams)


class SharedStreams:
    """The stream routes' backend on a replica: sessions cached here, the text in the store."""

    def __init__(self, service, store):
        self.service, self.store, self.sessions = service, store, service.sessions

    def count(self) -> int:
        return len(self.sessions)          # this replica's cached sessions

    def check_known(self, session_id: str) -> None:
        """Known or not is the store's to say, after the body is read."""

    async def open(self, threshold: float) -> str:
        session_id = await self.store.open.remote(threshold)
        if session_id is None:
            raise ApiError(429, f"{self.sessions.max_sessions} stream sessions are open (the limit); close finished "
                                "ones with DELETE /v1/streams/{id}", code="too_many_sessions")
        return session_id

    def _cached(self, session_id: str, threshold: float):
        held = self.sessions.peek(session_id)
        if held is None or held.closed:
            held = self.sessions.create(threshold, session_id=session_id, evict=True)
        return held

    async def feed(self, session_id: str, delta: str) -> tuple:
        for _ in range(MAX_FEED_ATTEMPTS):
            held = self.sessions.peek(session_id)
            state = await self.store.read.remote(session_id, held.version if held is not None else None)
            if state is None:
                self._forget(session_id)
                raise unknown_session(session_id)
            held = self._cached(session_id, state["threshold"])
            async with held.lock:
                if held.closed:              # evicted while this feed waited: start over
                    continue
                if held.version != state["version"] and state["text"] is None:
                    continue                 # our copy moved since the read: read again
                try:
                    if held.version != state["version"]:
                        await self._rebuild(held, state["text"], state["version"])
                    result, chars, onset = await self.service.feed_held(held, delta)
                    held.version = None      # ahead of the store until the commit lands
                    stored = state["onset"] if state["onset"] is not None else onset
                    version = await self.store.commit.remote(session_id, state["version"], delta, result.score,
                                                             stored)
                finally:
                    self.sessions.touch(held)
                if version is None:
                    self._forget(session_id)
                    raise unknown_session(session_id, "closed while this request waited")
                if version >= 0:
                    held.version = version
                    return result, chars, stored
        raise ApiError(409, f"stream {session_id!r} is being fed elsewhere at the same time; retry the feed",
                       param="id", code="stream_conflict")

    async def _rebuild(self, held, text: str, version: int) -> None:
        """This replica's copy is not the store's version: start over from the stored text."""
        held.version = None
        held.session.reset()
        if text:
            await self.service.feed_held(held, text)
        held.version = version

    def _forget(self, session_id: str) -> None:
        held = self.sessions.peek(session_id)
        if held is not None and not held.lock.locked():
            try:
                self.sessions.delete(session_id)
            except KeyError:
                pass

    async def read(self, session_id: str) -> tuple:
        state = await self.store.read.remote(session_id, None)
        if state is None:
            raise unknown_session(session_id)
        threshold, score = state["threshold"], state["score"]
        result = None if score is None else ScoreResult(score=score, is_harmful=bool(score >= threshold),
                                                         threshold=threshold)
        return result, state["chars"], state["onset"], threshold

    async def delete(self, session_id: str) -> None:
        if not await self.store.delete.remote(session_id):
            raise unknown_session(session_id)
        self._forget(session_id)


class ReplicaHeader:
    """ASGI middleware: every HTTP answer names the replica that computed it."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + [(REPLICA_HEADER.encode(),
                                                                                     self.replica)])
            await send(message)
        return await self.app(scope, receive, send_named)


@serve.deployment(name=GUARD_DEPLOYMENT, max_ongoing_requests=256)
@serve.ingress()
class GuardReplica:
    """One guard and `siren serve`'s app over it."""

    def __init__(self, store, config: dict, guard_options: Optional[dict] = None):
        self.config = ServeConfig(**config)
        self.config.check_all()
        guards = []
        try:
            for bundle in self.config.bundles:
                guards.append(load_guard(bundle, **{**self.config.guard_options(), **(guard_options or {})}))
            if sum(g.bundle.guard.kind == "content" for g in guards) > 1:
                raise ValueError("serve-ray shares text streams across replicas for one content guard: serve one "
                                 "content bundle (with any trajectory bundles), or one app per content guard")
            self.siren_app = create_app(guards, self.config, streams=lambda service: SharedStreams(service, store))
        except BaseException:
            for guard in guards:
                guard.close()
            raise
        replica = serve.get_replica_context().replica_id.unique_id
        self.siren_app.add_middleware(ReplicaHeader, replica=replica)

    def __serve_build_asgi_app__(self):
        return self.siren_app


def build_app(args: dict) -> Any:
    """The application, from a dict of options: what `siren serve-ray` deploys and what a
    Serve config file names (``import_path: siren_ray.serve_app:build_app``, ``args:``).

    bundle (required), replicas (default 1) or min_replicas/max_replicas (autoscaling, with
    target_ongoing_requests), cpus_per_replica (default 1), gpus_per_replica (default 0),
    intra_op_threads, guard_options (more ``from_pretrained`` options, e.g. {"spinning": false}),
    and any `siren serve` option by its ServeConfig name (threshold, max_batch, max_wait_ms,
    max_sessions, session_ttl_s, model_name, device, backend, graceful_timeout_s (Serve's
    graceful shutdown), ...) except host, port and drain_s (Serve's proxy and the CLI's)."""
    args = dict(args)
    if not args.get("bundle"):
        raise ValueError("build_app needs args['bundle'] (a bundle folder or Hub repo id)")
    replicas = args.pop("replicas", None)
    low, high = args.pop("min_replicas", None), args.pop("max_replicas", None)
    target = args.pop("target_ongoing_requests", None)
    cpus = float(args.pop("cpus_per_replica", 1))
    gpus = float(args.pop("gpus_per_replica", 0))
    threads = args.pop("intra_op_threads", None)
    guard_options = dict(args.pop("guard_options", None) or {})
    if threads is not None:
        guard_options["intra_op_threads"] = int(threads)
    fields = set(ServeConfig.__dataclass_fields__) - set(PROXY_OPTIONS)
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) for the Ray Serve app: {', '.join(unknown)} (host and port are "
                         "Serve's http_options)")
    config = ServeConfig(**args)
    config.check_all()
    options: dict = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
                     "graceful_shutdown_timeout_s": float(config.graceful_timeout_s)}
    if low is not None or high is not None:
        if replicas is not None:
            raise ValueError("give replicas, or min_replicas/max_replicas (autoscaling), not both")
        low, high = int(low if low is not None else 1), int(high if high is not None else max(1, int(low or 1)))
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscaling needs 0 <= min_replicas <= max_replicas, max >= 1; got {low}..{high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": float(target or 2 * config.max_batch)}
    else:
        replicas = int(replicas if replicas is not None else 1)
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        options["num_replicas"] = replicas
    store = StreamStore.bind(config.max_sessions, config.session_ttl_s)
    fields_given = {k: getattr(config, k) for k in fields}
    return GuardReplica.options(**options).bind(store, fields_given, guard_options)

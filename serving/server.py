"""`siren serve`: a bundle behind the HTTP APIs guard users already call.

    POST /v1/moderations     OpenAI's moderation API (one category, `harmful`)
    POST /classify           vLLM's classification API
    POST /v1/streams         open a stream session -> {"id"}
    POST /v1/streams/{id}    feed {"delta"} -> the score of the whole text so far
    GET/DELETE /v1/streams/{id}
    GET /health, GET /metrics (Prometheus)

Concurrent requests are batched dynamically into one `score_batch`-style engine call and
concurrent stream feeds into one `feed_batch` call. Torch-free: Starlette + uvicorn +
prometheus_client (the `serve` extra) over `siren_runtime`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import socket
import time
from pathlib import Path
from typing import Optional

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from siren_runtime import package_version
from siren_runtime.text import join_prompt_response
from siren_runtime.validation import check_encodable

from .api import (ApiError, classify_response, moderation_response, parse_delta, parse_inputs, parse_model,
                  parse_threshold, require_object, stream_response)
from .batcher import BatcherClosed, DynamicBatcher
from .score_memo import ScoreMemo
from .detectors import (content_detections, detector_error_body, generation_detections, parse_contents,
                        parse_generation, parse_params, require_detector_id)
from .metrics import ServerMetrics
from .openapi import openapi_document
from .sessions import SessionLimitError, SessionRegistry, UnknownSessionError
from .settings import ServeConfig, option_name  # noqa: F401 (ServeConfig re-exported)

log = logging.getLogger("siren_serving.server")


#: a feed running more new tokens than this takes the bulk lane (its own engine calls)
BULK_FEED_TOKENS = 64

#: the most of an oversized request body read (and dropped, never kept) to answer its 413
#: cleanly: clients such as urllib send the whole body before they read an answer, and a
#: server that closes on unread bytes makes the kernel reset the connection, so the client
#: sees "connection reset" instead of the 413. Past these bounds the reset is unavoidable.
DRAIN_LIMIT = 1 << 30
DRAIN_SECONDS = 30.0


class _Answered(Exception):
    """An ApiError already shaped as its API's error body (the detector API's)."""

    def __init__(self, response, error):
        super().__init__(error.message)
        self.response, self.error = response, error


class ClientGone(Exception):
    """The client disconnected before its request body arrived: nobody to answer."""


class _Service:
    """What the routes share: the guard, its batchers, the sessions and the metrics."""

    def __init__(self, guard, config: ServeConfig, model_name: str, streams=None):
        self.guard = guard
        self.config = config
        self.model = model_name
        self.threshold = config.threshold if config.threshold is not None else guard.default_threshold
        self.metrics = ServerMetrics()
        self.sessions = SessionRegistry(guard, config.max_sessions, config.session_ttl_s)
        batching = dict(max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000.0,
                        enabled=config.dynamic_batching)
        #: where scores can move with their batch (GPU, int8), one remembered number per text
        self.decided = None if getattr(guard, "batch_invariant", False) else ScoreMemo()
        self.scorer = DynamicBatcher(self._score_texts, observe=self.metrics.batch_size.labels("score").observe,
                                     name="siren-score", **batching)
        # two lanes: feeds that run many new tokens (a first long delta) get their own engine
        # calls, so a few-token feed on another stream never waits for one in the queue
        self.feeder, self.bulk_feeder = (
            DynamicBatcher(self._feed, conflict_key=lambda item: item[0].id, isolate=False,
                           observe=self.metrics.batch_size.labels("stream").observe, name=name, **batching)
            for name in ("siren-stream", "siren-stream-bulk"))
        self._preparers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="siren-prepare")
        self.closing = False            # the lifespan is ending: every request is refused
        self.draining = False           # SIGTERM seen: /health says 503, requests are still served
        self._sweeper: Optional[asyncio.Task] = None
        self.streams = (streams or LocalStreams)(self)
        self.started = int(time.time())

    # -- blocking work, on the batchers' threads ----------------------------------------
    def _score_texts(self, texts: list) -> list:
        ids = [self.guard.token_ids(t) for t in texts]
        if self.decided is None:        # batch-invariant: a text's number is the same in any batch
            scores = self.guard.score_token_ids(ids)
        else:
            scores = self.decided.scores(ids, self.guard.score_token_ids)
        return [(float(s), len(i)) for s, i in zip(scores, ids)]

    def _feed(self, items: list) -> list:
        """Engine calls only: each feed was cleaned and tokenized on its request's thread."""
        results = self.guard.feed_prepared([prepared for _, prepared in items])
        return [(result, held.session.chars, held.session.onset) for (held, _), result in zip(items, results)]

    async def feed_held(self, held, delta: str) -> tuple:
        """Feed `delta` to a held session (the caller holds its lock): cleaned and tokenized
        off the feeder, then batched with other streams' feeds -> (result, chars, onset)."""
        prepared = await self.prepare_feed(held, delta)
        lane = self.bulk_feeder if prepared.new_tokens > BULK_FEED_TOKENS else self.feeder
        [answer] = self.unwrap(await lane.submit([(held, prepared)]))
        return answer

    async def prepare_feed(self, held, delta: str):
        """Clean and tokenize a delta off the feeder (a 1 MB delta must not hold up the
        engine calls of other streams); the caller holds the session's lock."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._preparers, self.guard.prepare_feed, held.session, delta)
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"input refused: {e}", param="delta", code="invalid_input") from None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self.scorer.start()
        await self.feeder.start()
        await self.bulk_feeder.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.scorer.stop()
        await self.feeder.stop()
        await self.bulk_feeder.stop()
        self._preparers.shutdown(wait=True)
        self.sessions.clear()
        self.guard.close()

    async def _sweep_forever(self) -> None:
        period = max(1.0, min(60.0, self.config.session_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            closed = self.sessions.sweep()
            if closed:
                self.metrics.sessions_expired.inc(closed)
            self.metrics.sessions.set(self.streams.count())

    # -- helpers for the routes ---------------------------------------------------------
    async def read_json(self, request: Request, allow_empty: bool = False) -> dict:
        """The body as a JSON object. An oversized one is read to its end and dropped (up to
        DRAIN_LIMIT bytes and DRAIN_SECONDS) before the 413, so clients that send the whole
        body before reading the answer see the 413 rather than a reset connection; nothing
        past the limit is kept. allow_empty: no body at all means {}."""
        limit = self.config.max_body_bytes
        drain = max(limit, DRAIN_LIMIT)
        declared = request.headers.get("content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and declared > drain:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                           code="body_too_large")
        body, seen, deadline = bytearray(), 0, None
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen <= limit:
                    body += chunk
                    continue
                body = bytearray()                  # over the limit: keep nothing, read on
                deadline = deadline or time.monotonic() + DRAIN_SECONDS
                if seen > drain or time.monotonic() > deadline:
                    break
        except ClientDisconnect:
            raise ClientGone() from None
        if seen > limit:
            raise ApiError(413, f"request body of {seen if seen <= drain else 'over ' + str(drain)} bytes "
                                f"exceeds the limit of {limit}", code="body_too_large")
        if allow_empty and not body.strip():
            return {}
        try:
            return require_object(json.loads(bytes(body)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="malformed_json") from None
        except ValueError as e:      # an integer literal past Python's int-string limit (4300 digits)
            raise ApiError(400, f"the request body holds a number this server does not read: {e}",
                           code="malformed_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", code="malformed_json") from None

    @staticmethod
    def unwrap(results: list) -> list:
        """Batch results -> values; an item's own failure becomes its request's error."""
        for result in results:
            if isinstance(result, (ValueError, TypeError)):
                raise ApiError(400, f"input refused: {result}", code="invalid_input")
            if isinstance(result, Exception):
                raise result
        return results

    async def scores(self, texts: list) -> tuple[list, list]:
        out = self.unwrap(await self.scorer.submit(texts))
        return [s for s, _ in out], [n for _, n in out]


class LocalStreams:
    """Stream sessions held in this process: a feed holds its session's lock from before it
    is queued until its answer is in hand, so it answers the session's whole text or 404s."""

    def __init__(self, service: _Service):
        self.service, self.sessions = service, service.sessions

    def count(self) -> int:
        return len(self.sessions)

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


def unknown_session(session_id: str, why: str = "closed, expired or never opened") -> ApiError:
    return ApiError(404, f"no stream session {session_id!r} ({why})", param="id", code="unknown_session")


def _check_encodable(texts: list, param: str) -> None:
    """Every item of a list field is text the tokenizer takes (named `param[i]`)."""
    for i, text in enumerate(texts):
        _check_field(text, f"{param}[{i}]")


def _check_field(text: str, name: str) -> None:
    """One field is text the tokenizer takes: no lone surrogate (a 400 naming it)."""
    try:
        check_encodable(text, name)
    except ValueError as e:
        raise ApiError(400, str(e), param=name) from None


def create_app(guard, config: Optional[ServeConfig] = None, model_name: Optional[str] = None,
               streams=None) -> Starlette:
    """The ASGI app over an open guard (the app closes it on shutdown). streams: where the
    stream sessions live, a factory of the service (default: this process, LocalStreams)."""
    config = config or ServeConfig()
    config.check()
    name = model_name or config.model_name or (Path(config.bundle).name if config.bundle else "siren-guard")
    service = _Service(guard, config, name, streams or LocalStreams)

    def endpoint(label: str):
        def wrap(handler):
            async def route(request: Request) -> Response:
                started = time.perf_counter()
                try:
                    if service.closing:
                        raise ApiError(503, "the server is shutting down", kind="server_error")
                    response = await handler(request)
                except ApiError as e:
                    service.metrics.errors.labels("client" if e.status < 500 else "unavailable").inc()
                    response = JSONResponse(e.body(), status_code=e.status)
                except _Answered as answered:    # an error already in its API's own shape
                    service.metrics.errors.labels("client" if answered.error.status < 500 else "unavailable").inc()
                    response = answered.response
                except BatcherClosed as e:    # queued behind shutdown: unavailable, not a bug
                    service.metrics.errors.labels("unavailable").inc()
                    response = JSONResponse(ApiError(503, str(e), kind="server_error").body(), status_code=503)
                except ClientGone:     # not a server error: counted as nginx's 499, no traceback
                    service.metrics.errors.labels("client_disconnected").inc()
                    response = Response(status_code=499)
                except Exception as e:   # a bug or an engine failure: logged, the server keeps serving
                    log.exception("siren serve: %s failed", label)
                    service.metrics.errors.labels("server").inc()
                    response = JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                                     kind="server_error").body(), status_code=500)
                service.metrics.requests.labels(label, str(response.status_code)).inc()
                service.metrics.latency.labels(label).observe(time.perf_counter() - started)
                return response
            return route
        return wrap

    async def score_request(request: Request) -> tuple:
        """The part /v1/moderations and /classify share: parse, score, count verdicts."""
        body = await service.read_json(request)
        texts = parse_inputs(body, config.max_inputs)
        threshold = parse_threshold(body, service.threshold)
        model = parse_model(body, service.model)
        _check_encodable(texts, "input")
        scores, tokens = await service.scores(texts)
        service.metrics.observe_verdicts(scores, [s >= threshold for s in scores])
        return model, scores, threshold, tokens

    @endpoint("moderations")
    async def moderations(request: Request) -> Response:
        model, scores, threshold, _ = await score_request(request)
        return JSONResponse(moderation_response(model, scores, threshold))

    @endpoint("classify")
    async def classify(request: Request) -> Response:
        return JSONResponse(classify_response(*await score_request(request)))

    @endpoint("streams")
    async def open_stream(request: Request) -> Response:
        body = await service.read_json(request, allow_empty=True)
        threshold = parse_threshold(body, service.threshold)
        session_id = await service.streams.open(threshold)
        service.metrics.sessions.set(service.streams.count())
        return JSONResponse({"id": session_id, "threshold": threshold, "ttl_s": config.session_ttl_s,
                             "incremental": guard.incremental_streaming}, status_code=201)

    @endpoint("stream_feed")
    async def feed_stream(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        service.streams.check_known(session_id)
        delta = parse_delta(await service.read_json(request))
        _check_field(delta, "delta")
        result, chars, onset = await service.streams.feed(session_id, delta)
        service.metrics.observe_verdicts([result.score], [result.is_harmful])
        return JSONResponse(stream_response(session_id, result, chars, onset))

    @endpoint("stream_get")
    async def get_stream(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        result, chars, onset, threshold = await service.streams.read(session_id)
        return JSONResponse(stream_response(session_id, result, chars, onset, threshold))

    @endpoint("stream_delete")
    async def delete_stream(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        await service.streams.delete(session_id)
        service.metrics.sessions.set(service.streams.count())
        return JSONResponse({"id": session_id, "deleted": True})

    def detector_endpoint(label: str):
        """endpoint(), with errors in the detector API's {"code", "message"} shape."""
        def wrap(handler):
            async def shaped(request: Request) -> Response:
                try:
                    return await handler(request)
                except ApiError as e:
                    body, status = detector_error_body(e)
                    raise _Answered(JSONResponse(body, status_code=status), e) from None
            return endpoint(label)(shaped)
        return wrap

    async def prefix_scores(texts: list) -> list:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(service._preparers, guard.score_prefixes_batch, texts)
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"input refused: {e}", code="invalid_input") from None

    @detector_endpoint("detector_contents")
    async def detect_contents(request: Request) -> Response:
        require_detector_id(request.headers)
        body = await service.read_json(request)
        contents = parse_contents(body, config.max_inputs)
        threshold, sustain = parse_params(body, service.threshold)
        _check_encodable(contents, "contents")
        if not guard.prefix_scores_available:
            raise ApiError(501, "this bundle has no prefix head or streaming step graph (re-export it with "
                                "`siren export`): detection spans need them", kind="server_error")
        # the verdict from the scoring graph (exactly /v1/moderations'), the span from the prefixes
        scores, _ = await service.scores(contents)
        flagged = [i for i, score in enumerate(scores) if score >= threshold]
        prefixes = dict(zip(flagged, await prefix_scores([contents[i] for i in flagged]))) if flagged else {}
        service.metrics.observe_verdicts(scores, [s >= threshold for s in scores])
        return JSONResponse([content_detections(score, prefixes.get(i), text, threshold, sustain)
                             for i, (score, text) in enumerate(zip(scores, contents))])

    @detector_endpoint("detector_generation")
    async def detect_generation(request: Request) -> Response:
        require_detector_id(request.headers)
        body = await service.read_json(request)
        prompt, generated = parse_generation(body)
        threshold, _ = parse_params(body, service.threshold)
        _check_field(prompt, "prompt")
        _check_field(generated, "generated_text")
        [score], _ = await service.scores([join_prompt_response(prompt, generated)])
        service.metrics.observe_verdicts([score], [score >= threshold])
        return JSONResponse(generation_detections(score, threshold))

    def model_card(name: str) -> dict:
        """A guard as OpenAI's model object describes one (plus its kind)."""
        return {"id": name, "object": "model", "created": service.started, "owned_by": "siren-deploy",
                "kind": guard.bundle.guard.kind}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(service.model)]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name != service.model:
            error = ApiError(404, f"no model {name!r} here; this server holds {service.model!r}", param="model",
                             code="model_not_found")
            return JSONResponse(error.body(), status_code=404)
        return JSONResponse(model_card(name))

    async def info(request: Request) -> Response:
        bundle = guard.bundle
        return JSONResponse({
            "model": service.model, "kind": bundle.guard.kind, "backend": guard.backend, "device": guard.device,
            "dtype": bundle.model.dtype, "quantization": (bundle.manifest.get("quantization") or {}).get("scheme"),
            "base_model": (bundle.manifest.get("backbone") or {}).get("model_id"),
            "threshold": service.threshold, "incremental_streaming": guard.incremental_streaming,
            "prefix_scores": bool(getattr(guard, "prefix_scores_available", False)),
            "batch_invariant": bool(getattr(guard, "batch_invariant", False)),
            "limits": {**guard.limits, "max_inputs": config.max_inputs, "max_body_bytes": config.max_body_bytes,
                       "max_sessions": config.max_sessions, "session_ttl_s": config.session_ttl_s,
                       "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                       "dynamic_batching": config.dynamic_batching},
            "version": package_version()})

    async def version(request: Request) -> Response:
        return JSONResponse({"name": "siren-deploy", "version": package_version()})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(package_version()))

    async def health(request: Request) -> Response:
        stopping = service.closing or service.draining
        return JSONResponse({"status": "shutting_down" if stopping else "ok", "model": service.model,
                             "backend": guard.backend, "device": guard.device,
                             "incremental_streaming": guard.incremental_streaming,
                             "dynamic_batching": config.dynamic_batching, "sessions": service.streams.count()},
                            status_code=503 if stopping else 200)

    async def metrics(request: Request) -> Response:
        payload, content_type = service.metrics.render()
        return Response(payload, media_type=content_type)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        service.metrics.errors.labels("client").inc()
        if request.url.path.startswith("/api/v1/text/"):      # the detector API's own error shape
            return JSONResponse({"code": exc.status_code, "message": str(exc.detail)}, status_code=exc.status_code)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    routes = [
        Route("/v1/moderations", moderations, methods=["POST"]),
        Route("/classify", classify, methods=["POST"]),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/streams", open_stream, methods=["POST"]),
        Route("/v1/streams/{session_id}", feed_stream, methods=["POST"]),
        Route("/v1/streams/{session_id}", get_stream, methods=["GET"]),
        Route("/v1/streams/{session_id}", delete_stream, methods=["DELETE"]),
        Route("/api/v1/text/contents", detect_contents, methods=["POST"]),
        Route("/api/v1/text/generation", detect_generation, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.service = service
    if config.log_requests:
        app.add_middleware(AccessLog)
    return app


class AccessLog:
    """ASGI middleware for --log-requests: one line per request (client, method, path,
    status, milliseconds) on the `siren_serving.access` logger, at INFO."""

    logger = logging.getLogger("siren_serving.access")

    def __init__(self, app):
        self.app = app
        if not self.logger.isEnabledFor(logging.INFO):     # asked for: shown even under -q
            self.logger.setLevel(logging.INFO)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_seen(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_seen)
        finally:
            client = scope.get("client") or ("-", 0)
            self.logger.info("%s %s %s %d %.1f ms", client[0], scope["method"], scope["path"], status[0],
                             (time.perf_counter() - started) * 1000.0)


def serve(config: ServeConfig, log_level: str = "info") -> int:
    """Load the bundle (errors surface before the port opens), then serve until SIGINT/SIGTERM;
    in-flight requests finish, queued batches are answered, then the guard is closed."""
    config.check_all()
    sock = bind_listener(config.host, config.port)     # a taken port or a bad host: before any loading
    try:
        guard = config.load_content_guard()
        try:
            app = create_app(guard, config)
        except BaseException:
            guard.close()
            raise
        log.info("siren serve: %s on %s/%s at http://%s:%d", config.bundle, guard.backend, guard.device,
                 config.host, sock.getsockname()[1])
        server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                                access_log=False,
                                                timeout_graceful_shutdown=config.graceful_timeout_s),
                                app.state.service, config.drain_s)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now: a port in use or a host that does not resolve
    is one clear error before the bundle is read and hashed (uvicorn would find it only after,
    and exit 3 with its own lines). The socket is handed to uvicorn, so nothing can take the
    port in between."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve to an address to listen on ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is already in use (pick another with --port)") from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain period: on the first SIGTERM/SIGINT /health turns 503 at
    once (so a load balancer stops routing here) while requests are still served for
    `drain_s` seconds; then uvicorn's own graceful shutdown runs (a second signal skips the
    rest of the drain)."""

    def __init__(self, config, service: _Service, drain_s: float):
        super().__init__(config)
        self._service, self._drain_s, self._exit_at, self._signal = service, drain_s, None, None

    def handle_exit(self, sig, frame) -> None:
        self._service.draining = True
        if self._exit_at is None and self._drain_s > 0:
            self._exit_at, self._signal = time.monotonic() + self._drain_s, sig
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and not self.should_exit and time.monotonic() >= self._exit_at:
            super().handle_exit(self._signal, None)
        return await super().on_tick(counter)

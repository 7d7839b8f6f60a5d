"""`siren serve`: one or more guards behind the HTTP APIs guard users already call.

The app is assembled here; each protocol's routes live in `serving/routes/` (OpenAI, vLLM,
text streams, the FMS detector API, trajectories, LiteLLM, operations), each guard's
batchers and sessions in a service (`service.py`, `trajectory_service.py`), and the guard a
request goes to is picked by name and kind (`guard_set.py`).

Concurrent requests are batched dynamically into one engine call per guard, concurrent
stream feeds and trajectory appends into one step call. Torch-free: Starlette + uvicorn +
prometheus_client (the `serve` extra) over `siren_runtime`.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from typing import Optional, Sequence, Union

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .api import ApiError
from .guard_set import ServedGuards
from .metrics import ServerMetrics
from .routes import all_routes
from .service import ContentService, LocalStreams
from .settings import ServeConfig
from .trajectory_service import TrajectoryService

log = logging.getLogger("siren_serving.server")


def service_for(guard, config: ServeConfig, name: str, metrics: ServerMetrics, streams=None):
    """The service that serves `guard`, by the kind its bundle declares."""
    kind = guard.bundle.guard.kind
    if kind == "trajectory":
        return TrajectoryService(guard, config, name, metrics)
    return ContentService(guard, config, name, metrics, streams or LocalStreams)


def create_app(guards: Union[object, Sequence], config: Optional[ServeConfig] = None,
               model_name: Optional[str] = None, streams=None) -> Starlette:
    """The ASGI app over open guards (a guard or a list; the app closes them on shutdown),
    named by `config.guard_names` (a lone guard: `model_name` wins). streams: where text
    stream sessions live, a factory of the content service (default: this process)."""
    config = config or ServeConfig()
    config.check()
    guards = list(guards) if isinstance(guards, (list, tuple)) else [guards]
    names = ([model_name] if model_name and len(guards) == 1 else
             config.guard_names(len(guards)) if config.bundle else
             ["siren-guard"] if len(guards) == 1 else [f"siren-guard-{i}" for i in range(len(guards))])
    metrics = ServerMetrics()
    served = ServedGuards([service_for(g, config, n, metrics, streams) for g, n in zip(guards, names)],
                          config, metrics)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        metrics.errors.labels("client").inc()
        if request.url.path.startswith("/api/v1/text/"):      # the detector API's own error shape
            return JSONResponse({"code": exc.status_code, "message": str(exc.detail)}, status_code=exc.status_code)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await served.start()
        try:
            yield
        finally:
            await served.stop()

    app = Starlette(routes=all_routes(served), lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.service = served.services[0]
    app.state.served = served
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
    config.guard_names()                               # two guards of one name: before any loading
    sock = bind_listener(config.host, config.port)     # a taken port or a bad host: before any loading
    try:
        guards = config.load_guards()
        try:
            app = create_app(guards, config)
        except BaseException:
            for guard in guards:
                guard.close()
            raise
        for service in app.state.served.services:
            log.info("siren serve: %s (%s guard %r) on %s/%s", service.guard.bundle.directory, service.kind,
                     service.name, service.guard.backend, service.guard.device)
        log.info("siren serve: listening on http://%s:%d", config.host, sock.getsockname()[1])
        server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                                access_log=False,
                                                timeout_graceful_shutdown=config.graceful_timeout_s),
                                app.state.served, config.drain_s)
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

    def __init__(self, config, service: ServedGuards, drain_s: float):
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

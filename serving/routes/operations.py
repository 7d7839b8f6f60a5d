"""What operators and load balancers call: health (per guard), info, version, the OpenAPI
document and Prometheus metrics."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from siren_runtime import package_version

from ..openapi import openapi_document, response


def routes(served) -> list:
    config = served.config

    def serving_limits() -> dict:
        return {"max_inputs": config.max_inputs, "max_body_bytes": config.max_body_bytes,
                "max_sessions": config.max_sessions, "session_ttl_s": config.session_ttl_s,
                "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                "dynamic_batching": config.dynamic_batching}

    async def info(request: Request) -> Response:
        guards = []
        for service in served.services:
            described = service.describe()
            described.pop("sessions")
            described["limits"] = {**described["limits"], **serving_limits()}
            guards.append(described)
        # the first guard's fields at the top level: what a one-guard client reads
        return JSONResponse({**guards[0], "guards": guards, "version": package_version()})

    async def version(request: Request) -> Response:
        return JSONResponse({"name": "siren-deploy", "version": package_version()})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(package_version()))

    async def health(request: Request) -> Response:
        stopping = served.closing or served.draining
        guards = [{key: value for key, value in service.describe().items()
                   if key in ("model", "kind", "backend", "device", "incremental_streaming", "sessions")}
                  for service in served.services]
        first = guards[0]
        return JSONResponse({"status": "shutting_down" if stopping else "ok", **first,
                             "dynamic_batching": config.dynamic_batching,
                             "sessions": sum(g["sessions"] for g in guards), "guards": guards},
                            status_code=503 if stopping else 200)

    async def metrics(request: Request) -> Response:
        payload, content_type = served.metrics.render()
        return Response(payload, media_type=content_type)

    return [Route("/health", health, methods=["GET"]), Route("/info", info, methods=["GET"]),
            Route("/version", version, methods=["GET"]), Route("/openapi.json", openapi, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"])]


#: this protocol's operations in the OpenAPI document (serving/openapi.py collects them)
OPERATIONS = {
    ("/health", "get"): {
        "tags": ["Operations"], "summary": "200 while serving; 503 while draining or shutting down",
        "responses": {"200": response({"type": "object"}), "503": response({"type": "object"}, "draining")}},
    ("/info", "get"): {
        "tags": ["Operations"], "summary": "the guard: kind, backend, device, dtype, limits, threshold",
        "responses": {"200": response({"type": "object"})}},
    ("/version", "get"): {
        "tags": ["Operations"], "summary": "the package's name and version",
        "responses": {"200": response({"type": "object", "properties": {"name": {"type": "string"},
                                                                     "version": {"type": "string"}}})}},
    ("/metrics", "get"): {
        "tags": ["Operations"], "summary": "Prometheus metrics (requests, latency, batch sizes, verdicts, sessions)",
        "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}}},
    ("/openapi.json", "get"): {
        "tags": ["Operations"], "summary": "this document", "responses": {"200": response({"type": "object"})}},
}


__all__ = ["routes", "OPERATIONS"]

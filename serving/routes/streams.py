"""Text stream sessions: a stream's verdict after each delta, each feed running only its new
tokens; concurrent feeds of different streams step together in one engine call.

    POST   /v1/streams        {"threshold"?, "model"?} -> 201 {"id", "threshold", "ttl_s", "incremental"}
    POST   /v1/streams/{id}   {"delta"} -> the verdict of the whole text so far
    GET    /v1/streams/{id},  DELETE /v1/streams/{id}
"""
from __future__ import annotations

from typing import Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..api import ApiError, parse_model, parse_threshold
from ..http import check_field, endpoint
from ..openapi import CLIENT_ERRORS, ERROR, NUMBER01, SESSION_ID, STREAM, request_body, response
from ..service import unknown_session


def parse_delta(body: dict) -> str:
    delta = body.get("delta")
    if not isinstance(delta, str):
        raise ApiError(400, f"delta must be a string, got {type(delta).__name__}", param="delta")
    return delta


def stream_response(session_id: str, result, text_chars: int, onset: Optional[int] = None,
                    threshold: Optional[float] = None) -> dict:
    """A stream's state; `onset`: the character offset (of everything fed) where the running
    score first reached the threshold, null while it has not; `threshold`: the session's (for
    a session not fed yet)."""
    return {"id": session_id, "score": result.score if result else None,
            "flagged": bool(result.is_harmful) if result else False,
            "threshold": result.threshold if result else threshold, "chars": text_chars, "onset": onset}


def stream_owner(served, session_id: str):
    """The content service holding a stream: the only one, or the one that knows the id."""
    services = served.of_kind("content")
    if len(services) == 1:
        return services[0]
    for service in services:
        if service.streams.owns(session_id):
            return service
    raise unknown_session(session_id)


def routes(served) -> list:
    @endpoint(served, "streams")
    async def open_stream(request: Request) -> Response:
        body = await served.read_json(request, allow_empty=True)
        service = served.pick("content", parse_model(body, None))
        threshold = parse_threshold(body, service.threshold)
        session_id = await service.streams.open(threshold)
        served.metrics.sessions.labels(service.name).set(service.session_count())
        return JSONResponse({"id": session_id, "threshold": threshold, "ttl_s": served.config.session_ttl_s,
                             "incremental": service.guard.incremental_streaming, "model": service.name},
                            status_code=201)

    @endpoint(served, "stream_feed")
    async def feed_stream(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        service = stream_owner(served, session_id)
        service.streams.check_known(session_id)
        delta = parse_delta(await served.read_json(request))
        check_field(delta, "delta")
        result, chars, onset = await service.streams.feed(session_id, delta)
        service.observe([result.score], result.threshold)
        return JSONResponse(stream_response(session_id, result, chars, onset))

    @endpoint(served, "stream_get")
    async def get_stream(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        result, chars, onset, threshold = await stream_owner(served, session_id).streams.read(session_id)
        return JSONResponse(stream_response(session_id, result, chars, onset, threshold))

    @endpoint(served, "stream_delete")
    async def delete_stream(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        service = stream_owner(served, session_id)
        await service.streams.delete(session_id)
        served.metrics.sessions.labels(service.name).set(service.session_count())
        return JSONResponse({"id": session_id, "deleted": True})

    return [Route("/v1/streams", open_stream, methods=["POST"]),
            Route("/v1/streams/{session_id}", feed_stream, methods=["POST"]),
            Route("/v1/streams/{session_id}", get_stream, methods=["GET"]),
            Route("/v1/streams/{session_id}", delete_stream, methods=["DELETE"])]


#: this protocol's operations in the OpenAPI document (serving/openapi.py collects them)
OPERATIONS = {
    ("/v1/streams", "post"): {
        "tags": ["Streams"], "summary": "open a stream session; each feed then costs only its new tokens",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"threshold": NUMBER01}}}}},
        "responses": {"201": response({"type": "object", "properties": {
            "id": {"type": "string"}, "threshold": NUMBER01, "ttl_s": {"type": "number"},
            "incremental": {"type": "boolean", "description": "true: feeds run only the new tokens (the bundle "
                                                               "has a step graph); false: each feed rescores "
                                                               "the text so far"}}}, "created"),
                      "429": response(ERROR, "session limit reached"), **CLIENT_ERRORS}},
    ("/v1/streams/{session_id}", "post"): {
        "tags": ["Streams"], "summary": "feed {delta}: the verdict of the whole text so far",
        "parameters": SESSION_ID,
        "requestBody": request_body({"type": "object", "required": ["delta"], "properties": {"delta": {"type": "string"}}}),
        "responses": {"200": response(STREAM), "404": response(ERROR, "unknown session"), **CLIENT_ERRORS}},
    ("/v1/streams/{session_id}", "get"): {
        "tags": ["Streams"], "summary": "the session's verdict so far", "parameters": SESSION_ID,
        "responses": {"200": response(STREAM), "404": response(ERROR, "unknown session")}},
    ("/v1/streams/{session_id}", "delete"): {
        "tags": ["Streams"], "summary": "close the session", "parameters": SESSION_ID,
        "responses": {"200": response({"type": "object", "properties": {"id": {"type": "string"},
                                                                     "deleted": {"const": True}}}),
                      "404": response(ERROR, "unknown session")}},
}


__all__ = ["routes", "OPERATIONS", "parse_delta", "stream_response"]

"""Agent trajectories (an Agent-SIREN guard): one or many runs scored whole, and per-run
sessions whose appends run only the new turn's tokens.

    POST   /v1/trajectories/score     {"messages", "tools"?, "threshold"?, "model"?}
                                      | {"trajectories": [{"messages", "tools"?}], ...} | [{"messages", ...}]
    POST   /v1/trajectories/sessions  {"tools"?, "threshold"?, "model"?} -> 201 {"id", ...}
    POST   /v1/trajectories/sessions/{id}   {"messages": [the new turns]} -> the verdict of the run so far
    GET    /v1/trajectories/sessions/{id},  DELETE /v1/trajectories/sessions/{id}
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..api import ApiError, parse_model, parse_threshold
from ..http import endpoint
from ..openapi import (CLIENT_ERRORS, ERROR, MESSAGES, NUMBER01, RUN, RUN_ID, RUN_STATE, TOOLS, VERDICT, request_body,
                       response)
from ..runs import parse_messages, parse_tools, runs_of
from ..service import unknown_session
from ..trajectory_service import SESSION_PATH, RunState


def verdict(score: float, threshold: float, tokens: int) -> dict:
    return {"score": score, "flagged": bool(score >= threshold), "threshold": threshold, "tokens": tokens}


def session_response(run, model: str) -> dict:
    """A run's verdict so far (score null before the first append)."""
    result = run.result
    return {"id": run.id, "model": model, "score": result.score if result else None,
            "flagged": bool(result.is_harmful) if result else False, "threshold": run.threshold,
            "messages": run.messages, "tokens": run.tokens}


def session_owner(served, session_id: str):
    """The trajectory service holding a session (ids are unique across guards)."""
    for service in served.of_kind("trajectory"):
        if service.sessions.peek(session_id) is not None:
            return service
    raise unknown_session(session_id, what="trajectory session")


def routes(served) -> list:
    @endpoint(served, "trajectory_score")
    async def score(request: Request) -> Response:
        body = await served.read_json(request, allow_list=True)
        options = body if isinstance(body, dict) else {}
        service = served.pick("trajectory", parse_model(options, None))
        threshold = parse_threshold(options, service.threshold)
        runs, many = runs_of(body, served.config.max_inputs)
        scores, tokens = await service.scores(runs)
        service.observe(scores, threshold)
        results = [verdict(s, threshold, n) for s, n in zip(scores, tokens)]
        return JSONResponse({"model": options.get("model") or service.name,
                             **({"results": results} if many else results[0])})

    @endpoint(served, "trajectory_sessions")
    async def open_session(request: Request) -> Response:
        body = await served.read_json(request, allow_empty=True)
        service = served.pick("trajectory", parse_model(body, None))
        threshold = parse_threshold(body, service.threshold)
        tools = parse_tools(body.get("tools"))
        held = service.open(threshold, tools)
        served.metrics.sessions.labels(service.name).set(service.session_count())
        return JSONResponse({**session_response(RunState.of(held), service.name), "ttl_s": served.config.session_ttl_s,
                             "incremental": service.guard.incremental_streaming}, status_code=201)

    @endpoint(served, "trajectory_append")
    async def append(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        service = session_owner(served, session_id)
        service.held(session_id)                 # an unknown session: 404 before the body is read
        body = await served.read_json(request)
        if "messages" not in body:
            raise ApiError(400, "missing required field 'messages' (the turns to append)", param="messages")
        messages = parse_messages(body["messages"])
        run = await service.append(session_id, messages)
        service.observe([run.result.score], run.threshold)
        return JSONResponse(session_response(run, service.name))

    @endpoint(served, "trajectory_session_get")
    async def get_session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        service = session_owner(served, session_id)
        return JSONResponse(session_response(await service.read(session_id), service.name))

    @endpoint(served, "trajectory_session_delete")
    async def delete_session(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        service = session_owner(served, session_id)
        await service.delete(session_id)
        served.metrics.sessions.labels(service.name).set(service.session_count())
        return JSONResponse({"id": session_id, "deleted": True})

    return [Route("/v1/trajectories/score", score, methods=["POST"]),
            Route(SESSION_PATH, open_session, methods=["POST"]),
            Route(SESSION_PATH + "/{session_id}", append, methods=["POST"]),
            Route(SESSION_PATH + "/{session_id}", get_session, methods=["GET"]),
            Route(SESSION_PATH + "/{session_id}", delete_session, methods=["DELETE"])]


#: this protocol's operations in the OpenAPI document (serving/openapi.py collects them)
OPERATIONS = {
    ("/v1/trajectories/score", "post"): {
        "tags": ["Trajectories"], "summary": "score one agent run, or many ({trajectories: [...]} or a list)",
        "requestBody": request_body({"oneOf": [
            {**RUN, "properties": {**RUN["properties"], "threshold": NUMBER01, "model": {"type": "string"}}},
            {"type": "object", "required": ["trajectories"], "properties": {
                "trajectories": {"type": "array", "items": RUN}, "threshold": NUMBER01,
                "model": {"type": "string"}}},
            {"type": "array", "items": RUN}]}),
        "responses": {"200": response({"oneOf": [VERDICT, {"type": "object", "properties": {
            "model": {"type": "string"}, "results": {"type": "array", "items": VERDICT}}}]}), **CLIENT_ERRORS}},
    ("/v1/trajectories/sessions", "post"): {
        "tags": ["Trajectories"], "summary": "open a run session; each append then runs only the new turns' tokens",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"tools": TOOLS, "threshold": NUMBER01, "model": {"type": "string"}}}}}},
        "responses": {"201": response(RUN_STATE, "created"), "429": response(ERROR, "session limit reached"),
                      **CLIENT_ERRORS}},
    ("/v1/trajectories/sessions/{session_id}", "post"): {
        "tags": ["Trajectories"], "summary": "append {messages}: the verdict of the whole run so far",
        "parameters": RUN_ID,
        "requestBody": request_body({"type": "object", "required": ["messages"], "properties": {"messages": MESSAGES}}),
        "responses": {"200": response(RUN_STATE), "404": response(ERROR, "unknown session"), **CLIENT_ERRORS}},
    ("/v1/trajectories/sessions/{session_id}", "get"): {
        "tags": ["Trajectories"], "summary": "the run's verdict so far", "parameters": RUN_ID,
        "responses": {"200": response(RUN_STATE), "404": response(ERROR, "unknown session")}},
    ("/v1/trajectories/sessions/{session_id}", "delete"): {
        "tags": ["Trajectories"], "summary": "close the session", "parameters": RUN_ID,
        "responses": {"200": response({"type": "object"}), "404": response(ERROR, "unknown session")}},
}


__all__ = ["routes", "OPERATIONS"]

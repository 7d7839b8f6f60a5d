"""OpenAI's moderation API (one category, `harmful`) and its models list.

    POST /v1/moderations   {"input": str | [str] | [{"type": "text", "text"}], "model"?, "threshold"?}
    GET  /v1/models, GET /v1/models/{model}
"""
from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..api import CATEGORY, ApiError, parse_inputs, parse_model, parse_threshold
from ..http import check_texts, endpoint
from ..openapi import CLIENT_ERRORS, ERROR, SCORING, request_body, response


def moderation_response(model: str, scores: list, threshold: float) -> dict:
    """OpenAI's /v1/moderations shape with one category, plus the raw score and threshold."""
    results = []
    for score in scores:
        flagged = bool(score >= threshold)
        results.append({"flagged": flagged, "categories": {CATEGORY: flagged},
                        "category_scores": {CATEGORY: score}, "category_applied_input_types": {CATEGORY: ["text"]},
                        "score": score, "threshold": threshold})
    return {"id": "modr-" + secrets.token_hex(12), "model": model, "results": results}


async def score_request(served, request: Request) -> tuple:
    """What /v1/moderations and vLLM's /classify share: parse, pick the content guard the
    `model` names, score in the dynamic batch, count verdicts -> (model, scores, threshold, tokens)."""
    body = await served.read_json(request)
    texts = parse_inputs(body, served.config.max_inputs)
    requested = parse_model(body, None)
    service = served.pick("content", requested)
    threshold = parse_threshold(body, service.threshold)
    check_texts(texts, "input")
    scores, tokens = await service.scores(texts)
    service.observe(scores, threshold)
    return requested or service.name, scores, threshold, tokens


def model_card(served, service) -> dict:
    """A guard as OpenAI's model object describes one (plus its kind)."""
    return {"id": service.name, "object": "model", "created": served.started, "owned_by": "siren-deploy",
            "kind": service.kind}


def routes(served) -> list:
    @endpoint(served, "moderations")
    async def moderations(request: Request) -> Response:
        model, scores, threshold, _ = await score_request(served, request)
        return JSONResponse(moderation_response(model, scores, threshold))

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(served, s) for s in served.services]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        service = served.by_name.get(name)
        if service is None:
            error = ApiError(404, f"no model {name!r} here; this server holds {served.loaded()}", param="model",
                             code="model_not_found")
            return JSONResponse(error.body(), status_code=404)
        return JSONResponse(model_card(served, service))

    return [Route("/v1/moderations", moderations, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model}", get_model, methods=["GET"])]


#: this protocol's operations in the OpenAPI document (serving/openapi.py collects them)
OPERATIONS = {
    ("/v1/moderations", "post"): {
        "tags": ["OpenAI"], "summary": "OpenAI moderation: one category, `harmful`",
        "requestBody": request_body(SCORING),
        "responses": {"200": response({"type": "object", "properties": {
            "id": {"type": "string"}, "model": {"type": "string"}, "results": {"type": "array", "items": {
                "type": "object", "properties": {
                    "flagged": {"type": "boolean"}, "categories": {"type": "object"},
                    "category_scores": {"type": "object"}, "score": {"type": "number"},
                    "threshold": {"type": "number"}}}}}}), **CLIENT_ERRORS}},
    ("/v1/models", "get"): {
        "tags": ["OpenAI"], "summary": "the guards this server holds (the openai client's models.list())",
        "responses": {"200": response({"type": "object", "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                "owned_by": {"type": "string"}, "kind": {"enum": ["content", "trajectory"]}}}}}})}},
    ("/v1/models/{model}", "get"): {
        "tags": ["OpenAI"], "summary": "one guard by name (404 when this server holds none of that name)",
        "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": response({"type": "object"}), "404": response(ERROR, "no such model")}},
}


__all__ = ["routes", "OPERATIONS", "moderation_response", "score_request"]

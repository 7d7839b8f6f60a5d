"""The FMS / TrustyAI guardrails detector API (fms-guardrails-orchestrator,
docs/api/openapi_detector_api.yaml), so a SIREN guard plugs into orchestrators unchanged.

    POST /api/v1/text/contents    {"contents": [str], "detector_params"?}  -> per content a list
                                  of {start, end, text, detection, detection_type, score}
    POST /api/v1/text/generation  {"prompt", "generated_text", "detector_params"?} -> a list of
                                  {detection, detection_type, score}
    POST /api/v1/text/chat        {"messages": OpenAI chat rows, "tools"?, "detector_params"?}
                                  -> a list of {detection, detection_type, score} (a trajectory guard)

The `detector-id` header names the guard (required on contents and generation, optional on
chat, as the API says); a name that matches no guard goes to the one guard of the kind the
route needs when there is exactly one.

detector_params: {"threshold"?, "sustain"?}. A content is detected exactly when its score
reaches the threshold (as /v1/moderations flags it); its detection spans from where harm
starts (the onset: the first token whose prefix score reaches the threshold for `sustain`
tokens; the content's start when no prefix does) to its end. Errors are the API's
{"code", "message"} (422 for a request that does not validate).
"""
from __future__ import annotations

from typing import Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from siren_runtime.text import join_prompt_response

from ..api import ApiError, parse_int, parse_threshold
from ..http import check_field, check_texts, endpoint
from ..openapi import (DETECTOR_ERRORS, DETECTOR_ID, DETECTOR_PARAMS, MESSAGES, NUMBER01, TOOLS, request_body,
                       response)
from ..runs import run_of

DETECTION = "harmful"
DETECTION_TYPE = "siren"


def detector_error_body(error: ApiError) -> tuple[dict, int]:
    """An ApiError in the detector API's own error shape; a 400 is its 422."""
    status = 422 if error.status == 400 else error.status
    return {"code": status, "message": error.message}, status


def _params(body: dict, known: tuple) -> dict:
    params = body.get("detector_params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ApiError(400, f"detector_params must be an object, got {type(params).__name__}",
                       param="detector_params")
    unknown = set(params) - set(known)
    if unknown:
        raise ApiError(400, f"detector_params takes {' and '.join(known)}, got {', '.join(sorted(unknown))}",
                       param="detector_params")
    return params


def parse_params(body: dict, default_threshold: float) -> tuple[float, int]:
    params = _params(body, ("threshold", "sustain"))
    threshold = parse_threshold(params, default_threshold)
    return threshold, parse_int(params.get("sustain", 1), "detector_params.sustain", high=1_000_000)


def parse_contents(body: dict, max_inputs: int) -> list[str]:
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise ApiError(400, "contents must be a non-empty list of strings", param="contents")
    if len(contents) > max_inputs:
        raise ApiError(413, f"contents has {len(contents)} items; this server takes at most {max_inputs}",
                       param="contents")
    for i, item in enumerate(contents):
        if not isinstance(item, str):
            raise ApiError(400, f"contents[{i}] must be a string, got {type(item).__name__}", param=f"contents[{i}]")
    return contents


def parse_generation(body: dict) -> tuple[str, str]:
    out = []
    for key in ("prompt", "generated_text"):
        value = body.get(key)
        if not isinstance(value, str):
            raise ApiError(400, f"{key} must be a string, got {type(value).__name__}", param=key)
        out.append(value)
    return out[0], out[1]


def content_detections(score: float, prefixes, text: str, threshold: float, sustain: int) -> list:
    """One content's detections: [] when its score (the scoring graph's, as /v1/moderations
    gives it) is below the threshold, else one span from the onset to the end."""
    if score < threshold:
        return []
    onset: Optional[int] = prefixes.onset(threshold, sustain)
    start = 0 if onset is None else onset
    return [{"start": start, "end": len(text), "text": text[start:], "detection": DETECTION,
             "detection_type": DETECTION_TYPE, "score": score}]


def generation_detections(score: float, threshold: float) -> list:
    if score < threshold:
        return []
    return [{"detection": DETECTION, "detection_type": DETECTION_TYPE, "score": score}]


def parse_chat(body: dict, default_threshold: float):
    """(the run, its threshold): `tools` at the top level or in detector_params, not both."""
    params = _params(body, ("threshold", "tools"))
    if "tools" in params and body.get("tools") is not None:
        raise ApiError(400, "tools given twice (top level and detector_params): give them once", param="tools")
    tools = params.get("tools", body.get("tools"))
    return run_of(body.get("messages"), tools), parse_threshold(params, default_threshold)


def require_detector_id(headers) -> str:
    """The API's required `detector-id` header: a guard's name (any name when one guard of the
    route's kind is loaded)."""
    value = headers.get("detector-id")
    if not value:
        raise ApiError(400, "the detector-id header is required (a guard's name; any name when this server holds "
                            "one guard of the route's kind)", param="detector-id")
    return value


def routes(served) -> list:
    def detector_endpoint(label: str):
        return endpoint(served, label, shape=detector_error_body)

    @detector_endpoint("detector_contents")
    async def detect_contents(request: Request) -> Response:
        service = served.pick("content", require_detector_id(request.headers), param="detector-id")
        body = await served.read_json(request)
        contents = parse_contents(body, served.config.max_inputs)
        threshold, sustain = parse_params(body, service.threshold)
        check_texts(contents, "contents")
        if not service.guard.prefix_scores_available:
            raise ApiError(501, "this bundle has no prefix head or streaming step graph (re-export it with "
                                "`siren export`): detection spans need them", kind="server_error")
        # the verdict from the scoring graph (exactly /v1/moderations'), the span from the prefixes
        scores, _ = await service.scores(contents)
        flagged = [i for i, score in enumerate(scores) if score >= threshold]
        prefixes = (dict(zip(flagged, await service.prefix_scores([contents[i] for i in flagged])))
                    if flagged else {})
        service.observe(scores, threshold)
        return JSONResponse([content_detections(score, prefixes.get(i), text, threshold, sustain)
                             for i, (score, text) in enumerate(zip(scores, contents))])

    @detector_endpoint("detector_generation")
    async def detect_generation(request: Request) -> Response:
        service = served.pick("content", require_detector_id(request.headers), param="detector-id")
        body = await served.read_json(request)
        prompt, generated = parse_generation(body)
        threshold, _ = parse_params(body, service.threshold)
        check_field(prompt, "prompt")
        check_field(generated, "generated_text")
        [score], _ = await service.scores([join_prompt_response(prompt, generated)])
        service.observe([score], threshold)
        return JSONResponse(generation_detections(score, threshold))

    @detector_endpoint("detector_chat")
    async def detect_chat(request: Request) -> Response:
        service = served.pick("trajectory", request.headers.get("detector-id"), param="detector-id")
        body = await served.read_json(request)
        run, threshold = parse_chat(body, service.threshold)
        [score], _ = await service.scores([run])
        service.observe([score], threshold)
        return JSONResponse(generation_detections(score, threshold))

    return [Route("/api/v1/text/contents", detect_contents, methods=["POST"]),
            Route("/api/v1/text/generation", detect_generation, methods=["POST"]),
            Route("/api/v1/text/chat", detect_chat, methods=["POST"])]


#: this protocol's operations in the OpenAPI document (serving/openapi.py collects them)
OPERATIONS = {
    ("/api/v1/text/contents", "post"): {
        "tags": ["FMS detectors"], "summary": "detector API: per content, where harm starts to its end",
        "parameters": DETECTOR_ID,
        "requestBody": request_body({"type": "object", "required": ["contents"], "properties": {
            "contents": {"type": "array", "items": {"type": "string"}}, "detector_params": DETECTOR_PARAMS}}),
        "responses": {"200": response({"type": "array", "items": {"type": "array", "items": {
            "type": "object", "properties": {"start": {"type": "integer"}, "end": {"type": "integer"},
                                             "text": {"type": "string"}, "detection": {"type": "string"},
                                             "detection_type": {"type": "string"},
                                             "score": {"type": "number"}}}}}), **DETECTOR_ERRORS}},
    ("/api/v1/text/generation", "post"): {
        "tags": ["FMS detectors"], "summary": "detector API: a prompt and its generated text, scored joined",
        "parameters": DETECTOR_ID,
        "requestBody": request_body({"type": "object", "required": ["prompt", "generated_text"], "properties": {
            "prompt": {"type": "string"}, "generated_text": {"type": "string"},
            "detector_params": DETECTOR_PARAMS}}),
        "responses": {"200": response({"type": "array", "items": {"type": "object"}}), **DETECTOR_ERRORS}},
    ("/api/v1/text/chat", "post"): {
        "tags": ["FMS detectors"], "summary": "detector API: an agent's chat (messages, tools) judged by a trajectory "
                                              "guard",
        "parameters": [{"name": "detector-id", "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "a trajectory guard's name (optional)"}],
        "requestBody": request_body({"type": "object", "required": ["messages"], "properties": {
            "messages": MESSAGES, "tools": TOOLS,
            "detector_params": {"type": "object", "properties": {"threshold": NUMBER01, "tools": TOOLS}}}}),
        "responses": {"200": response({"type": "array", "items": {"type": "object"}}), **DETECTOR_ERRORS}},
}

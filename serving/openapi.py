"""The OpenAPI 3.1 document of `siren serve` (GET /openapi.json), and the source of the HTTP
reference in the docs (`docs/gen_reference.py` renders it as Markdown).

Each operation is declared once here, keyed by (path, method); a test checks that the
app's routes and this table name the same operations, so a new route cannot ship
undocumented."""
from __future__ import annotations

from typing import Any

_NUMBER01 = {"type": "number", "minimum": 0, "maximum": 1}
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                    {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                                "properties": {"type": {"const": "text"},
                                                               "text": {"type": "string"}}}}]}
_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}
_DETECTOR_ERROR = {"type": "object", "properties": {"code": {"type": "integer"}, "message": {"type": "string"}}}
_DETECTOR_PARAMS = {"type": "object", "properties": {"threshold": _NUMBER01,
                                                     "sustain": {"type": "integer", "minimum": 1}}}
_STREAM = {"type": "object", "properties": {
    "id": {"type": "string"}, "score": {"type": ["number", "null"]}, "flagged": {"type": "boolean"},
    "threshold": _NUMBER01, "chars": {"type": "integer", "description": "characters fed so far"},
    "onset": {"type": ["integer", "null"],
              "description": "character offset where the running score first reached the threshold"}}}
_MESSAGES = {"type": "array", "description": "OpenAI chat messages (system, developer, user, assistant with "
                                          "tool_calls, tool)", "items": {"type": "object", "required": ["role"]}}
_TOOLS = {"type": "array", "description": "the tool schemas the agent had (OpenAI's or flat)",
          "items": {"type": "object"}}
_RUN = {"type": "object", "required": ["messages"], "properties": {"messages": _MESSAGES, "tools": _TOOLS}}
_VERDICT = {"type": "object", "properties": {"score": {"type": "number"}, "flagged": {"type": "boolean"},
                                             "threshold": _NUMBER01, "tokens": {"type": "integer"}}}
_RUN_STATE = {"type": "object", "properties": {
    "id": {"type": "string"}, "model": {"type": "string"}, "score": {"type": ["number", "null"]},
    "flagged": {"type": "boolean"}, "threshold": _NUMBER01, "messages": {"type": "integer"},
    "tokens": {"type": "integer", "description": "ids the verdict read (at most max_length)"}}}
_SCORING = {"type": "object", "required": ["input"], "properties": {
    "input": _TEXTS, "model": {"type": "string", "description": "echoed back"},
    "threshold": {**_NUMBER01, "description": "default: the server's"}}}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_CLIENT_ERRORS = {"400": _json(_ERROR, "bad input (the message names the field)"),
                  "413": _json(_ERROR, "body or input list too large"),
                  "503": _json(_ERROR, "shutting down")}
_DETECTOR_ERRORS = {"422": _json(_DETECTOR_ERROR, "bad input"), "413": _json(_DETECTOR_ERROR, "body too large"),
                    "501": _json(_DETECTOR_ERROR, "bundle without prefix scores")}
_SESSION_ID = [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_DETECTOR_ID = [{"name": "detector-id", "in": "header", "required": True, "schema": {"type": "string"},
                 "description": "a guard's name (any name when one content guard is loaded)"}]
_RUN_ID = [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}]

#: (path, method) -> the operation, in the order the reference lists them
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/moderations", "post"): {
        "tags": ["OpenAI"], "summary": "OpenAI moderation: one category, `harmful`",
        "requestBody": _body(_SCORING),
        "responses": {"200": _json({"type": "object", "properties": {
            "id": {"type": "string"}, "model": {"type": "string"}, "results": {"type": "array", "items": {
                "type": "object", "properties": {
                    "flagged": {"type": "boolean"}, "categories": {"type": "object"},
                    "category_scores": {"type": "object"}, "score": {"type": "number"},
                    "threshold": {"type": "number"}}}}}}), **_CLIENT_ERRORS}},
    ("/v1/models", "get"): {
        "tags": ["OpenAI"], "summary": "the guards this server holds (the openai client's models.list())",
        "responses": {"200": _json({"type": "object", "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                "owned_by": {"type": "string"}, "kind": {"enum": ["content", "trajectory"]}}}}}})}},
    ("/v1/models/{model}", "get"): {
        "tags": ["OpenAI"], "summary": "one guard by name (404 when this server holds none of that name)",
        "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _json({"type": "object"}), "404": _json(_ERROR, "no such model")}},
    ("/classify", "post"): {
        "tags": ["vLLM"], "summary": "vLLM classification: label and [p(safe), p(harmful)] per input",
        "requestBody": _body(_SCORING), "responses": {"200": _json({"type": "object"}), **_CLIENT_ERRORS}},
    ("/v1/classify", "post"): {
        "tags": ["vLLM"], "summary": "the same as /classify", "requestBody": _body(_SCORING),
        "responses": {"200": _json({"type": "object"}), **_CLIENT_ERRORS}},
    ("/v1/streams", "post"): {
        "tags": ["Streams"], "summary": "open a stream session; each feed then costs only its new tokens",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"threshold": _NUMBER01}}}}},
        "responses": {"201": _json({"type": "object", "properties": {
            "id": {"type": "string"}, "threshold": _NUMBER01, "ttl_s": {"type": "number"},
            "incremental": {"type": "boolean", "description": "true: feeds run only the new tokens (the bundle "
                                                               "has a step graph); false: each feed rescores "
                                                               "the text so far"}}}, "created"),
                      "429": _json(_ERROR, "session limit reached"), **_CLIENT_ERRORS}},
    ("/v1/streams/{session_id}", "post"): {
        "tags": ["Streams"], "summary": "feed {delta}: the verdict of the whole text so far",
        "parameters": _SESSION_ID,
        "requestBody": _body({"type": "object", "required": ["delta"], "properties": {"delta": {"type": "string"}}}),
        "responses": {"200": _json(_STREAM), "404": _json(_ERROR, "unknown session"), **_CLIENT_ERRORS}},
    ("/v1/streams/{session_id}", "get"): {
        "tags": ["Streams"], "summary": "the session's verdict so far", "parameters": _SESSION_ID,
        "responses": {"200": _json(_STREAM), "404": _json(_ERROR, "unknown session")}},
    ("/v1/streams/{session_id}", "delete"): {
        "tags": ["Streams"], "summary": "close the session", "parameters": _SESSION_ID,
        "responses": {"200": _json({"type": "object", "properties": {"id": {"type": "string"},
                                                                     "deleted": {"const": True}}}),
                      "404": _json(_ERROR, "unknown session")}},
    ("/api/v1/text/contents", "post"): {
        "tags": ["FMS detectors"], "summary": "detector API: per content, where harm starts to its end",
        "parameters": _DETECTOR_ID,
        "requestBody": _body({"type": "object", "required": ["contents"], "properties": {
            "contents": {"type": "array", "items": {"type": "string"}}, "detector_params": _DETECTOR_PARAMS}}),
        "responses": {"200": _json({"type": "array", "items": {"type": "array", "items": {
            "type": "object", "properties": {"start": {"type": "integer"}, "end": {"type": "integer"},
                                             "text": {"type": "string"}, "detection": {"type": "string"},
                                             "detection_type": {"type": "string"},
                                             "score": {"type": "number"}}}}}), **_DETECTOR_ERRORS}},
    ("/api/v1/text/generation", "post"): {
        "tags": ["FMS detectors"], "summary": "detector API: a prompt and its generated text, scored joined",
        "parameters": _DETECTOR_ID,
        "requestBody": _body({"type": "object", "required": ["prompt", "generated_text"], "properties": {
            "prompt": {"type": "string"}, "generated_text": {"type": "string"},
            "detector_params": _DETECTOR_PARAMS}}),
        "responses": {"200": _json({"type": "array", "items": {"type": "object"}}), **_DETECTOR_ERRORS}},
    ("/api/v1/text/chat", "post"): {
        "tags": ["FMS detectors"], "summary": "detector API: an agent's chat (messages, tools) judged by a trajectory "
                                              "guard",
        "parameters": [{"name": "detector-id", "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "a trajectory guard's name (optional)"}],
        "requestBody": _body({"type": "object", "required": ["messages"], "properties": {
            "messages": _MESSAGES, "tools": _TOOLS,
            "detector_params": {"type": "object", "properties": {"threshold": _NUMBER01, "tools": _TOOLS}}}}),
        "responses": {"200": _json({"type": "array", "items": {"type": "object"}}), **_DETECTOR_ERRORS}},
    ("/v1/trajectories/score", "post"): {
        "tags": ["Trajectories"], "summary": "score one agent run, or many ({trajectories: [...]} or a list)",
        "requestBody": _body({"oneOf": [
            {**_RUN, "properties": {**_RUN["properties"], "threshold": _NUMBER01, "model": {"type": "string"}}},
            {"type": "object", "required": ["trajectories"], "properties": {
                "trajectories": {"type": "array", "items": _RUN}, "threshold": _NUMBER01,
                "model": {"type": "string"}}},
            {"type": "array", "items": _RUN}]}),
        "responses": {"200": _json({"oneOf": [_VERDICT, {"type": "object", "properties": {
            "model": {"type": "string"}, "results": {"type": "array", "items": _VERDICT}}}]}), **_CLIENT_ERRORS}},
    ("/v1/trajectories/sessions", "post"): {
        "tags": ["Trajectories"], "summary": "open a run session; each append then runs only the new turns' tokens",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"tools": _TOOLS, "threshold": _NUMBER01, "model": {"type": "string"}}}}}},
        "responses": {"201": _json(_RUN_STATE, "created"), "429": _json(_ERROR, "session limit reached"),
                      **_CLIENT_ERRORS}},
    ("/v1/trajectories/sessions/{session_id}", "post"): {
        "tags": ["Trajectories"], "summary": "append {messages}: the verdict of the whole run so far",
        "parameters": _RUN_ID,
        "requestBody": _body({"type": "object", "required": ["messages"], "properties": {"messages": _MESSAGES}}),
        "responses": {"200": _json(_RUN_STATE), "404": _json(_ERROR, "unknown session"), **_CLIENT_ERRORS}},
    ("/v1/trajectories/sessions/{session_id}", "get"): {
        "tags": ["Trajectories"], "summary": "the run's verdict so far", "parameters": _RUN_ID,
        "responses": {"200": _json(_RUN_STATE), "404": _json(_ERROR, "unknown session")}},
    ("/v1/trajectories/sessions/{session_id}", "delete"): {
        "tags": ["Trajectories"], "summary": "close the session", "parameters": _RUN_ID,
        "responses": {"200": _json({"type": "object"}), "404": _json(_ERROR, "unknown session")}},
    ("/beta/litellm_basic_guardrail_api", "post"): {
        "tags": ["LiteLLM"], "summary": "LiteLLM's Generic Guardrail API: texts to the content guard, the agent run "
                                        "and proposed tool calls to the trajectory guard",
        "requestBody": _body({"type": "object", "required": ["input_type"], "properties": {
            "input_type": {"enum": ["request", "response"]}, "texts": {"type": "array", "items": {"type": "string"}},
            "structured_messages": _MESSAGES, "tools": _TOOLS,
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "litellm_call_id": {"type": "string", "description": "one streamed response: checks feed one stream"},
            "litellm_trace_id": {"type": "string", "description": "one agent run: checks append to one session"},
            "additional_provider_specific_params": {"type": "object", "properties": {
                "content_guard": {"type": "string"}, "trajectory_guard": {"type": "string"},
                "threshold": _NUMBER01, "intervene": {"type": "boolean"},
                "sustain": {"type": "integer", "minimum": 1}}}}}),
        "responses": {"200": _json({"type": "object", "properties": {
            "action": {"enum": ["NONE", "BLOCKED", "GUARDRAIL_INTERVENED"]},
            "blocked_reason": {"type": ["string", "null"]}, "texts": {"type": "array", "items": {"type": "string"}},
            "siren": {"type": "array", "items": {"type": "object"}}}}),
            "4XX": _json({"type": "object", "properties": {"detail": {"type": "string"}}}, "bad input")}},
    ("/health", "get"): {
        "tags": ["Operations"], "summary": "200 while serving; 503 while draining or shutting down",
        "responses": {"200": _json({"type": "object"}), "503": _json({"type": "object"}, "draining")}},
    ("/info", "get"): {
        "tags": ["Operations"], "summary": "the guard: kind, backend, device, dtype, limits, threshold",
        "responses": {"200": _json({"type": "object"})}},
    ("/version", "get"): {
        "tags": ["Operations"], "summary": "the package's name and version",
        "responses": {"200": _json({"type": "object", "properties": {"name": {"type": "string"},
                                                                     "version": {"type": "string"}}})}},
    ("/metrics", "get"): {
        "tags": ["Operations"], "summary": "Prometheus metrics (requests, latency, batch sizes, verdicts, sessions)",
        "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}}},
    ("/openapi.json", "get"): {
        "tags": ["Operations"], "summary": "this document", "responses": {"200": _json({"type": "object"})}},
}


def openapi_document(version: str) -> dict:
    paths: dict[str, dict] = {}
    for (path, method), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method] = operation
    return {"openapi": "3.1.0",
            "info": {"title": "siren serve", "version": version,
                     "description": "SIREN guards over HTTP: OpenAI moderations, vLLM classify, stream sessions, "
                                    "agent trajectories and their sessions, the FMS guardrails detector API, "
                                    "LiteLLM's Generic Guardrail API."},
            "paths": paths}


__all__ = ["OPERATIONS", "openapi_document"]

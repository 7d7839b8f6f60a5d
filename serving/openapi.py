"""The OpenAPI 3.1 document of `siren serve` (GET /openapi.json), and the source of the HTTP
reference in the docs (`docs/gen_reference.py` renders it as Markdown).

Each operation is declared once, in its protocol's routes module (OPERATIONS, keyed by (path,
method)), from the schema pieces here; a test checks that the app's routes and `operations()`
name the same operations, so a new route cannot ship undocumented."""
from __future__ import annotations

from typing import Any

NUMBER01 = {"type": "number", "minimum": 0, "maximum": 1}
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                    {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                                "properties": {"type": {"const": "text"},
                                                               "text": {"type": "string"}}}}]}
ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}
_DETECTOR_ERROR = {"type": "object", "properties": {"code": {"type": "integer"}, "message": {"type": "string"}}}
DETECTOR_PARAMS = {"type": "object", "properties": {"threshold": NUMBER01,
                                                     "sustain": {"type": "integer", "minimum": 1}}}
STREAM = {"type": "object", "properties": {
    "id": {"type": "string"}, "score": {"type": ["number", "null"]}, "flagged": {"type": "boolean"},
    "threshold": NUMBER01, "chars": {"type": "integer", "description": "characters fed so far"},
    "onset": {"type": ["integer", "null"],
              "description": "character offset where the running score first reached the threshold"}}}
MESSAGES = {"type": "array", "description": "OpenAI chat messages (system, developer, user, assistant with "
                                          "tool_calls, tool)", "items": {"type": "object", "required": ["role"]}}
TOOLS = {"type": "array", "description": "the tool schemas the agent had (OpenAI's or flat)",
          "items": {"type": "object"}}
RUN = {"type": "object", "required": ["messages"], "properties": {"messages": MESSAGES, "tools": TOOLS}}
VERDICT = {"type": "object", "properties": {"score": {"type": "number"}, "flagged": {"type": "boolean"},
                                             "threshold": NUMBER01, "tokens": {"type": "integer"}}}
RUN_STATE = {"type": "object", "properties": {
    "id": {"type": "string"}, "model": {"type": "string"}, "score": {"type": ["number", "null"]},
    "flagged": {"type": "boolean"}, "threshold": NUMBER01, "messages": {"type": "integer"},
    "tokens": {"type": "integer", "description": "ids the verdict read (at most max_length)"}}}
SCORING = {"type": "object", "required": ["input"], "properties": {
    "input": _TEXTS, "model": {"type": "string", "description": "echoed back"},
    "threshold": {**NUMBER01, "description": "default: the server's"}}}


def response(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def request_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


CLIENT_ERRORS = {"400": response(ERROR, "bad input (the message names the field)"),
                  "413": response(ERROR, "body or input list too large"),
                  "503": response(ERROR, "shutting down")}
DETECTOR_ERRORS = {"422": response(_DETECTOR_ERROR, "bad input"), "413": response(_DETECTOR_ERROR, "body too large"),
                    "501": response(_DETECTOR_ERROR, "bundle without prefix scores")}
SESSION_ID = [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}]
DETECTOR_ID = [{"name": "detector-id", "in": "header", "required": True, "schema": {"type": "string"},
                 "description": "a guard's name (any name when one content guard is loaded)"}]
RUN_ID = [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    """(path, method) -> the operation, from each protocol's routes module (its OPERATIONS), in
    the order the reference lists them (serving.routes.PROTOCOLS)."""
    from .routes import PROTOCOLS
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for protocol in PROTOCOLS:
        out.update(protocol.OPERATIONS)
    return out


def openapi_document(version: str) -> dict:
    paths: dict[str, dict] = {}
    for (path, method), operation in operations().items():
        paths.setdefault(path, {})[method] = operation
    return {"openapi": "3.1.0",
            "info": {"title": "siren serve", "version": version,
                     "description": "SIREN guards over HTTP: OpenAI moderations, vLLM classify, stream sessions, "
                                    "agent trajectories and their sessions, the FMS guardrails detector API, "
                                    "LiteLLM's Generic Guardrail API."},
            "paths": paths}


__all__ = ["operations", "openapi_document"]

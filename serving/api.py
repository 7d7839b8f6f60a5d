"""The wire formats `siren serve` speaks: OpenAI's moderation API, vLLM's /classify, and the
stream-session calls. Parsing refuses anything malformed with an ApiError that carries the
HTTP status and names the field; shaping builds the response bodies."""
from __future__ import annotations

import secrets
import time
from typing import Any, Optional

from siren_runtime.validation import check_threshold

#: the single category a SIREN guard scores
CATEGORY = "harmful"


class ApiError(Exception):
    """A request the server refuses: HTTP status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_threshold(body: dict, default: float) -> float:
    value = body.get("threshold")
    if value is None:
        return default
    try:
        return check_threshold(value, default)
    except ValueError as e:
        raise ApiError(400, str(e), param="threshold") from None


def parse_model(body: dict, default: str) -> str:
    """The `model` a request names (echoed back): a string, or the server's own name."""
    value = body.get("model")
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > 256:
        raise ApiError(400, f"model must be a string of at most 256 characters, got {type(value).__name__}",
                       param="model")
    return value or default


def parse_inputs(body: dict, max_inputs: int, field: str = "input") -> list[str]:
    """`input`: a string, a list of strings, or (OpenAI's multi-modal form) a list of
    {"type": "text", "text": ...} objects."""
    if field not in body:
        raise ApiError(400, f"missing required field {field!r}", param=field)
    value = body[field]
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        raise ApiError(400, f"{field} must be a string or a list of strings, got {type(value).__name__}", param=field)
    if not items:
        raise ApiError(400, f"{field} is an empty list", param=field)
    if len(items) > max_inputs:
        raise ApiError(413, f"{field} has {len(items)} items; this server takes at most {max_inputs} per request",
                       param=field, code="too_many_inputs")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if item.get("type") != "text" or not isinstance(item.get("text"), str):
                raise ApiError(400, f"{field}[{i}]: only text inputs ({{\"type\": \"text\", \"text\": ...}}) are "
                                    f"supported, got {str(item.get('type'))!r}", param=f"{field}[{i}]")
            item = item["text"]
        if not isinstance(item, str):
            raise ApiError(400, f"{field}[{i}] must be a string, got {type(item).__name__}", param=f"{field}[{i}]")
        texts.append(item)
    return texts


def parse_delta(body: dict) -> str:
    delta = body.get("delta")
    if not isinstance(delta, str):
        raise ApiError(400, f"delta must be a string, got {type(delta).__name__}", param="delta")
    return delta


def moderation_response(model: str, scores: list, threshold: float) -> dict:
    """OpenAI's /v1/moderations shape with one category, plus the raw score and threshold."""
    results = []
    for score in scores:
        flagged = bool(score >= threshold)
        results.append({"flagged": flagged, "categories": {CATEGORY: flagged},
                        "category_scores": {CATEGORY: score}, "category_applied_input_types": {CATEGORY: ["text"]},
                        "score": score, "threshold": threshold})
    return {"id": "modr-" + secrets.token_hex(12), "model": model, "results": results}


def classify_response(model: str, scores: list, threshold: float, token_counts: list) -> dict:
    """vLLM's /classify shape: label and [p(safe), p(harmful)] per input."""
    data = [{"index": i, "label": CATEGORY if score >= threshold else "safe", "probs": [1.0 - score, score],
             "num_classes": 2, "score": score, "threshold": threshold} for i, score in enumerate(scores)]
    tokens = int(sum(token_counts))
    return {"id": "classify-" + secrets.token_hex(12), "object": "list", "created": int(time.time()),
            "model": model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}


def stream_response(session_id: str, result, text_chars: int, onset: Optional[int] = None,
                    threshold: Optional[float] = None) -> dict:
    """A stream's state; `onset`: the character offset (of everything fed) where the running
    score first reached the threshold, null while it has not; `threshold`: the session's (for
    a session not fed yet)."""
    return {"id": session_id, "score": result.score if result else None,
            "flagged": bool(result.is_harmful) if result else False,
            "threshold": result.threshold if result else threshold, "chars": text_chars, "onset": onset}

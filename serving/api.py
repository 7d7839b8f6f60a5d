"""What every protocol of `siren serve` shares: the ApiError a refused request raises (its HTTP
status, the field it names) and the parsing of the fields several protocols take (texts,
threshold, model). Each protocol's own parsing and response shapes live in `routes/`."""
from __future__ import annotations

from typing import Any, Optional

from siren_runtime.validation import check_int, check_threshold

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


def parse_int(value, param: str, *, low: int = 1, high: Optional[int] = None) -> int:
    """An integer field of a request (runtime's check_int), refused as a 400 naming it."""
    try:
        return check_int(value, param, low=low, high=high)
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None


def check_count(items: list, max_inputs: int, param: str, what: str = "items", empty: str = "an empty list") -> None:
    """A request's list is not empty (400) and within --max-inputs (413)."""
    if not items:
        raise ApiError(400, f"{param} is {empty}", param=param)
    if len(items) > max_inputs:
        raise ApiError(413, f"{param} has {len(items)} {what}; this server takes at most {max_inputs} per request",
                       param=param, code="too_many_inputs")


def parse_inputs(body: dict, max_inputs: int, field: str = "input") -> list[str]:
    """`input`: a string, a list of strings, or (OpenAI's multi-modal form) a list of
    {"type": "text", "text": ...} objects."""
    if field not in body:
        raise ApiError(400, f"missing required field {field!r}", param=field)
    value = body[field]
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        raise ApiError(400, f"{field} must be a string or a list of strings, got {type(value).__name__}", param=field)
    check_count(items, max_inputs, field)
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

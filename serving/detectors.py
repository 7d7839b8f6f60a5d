"""The FMS / TrustyAI guardrails detector API (fms-guardrails-orchestrator,
docs/api/openapi_detector_api.yaml), so a SIREN guard plugs into orchestrators unchanged.

    POST /api/v1/text/contents    {"contents": [str], "detector_params"?}  -> per content a list
                                  of {start, end, text, detection, detection_type, score}
    POST /api/v1/text/generation  {"prompt", "generated_text", "detector_params"?} -> a list of
                                  {detection, detection_type, score}

detector_params: {"threshold"?, "sustain"?}. A content is detected exactly when its score
reaches the threshold (as /v1/moderations flags it); its detection spans from where harm
starts (the onset: the first token whose prefix score reaches the threshold for `sustain`
tokens; the content's start when no prefix does) to its end. Errors are the API's
{"code", "message"} (422 for a request that does not validate).
"""
from __future__ import annotations

from typing import Optional

from .api import ApiError, parse_threshold

DETECTION = "harmful"
DETECTION_TYPE = "siren"


def detector_error_body(error: ApiError) -> tuple[dict, int]:
    """An ApiError in the detector API's own error shape; a 400 is its 422."""
    status = 422 if error.status == 400 else error.status
    return {"code": status, "message": error.message}, status


def parse_params(body: dict, default_threshold: float) -> tuple[float, int]:
    params = body.get("detector_params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ApiError(400, f"detector_params must be an object, got {type(params).__name__}",
                       param="detector_params")
    unknown = set(params) - {"threshold", "sustain"}
    if unknown:
        raise ApiError(400, f"detector_params takes threshold and sustain, got {', '.join(sorted(unknown))}",
                       param="detector_params")
    threshold = parse_threshold(params, default_threshold)
    sustain = params.get("sustain", 1)
    if isinstance(sustain, bool) or not isinstance(sustain, int) or not 1 <= sustain <= 1_000_000:
        raise ApiError(400, f"detector_params.sustain must be a positive integer (tokens), got {sustain!r}",
                       param="detector_params.sustain")
    return threshold, sustain


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


def require_detector_id(headers) -> str:
    """The API's required `detector-id` header (any value names this guard)."""
    value = headers.get("detector-id")
    if not value:
        raise ApiError(400, "the detector-id header is required (any name: this server runs one SIREN guard)",
                       param="detector-id")
    return value

"""vLLM's classification API: a label and [p(safe), p(harmful)] per input.

    POST /classify, POST /v1/classify   {"input", "model"?, "threshold"?} (as /v1/moderations)
"""
from __future__ import annotations

import secrets
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..api import CATEGORY
from ..http import endpoint
from ..openapi import CLIENT_ERRORS, SCORING, request_body, response
from .openai import score_request


def classify_response(model: str, scores: list, threshold: float, token_counts: list) -> dict:
    """vLLM's /classify shape: label and [p(safe), p(harmful)] per input."""
    data = [{"index": i, "label": CATEGORY if score >= threshold else "safe", "probs": [1.0 - score, score],
             "num_classes": 2, "score": score, "threshold": threshold} for i, score in enumerate(scores)]
    tokens = int(sum(token_counts))
    return {"id": "classify-" + secrets.token_hex(12), "object": "list", "created": int(time.time()),
            "model": model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}


def routes(served) -> list:
    @endpoint(served, "classify")
    async def classify(request: Request) -> Response:
        return JSONResponse(classify_response(*await score_request(served, request)))

    return [Route("/classify", classify, methods=["POST"]), Route("/v1/classify", classify, methods=["POST"])]


#: this protocol's operations in the OpenAPI document (serving/openapi.py collects them)
OPERATIONS = {
    ("/classify", "post"): {
        "tags": ["vLLM"], "summary": "vLLM classification: label and [p(safe), p(harmful)] per input",
        "requestBody": request_body(SCORING), "responses": {"200": response({"type": "object"}), **CLIENT_ERRORS}},
    ("/v1/classify", "post"): {
        "tags": ["vLLM"], "summary": "the same as /classify", "requestBody": request_body(SCORING),
        "responses": {"200": response({"type": "object"}), **CLIENT_ERRORS}},
}


__all__ = ["routes", "OPERATIONS", "classify_response"]

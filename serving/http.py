"""Request plumbing every protocol's routes share: a bounded JSON body, the endpoint wrapper
(shutdown, metrics, error bodies, no traceback for a client that left) and the check that a
text field is text the tokenizer takes. A protocol with its own error shape passes `shape`."""
from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from siren_runtime.validation import check_encodable

from .api import ApiError, require_object
from .batcher import BatcherClosed

log = logging.getLogger("siren_serving.server")

#: the most of an oversized request body read (and dropped, never kept) to answer its 413
#: cleanly: clients such as urllib send the whole body before they read an answer, and a
#: server that closes on unread bytes makes the kernel reset the connection, so the client
#: sees "connection reset" instead of the 413. Past these bounds the reset is unavoidable.
DRAIN_LIMIT = 1 << 30
DRAIN_SECONDS = 30.0


class ClientGone(Exception):
    """The client disconnected before its request body arrived: nobody to answer."""


async def read_json(request: Request, limit: int, allow_empty: bool = False, allow_list: bool = False):
    """The body as a JSON object (or, with allow_list, a list). An oversized one is read to its
    end and dropped (up to DRAIN_LIMIT bytes and DRAIN_SECONDS) before the 413, so clients that
    send the whole body before reading the answer see the 413 rather than a reset connection;
    nothing past the limit is kept. allow_empty: no body at all means {}."""
    drain = max(limit, DRAIN_LIMIT)
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    if declared is not None and declared > drain:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="body_too_large")
    body, seen, deadline = bytearray(), 0, None
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen <= limit:
                body += chunk
                continue
            body = bytearray()                  # over the limit: keep nothing, read on
            deadline = deadline or time.monotonic() + DRAIN_SECONDS
            if seen > drain or time.monotonic() > deadline:
                break
    except ClientDisconnect:
        raise ClientGone() from None
    if seen > limit:
        raise ApiError(413, f"request body of {seen if seen <= drain else 'over ' + str(drain)} bytes "
                            f"exceeds the limit of {limit}", code="body_too_large")
    if allow_empty and not body.strip():
        return {}
    try:
        value = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="malformed_json") from None
    except ValueError as e:      # an integer literal past Python's int-string limit (4300 digits)
        raise ApiError(400, f"the request body holds a number this server does not read: {e}",
                       code="malformed_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="malformed_json") from None
    if allow_list and isinstance(value, list):
        return value
    return require_object(value)


def check_field(text: str, name: str) -> None:
    """One field is text the tokenizer takes: no lone surrogate (a 400 naming it)."""
    try:
        check_encodable(text, name)
    except ValueError as e:
        raise ApiError(400, str(e), param=name) from None


def check_texts(texts: list, param: str) -> None:
    """Every item of a list field is text the tokenizer takes (named `param[i]`)."""
    for i, text in enumerate(texts):
        check_field(text, f"{param}[{i}]")


def endpoint(state, label: str, shape: Optional[Callable[[ApiError], tuple]] = None):
    """Wrap a handler: refused while shutting down, counted and timed under `label`, and every
    failure answered (an ApiError as its body; `shape(error) -> (body, status)` for a protocol
    with its own error shape; a bug as a logged 500), so the server keeps serving."""
    metrics = state.metrics

    def wrap(handler):
        async def route(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if state.closing:
                    raise ApiError(503, "the server is shutting down", kind="server_error")
                response = await handler(request)
            except ApiError as e:
                metrics.errors.labels("client" if e.status < 500 else "unavailable").inc()
                body, status = shape(e) if shape is not None else (e.body(), e.status)
                response = JSONResponse(body, status_code=status)
            except BatcherClosed as e:    # queued behind shutdown: unavailable, not a bug
                metrics.errors.labels("unavailable").inc()
                error = ApiError(503, str(e), kind="server_error")
                body, status = shape(error) if shape is not None else (error.body(), 503)
                response = JSONResponse(body, status_code=status)
            except ClientGone:     # not a server error: counted as nginx's 499, no traceback
                metrics.errors.labels("client_disconnected").inc()
                response = Response(status_code=499)
            except Exception as e:   # a bug or an engine failure: logged, the server keeps serving
                log.exception("siren serve: %s failed", label)
                metrics.errors.labels("server").inc()
                error = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
                body, status = shape(error) if shape is not None else (error.body(), 500)
                response = JSONResponse(body, status_code=status)
            metrics.requests.labels(label, str(response.status_code)).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - started)
            return response
        return route
    return wrap


def unwrap(results: list) -> list:
    """Batch results -> values; an item's own failure becomes its request's error."""
    for result in results:
        if isinstance(result, (ValueError, TypeError)):
            raise ApiError(400, f"input refused: {result}", code="invalid_input")
        if isinstance(result, Exception):
            raise result
    return results


__all__ = ["ClientGone", "read_json", "check_field", "check_texts", "endpoint", "unwrap", "DRAIN_LIMIT"]

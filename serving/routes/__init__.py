"""One module per HTTP protocol; each owns its request parsing, its response and error shapes
and its `routes(served) -> [Route]`. A new protocol is a module here plus its line in PROTOCOLS
(and its operations in `serving/openapi.py`, which a test holds to the app's routes)."""
from __future__ import annotations

from . import detectors, litellm, openai, operations, streams, trajectories, vllm

#: every protocol `siren serve` speaks, in the order its routes are matched
PROTOCOLS = (openai, vllm, streams, detectors, trajectories, litellm, operations)


def all_routes(served) -> list:
    return [route for protocol in PROTOCOLS for route in protocol.routes(served)]


__all__ = ["PROTOCOLS", "all_routes"]

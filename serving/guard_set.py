"""The guards one server holds, by name, and how a request picks one.

A request names a guard with its `model` field or the `detector-id` header. A name that
matches no guard goes to the one guard of the kind the route needs when there is exactly
one (so clients sending `model: "siren"` keep working); otherwise a 404 lists the names. A
route whose kind no loaded guard has is a 400 saying what is loaded."""
from __future__ import annotations

import time
from typing import Optional

from .api import ApiError
from .http import read_json
from .metrics import ServerMetrics
from .settings import ServeConfig


class ServedGuards:
    """Every served guard (a GuardService each), the app's metrics, and its lifecycle flags."""

    def __init__(self, services: list, config: ServeConfig, metrics: ServerMetrics):
        names = [s.name for s in services]
        if not services:
            raise ValueError("a server needs at least one guard")
        if len(set(names)) != len(names):
            raise ValueError(f"two guards share a name ({', '.join(names)}): name them with --name")
        self.services, self.config, self.metrics = list(services), config, metrics
        self.by_name = {s.name: s for s in services}
        self.closing = False            # the lifespan is ending: every request is refused
        self.draining = False           # SIGTERM seen: /health says 503, requests are still served
        self.started = int(time.time())

    async def read_json(self, request, allow_empty: bool = False, allow_list: bool = False):
        """The request's JSON body, bounded by --max-body-bytes."""
        return await read_json(request, self.config.max_body_bytes, allow_empty=allow_empty, allow_list=allow_list)

    def loaded(self) -> str:
        return ", ".join(f"{s.name} ({s.kind})" for s in self.services)

    def of_kind(self, kind: str) -> list:
        return [s for s in self.services if s.kind == kind]

    def pick(self, kind: str, name: Optional[str] = None, param: str = "model"):
        """The service a request for a `kind` guard named `name` (or nothing) goes to."""
        if name:
            named = self.by_name.get(name)
            if named is not None:
                if named.kind != kind:
                    raise ApiError(400, f"{param} {name!r} is a {named.kind} guard; this route needs a {kind} guard "
                                        f"(this server holds: {self.loaded()})", param=param, code="wrong_guard_kind")
                return named
        candidates = self.of_kind(kind)
        if not candidates:
            raise ApiError(400, f"this server holds no {kind} guard (it holds: {self.loaded()}); load a {kind} "
                                "bundle with `siren serve BUNDLE [BUNDLE ...]`", param=param, code="no_guard_of_kind")
        if len(candidates) == 1:
            return candidates[0]
        raise ApiError(404, f"{param} {name!r} names no guard here; name one of the {kind} guards: "
                            f"{', '.join(s.name for s in candidates)}" if name else
                       f"this server holds several {kind} guards: name one with {param} "
                       f"({', '.join(s.name for s in candidates)})", param=param, code="model_not_found")

    def optional(self, kind: str, name: Optional[str] = None, param: str = "model"):
        """pick(), or None when no guard of `kind` is loaded (a route that uses it if there)."""
        return self.pick(kind, name, param) if self.of_kind(kind) else None

    async def start(self) -> None:
        for service in self.services:
            await service.start()

    async def stop(self) -> None:
        self.closing = True
        for service in self.services:
            await service.stop()


__all__ = ["ServedGuards"]

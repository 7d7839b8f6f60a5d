"""How a guard is served, as one typed object: `siren serve`, `siren serve-ray` and the Ray
Serve builder read the same `ServeSettings`, so their options cannot drift apart. Each
field is also read from its `SIREN_...` environment variable (`siren_cli.options`), as
text-embeddings-inference reads its own."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from siren_runtime.settings import GuardSettings, check_positive_int, setting
from siren_runtime.validation import check_threshold


@dataclass
class ServeSettings:
    more_bundles: tuple = setting((), "more guards to serve beside the first (content and trajectory bundles "
                                      "mix freely; one process holds each guard's weights once)", kind="more",
                                  metavar="BUNDLE")
    names: tuple = setting((), "a guard's name in requests (`model`, `detector-id`) and /v1/models, one per "
                               "bundle in order (default: the bundle folder's name)", kind="append", flag="--name")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)", kind="str")
    port: int = setting(8000, "TCP port to listen on (0: any free one)", kind="int")
    threshold: Optional[float] = setting(None, "the server's default threshold; a request's own wins "
                                               "(default: the bundle's)", kind="float")
    model_name: Optional[str] = setting(None, "model name in responses and /v1/models (default: the bundle "
                                              "folder's name)", kind="str")
    max_batch: int = setting(32, "texts per dynamic batch", kind="int")
    max_wait_ms: float = setting(2.0, "longest a request waits for its batch to fill, in ms", kind="float")
    dynamic_batching: bool = setting(True, "score each request on its own (no dynamic batching)", kind="no_flag",
                                     flag="--no-batching")
    max_body_bytes: int = setting(1 << 20, "largest request body in bytes (larger: 413)", kind="int")
    max_inputs: int = setting(256, "most texts in one request", kind="int")
    max_sessions: int = setting(1024, "most open stream sessions (more: 429)", kind="int")
    session_ttl_s: float = setting(300.0, "idle seconds before a stream session is closed", kind="float",
                                   flag="--session-ttl")
    drain_s: float = setting(0.0, "after SIGTERM, seconds /health answers 503 while requests are still served",
                             kind="float")
    graceful_timeout_s: float = setting(30.0, "after the drain, seconds in-flight requests get to finish",
                                        kind="float", flag="--graceful-timeout")
    log_requests: bool = setting(False, "log one line per request (method, path, status, ms) to stderr",
                                 kind="flag")

    #: numeric options and the ranges they must lie in (finite: `inf` would hang every request)
    _LIMITS = {"max_wait_ms": (0.0, 60_000.0), "session_ttl_s": (0.001, 7 * 86400.0),
               "graceful_timeout_s": (0.0, 3600.0), "drain_s": (0.0, 3600.0)}

    def check_serving(self) -> None:
        for name in ("max_batch", "max_body_bytes", "max_inputs", "max_sessions"):
            check_positive_int(getattr(self, name), option_name(name))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 1..65535 (or 0: any free port), got {self.port!r}")
        for name, (low, high) in self._LIMITS.items():
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
                    or not low <= value <= high):
                raise ValueError(f"{option_name(name)} must be a number in [{low:g}, {high:g}], got {value!r}")
        if self.threshold is not None:
            check_threshold(self.threshold, 0.5)
        if not all(isinstance(b, str) and b for b in self.more_bundles):
            raise ValueError(f"each bundle must be a folder or Hub repo id, got {list(self.more_bundles)!r}")
        if not all(isinstance(n, str) and n.strip() for n in self.names):
            raise ValueError(f"--name takes a non-empty name, got {list(self.names)!r}")


@dataclass
class ServeConfig(ServeSettings, GuardSettings):
    """Everything `siren serve` needs: the guards it loads and how it serves them."""

    def check(self) -> None:
        self.check_serving()

    @property
    def bundles(self) -> list:
        return [self.bundle, *self.more_bundles]

    def guard_names(self, count: Optional[int] = None) -> list:
        """Each guard's name: --name in order, else --model-name for a lone guard, else the
        bundle folder's (or Hub repo's) last part; two guards may not share one."""
        bundles = self.bundles if count is None else self.bundles[:count]
        count = len(bundles)
        if len(self.names) > count:
            raise ValueError(f"{len(self.names)} --name for {count} bundle(s): give at most one name per bundle")
        names = list(self.names)
        if not names and self.model_name and count == 1:
            names = [self.model_name]
        names += [_folder_name(b) for b in bundles[len(names):]]
        if len(set(names)) != len(names):
            raise ValueError(f"two guards would share a name ({', '.join(names)}): name each with --name")
        return names

    def load_guards(self) -> list:
        """Every bundle's guard (content or trajectory, as its manifest says); a failure closes
        the ones already loaded."""
        from siren_runtime.loading import load_guard
        self.check_guard()
        guards = []
        try:
            for bundle in self.bundles:
                guards.append(load_guard(bundle, **self.guard_options()))
        except BaseException:
            for guard in guards:
                guard.close()
            raise
        return guards

    def check_all(self) -> None:
        """The serving options and the guard's: what a command checks before it binds a port."""
        self.check_serving()
        self.check_guard()


def _folder_name(bundle: str) -> str:
    from pathlib import PurePath
    return PurePath(str(bundle).rstrip("/")).name or "siren-guard"


def option_name(name: str) -> str:
    """A settings field as its command-line option is spelled."""
    from siren_runtime.settings import flag_of
    for cls in (ServeSettings, GuardSettings):
        field = cls.__dataclass_fields__.get(name)
        if field is not None and "kind" in field.metadata:
            return flag_of(field)
    return "--" + name.replace("_", "-")


__all__ = ["ServeSettings", "ServeConfig", "option_name"]

"""Scoring backends: one small runner per engine, each imported only when chosen.

This module is the one place that decides which backend and device run a bundle, and
what falls back to what, for both the scoring graph and the streaming step graph.
Comparing two backends is two runners on one input (see :mod:`.base`).
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Optional

from ..bundle import Bundle
from ..errors import BackendUnavailableError
from .base import KVState, RunnerLimits, ScoreRunner, StepOutput, StepRow, StepRunner

_MODULES = {
    "tensorrt": "siren_runtime.backends.tensorrt_runner",
    "onnxruntime": "siren_runtime.backends.onnxruntime_runner",
}
_ALIASES = {"ort": "onnxruntime", "trt": "tensorrt"}
# In order of preference for backend=None / device=None.
_CANDIDATES = (("tensorrt", "cuda"), ("onnxruntime", "cuda"), ("onnxruntime", "cpu"))


def backend_names() -> list[str]:
    return sorted(_MODULES)


@dataclass
class Runners:
    score: ScoreRunner
    step: Optional[StepRunner]

    def close(self) -> None:
        for runner in (self.step, self.score):
            if runner is not None:
                runner.close()


def backend_name(backend: Optional[str]) -> Optional[str]:
    """A backend as the user may spell it ("trt", "ORT") -> its name ("tensorrt", "onnxruntime")."""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    return _ALIASES.get(backend.lower(), backend.lower())


def _normalise(backend: Optional[str], device: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    if backend is not None:
        backend = backend_name(backend)
        if backend not in _MODULES:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backend_names())}")
    if device is not None and device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    if backend == "tensorrt" and device == "cpu":
        raise BackendUnavailableError("TensorRT runs on a GPU; device='cpu' was asked for")
    return backend, device


def candidates(bundle: Bundle, backend: Optional[str], device: Optional[str]) -> list[tuple[str, str]]:
    """(backend, device) pairs to try, best first."""
    backend, device = _normalise(backend, device)
    out = []
    for name, dev in _CANDIDATES:
        if (backend is not None and name != backend) or (device is not None and dev != device):
            continue
        if backend is None and name == "tensorrt" and not bundle.engines_for("model"):
            continue   # nothing to try: the bundle has no engine
        if device is None and name == "onnxruntime" and dev == "cuda":
            from .ort_cuda_probe import cuda_provider_listed
            if not cuda_provider_listed():
                continue   # plain onnxruntime: no CUDA provider to try (onnxruntime-gpu that cannot
                           # start is tried, so the fallback warning says why)
        out.append((name, dev))
    return out


def open_runners(bundle: Bundle, backend: Optional[str] = None, device: Optional[str] = None,
                 streaming: bool = True, **options) -> Runners:
    """The scoring runner, and the step runner when the bundle streams (None otherwise).

    An explicit backend/device that cannot run raises BackendUnavailableError with the
    reason; with None, the next candidate is tried and the fallback is said once. The step
    graph runs on the scoring runner's backend and device when it can, else on the next
    candidate (said once), else streams rescore."""
    tried = candidates(bundle, backend, device)
    if streaming and tried:
        shared = _shared(tried[0], bundle, options)
        if shared is not None:
            return Runners(*shared)
    score, errors = _first_that_opens(tried, "create_score_runner", bundle, options)
    if not tried:
        raise BackendUnavailableError(f"no backend offers backend={backend!r} device={device!r} for this bundle")
    if score is None:
        if bundle.model.dtype == "bf16":
            raise BackendUnavailableError(
                "a bf16 bundle runs on TensorRT or ONNX Runtime CUDA only (ONNX Runtime's CPU provider has no "
                "bf16 kernels); for a CPU, export with `siren export --dtype fp32`. Tried: " + "; ".join(errors))
        if len(tried) == 1 and errors:
            raise BackendUnavailableError(errors[0].split(": ", 1)[1])
        raise BackendUnavailableError("no scoring backend is usable here: " + "; ".join(errors))
    if errors:
        warn_once(f"siren_runtime: {errors[0]}; falling back to {score.name} on the {score.device}")
    step = None
    if streaming and bundle.streaming is not None:
        first = (score.name, score.device)
        step, step_errors = _first_that_opens([first] + [c for c in candidates(bundle, None, device) if c != first],
                                              "create_step_runner", bundle, options)
        if step is None:
            warn_once("siren_runtime: no backend runs the streaming step graph here ("
                      + "; ".join(step_errors) + "); score_streaming and stream sessions rescore the prefix")
        elif step_errors:
            warn_once(f"siren_runtime: streaming step graph: {step_errors[0]}; it runs on {step.name} "
                      f"on the {step.device}")
    return Runners(score, step)


def create_runner(role: str, bundle: Bundle, backend: str, device: str, **options):
    """One runner of one backend, no fallback (role "score" or "step"): for a caller that must
    have exactly that one, e.g. `siren build` checking a step engine it has not recorded yet
    (options: the backend's, such as TensorRT's `step_engine`). BackendUnavailableError says
    why it cannot."""
    backend, device = _normalise(backend, device)
    if role not in ("score", "step"):
        raise ValueError(f"role must be 'score' or 'step', got {role!r}")
    return getattr(_load(backend), f"create_{role}_runner")(bundle, device, **options)


def _shared(pair, bundle: Bundle, options: dict):
    """(score, step) runners over one session, where the first candidate backend offers them
    (ONNX Runtime on a CPU: see create_shared_runners); None to open the graphs apart."""
    name, dev = pair
    loader = getattr(_load(name), "create_shared_runners", None)
    if loader is None:
        return None
    try:
        return loader(bundle, dev, **options)
    except BackendUnavailableError:
        return None      # the graphs opened apart say why (and fall back) as before


def _first_that_opens(pairs, loader: str, bundle: Bundle, options: dict):
    """(the first runner `loader` opens over the (backend, device) pairs, the reasons of
    those that could not)."""
    errors = []
    for name, dev in pairs:
        try:
            return getattr(_load(name), loader)(bundle, dev, **options), errors
        except BackendUnavailableError as e:
            errors.append(f"{name} ({dev}): {e}")
    return None, errors


def _load(name: str):
    return importlib.import_module(_MODULES[name])


#: fallback and limit warnings already given in this process (each is said once)
_WARNED: set = set()


def warn_once(message: str) -> None:
    """A RuntimeWarning the first time `message` comes up in this process, then silence."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def forget_warnings() -> None:
    """Say every warning again (a test that checks one is given)."""
    _WARNED.clear()


__all__ = ["ScoreRunner", "StepRunner", "KVState", "StepRow", "StepOutput", "RunnerLimits", "Runners",
           "open_runners", "create_runner", "candidates", "backend_names", "backend_name", "warn_once",
           "forget_warnings"]

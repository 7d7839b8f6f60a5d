"""Scoring backends: one small runner per engine, each imported only when chosen.

A runner takes padded `input_ids` / `attention_mask` (int64 [batch, seq]) and returns
the score (float32 [batch]). Everything else (text, batching, thresholds) is the
guard's job, so comparing two backends is just two runners on one input.
"""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any, Optional

from ..errors import BackendUnavailableError
from .base import Runner

# In order of preference for backend=None.
_BACKENDS = {
    "tensorrt": "siren_runtime.backends.tensorrt_runner",
    "onnxruntime": "siren_runtime.backends.onnxruntime_runner",
}
_ALIASES = {"ort": "onnxruntime", "trt": "tensorrt"}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def create_runner(bundle_dir: Path, manifest: dict[str, Any], backend: Optional[str],
                  device: Optional[str], **options) -> Runner:
    """Create the runner for `backend` (None = best available for `device`)."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        name = _ALIASES.get(backend.lower(), backend.lower())
        if name not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backend_names())}")
        return _load(name).create(bundle_dir, manifest, device=device, **options)
    errors = []
    for name in _BACKENDS:
        if name == "tensorrt" and (not manifest.get("engines") or device == "cpu"):
            continue  # nothing to fall back from
        try:
            runner = _load(name).create(bundle_dir, manifest, device=device, **options)
        except BackendUnavailableError as e:
            errors.append(f"{name}: {e}")
            continue
        if errors:
            warn_once(f"siren_runtime: {errors[0]}; falling back to {name}")
        return runner
    raise BackendUnavailableError("no scoring backend is usable here: " + "; ".join(errors))


def create_step_runner(bundle_dir: Path, manifest: dict[str, Any], backend: str, device: Optional[str], **options):
    """The streaming step runner of the same backend and device as the main runner."""
    return _load(backend).create_step(bundle_dir, manifest, device=device, **options)


def _load(name: str):
    return importlib.import_module(_BACKENDS[name])


def warn_once(message: str, _seen=set()) -> None:
    if message not in _seen:
        _seen.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


__all__ = ["Runner", "create_runner", "create_step_runner", "backend_names", "warn_once"]

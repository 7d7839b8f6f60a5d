"""TensorRT backend (torch-free): tensorrt + cuda-python.

Buffers are allocated once for the largest profile and reused; inputs are copied in and the
score copied out on one stream; batches larger than the engine's profile are split. A
TensorRT execution context is not thread-safe, so runs are serialized by a lock (one
context per guard; create more guards for parallel GPU streams).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..engine_compat import engine_incompatibility, pick_profile
from ..errors import BackendUnavailableError
from ..manifest import safe_relative_path
from .cuda_env import check, cudart, gpu_info, tensorrt_version


def usable_engine(manifest: dict[str, Any], graph: str = "model") -> tuple[Optional[dict], str]:
    """The newest engine of `graph` this machine can run, or (None, why not)."""
    entries = [e for e in manifest.get("engines") or [] if e.get("graph", "model") == graph]
    if not entries:
        return None, "the bundle has no TensorRT engine (build one with `siren build`)"
    gpu = gpu_info()
    reason = ""
    for entry in reversed(entries):
        reason = engine_incompatibility(entry, tensorrt_version(), gpu and gpu["compute_capability"])
        if reason is None:
            return entry, ""
    return None, reason


class TensorRTRunner:
    name = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: Path, entry: dict[str, Any]):
        import tensorrt as trt

        self._rt = cudart()
        self._lock = threading.Lock()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize {engine_path}; run `siren build` again")
        self._context = self._engine.create_execution_context()
        self._profiles = entry["profiles"]
        self._profile = 0
        self._stream = check(self._rt.cudaStreamCreate())
        self.max_batch = max(p["shapes"]["input_ids"]["max"][0] for p in self._profiles)
        self.max_seq = max(p["shapes"]["input_ids"]["max"][1] for p in self._profiles)
        rows, cols = self.max_batch, self.max_seq
        self._buffers = {
            "input_ids": check(self._rt.cudaMalloc(rows * cols * 8)),
            "attention_mask": check(self._rt.cudaMalloc(rows * cols * 8)),
            "score": check(self._rt.cudaMalloc(rows * 4)),
            "logits": check(self._rt.cudaMalloc(rows * 2 * 4)),
        }
        for name, pointer in self._buffers.items():
            self._context.set_tensor_address(name, int(pointer))

    def _run_chunk(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        rt = self._rt
        batch, seq = ids.shape
        index = pick_profile(self._profiles, batch, seq)
        if index < 0:
            raise ValueError(f"[{batch}, {seq}] is outside every profile of this engine (max sequence "
                             f"{self.max_seq}); rebuild with `siren build --max-seq`")
        if index != self._profile:
            self._context.set_optimization_profile_async(index, self._stream)
            self._profile = index
        self._context.set_input_shape("input_ids", (batch, seq))
        self._context.set_input_shape("attention_mask", (batch, seq))
        kind_h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, array in (("input_ids", ids), ("attention_mask", mask)):
            check(rt.cudaMemcpyAsync(self._buffers[name], array.ctypes.data, array.nbytes, kind_h2d, self._stream))
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError("TensorRT execution failed")
        out = np.empty(batch, dtype=np.float32)
        check(rt.cudaMemcpyAsync(out.ctypes.data, self._buffers["score"], out.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        check(rt.cudaStreamSynchronize(self._stream))
        return out

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        parts = []
        with self._lock:
            for start in range(0, ids.shape[0], self.max_batch):
                parts.append(self._run_chunk(ids[start:start + self.max_batch], mask[start:start + self.max_batch]))
        return np.concatenate(parts)

    def __del__(self):
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        for pointer in getattr(self, "_buffers", {}).values():
            try:
                rt.cudaFree(pointer)
            except Exception:
                pass


def create(bundle_dir: Path, manifest: dict[str, Any], device: Optional[str] = None, **_options) -> TensorRTRunner:
    if device == "cpu":
        raise BackendUnavailableError("TensorRT runs on a GPU; device='cpu' was asked for")
    if device not in (None, "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    if tensorrt_version() is None:
        raise BackendUnavailableError("TensorRT is not installed (pip install 'siren-deploy[tensorrt]')")
    if cudart() is None:
        raise BackendUnavailableError("cuda-python is not installed (pip install 'siren-deploy[tensorrt]')")
    entry, reason = usable_engine(manifest, "model")
    if entry is None:
        raise BackendUnavailableError(reason)
    return TensorRTRunner(safe_relative_path(Path(bundle_dir), entry["path"]), entry)


def create_step(bundle_dir: Path, manifest: dict[str, Any], device: Optional[str] = None, **_options):
    raise BackendUnavailableError("the TensorRT backend does not run the streaming step graph yet")

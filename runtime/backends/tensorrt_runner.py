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

from ..bundle import SCORE_IO, Bundle
from ..engine_compat import engine_incompatibility, pick_profile
from ..errors import BackendUnavailableError
from .base import RunnerLimits
from .cuda_env import check, cudart, gpu_info, tensorrt_version


def usable_engine(bundle: Bundle, graph: str = "model") -> tuple[Optional[dict], str]:
    """The newest engine record of `graph` this machine can run, or (None, why not)."""
    entries = [e.record for e in bundle.engines_for(graph)]
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
        self.max_batch = max(p["shapes"][SCORE_IO.inputs[0]]["max"][0] for p in self._profiles)
        self.max_seq = max(p["shapes"][SCORE_IO.inputs[0]]["max"][1] for p in self._profiles)
        self.limits = RunnerLimits(max_batch=self.max_batch, max_sequence=self.max_seq, max_padding=0.6)
        rows, cols = self.max_batch, self.max_seq
        ids, mask = SCORE_IO.inputs
        score, logits = SCORE_IO.outputs
        self._buffers = {
            ids: check(self._rt.cudaMalloc(rows * cols * 8)),
            mask: check(self._rt.cudaMalloc(rows * cols * 8)),
            score: check(self._rt.cudaMalloc(rows * 4)),
            logits: check(self._rt.cudaMalloc(rows * 2 * 4)),
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
        for name in SCORE_IO.inputs:
            self._context.set_input_shape(name, (batch, seq))
        kind_h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, array in zip(SCORE_IO.inputs, (ids, mask)):
            check(rt.cudaMemcpyAsync(self._buffers[name], array.ctypes.data, array.nbytes, kind_h2d, self._stream))
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError("TensorRT execution failed")
        out = np.empty(batch, dtype=np.float32)
        check(rt.cudaMemcpyAsync(out.ctypes.data, self._buffers[SCORE_IO.outputs[0]], out.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        check(rt.cudaStreamSynchronize(self._stream))
        return out

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        parts = []
        with self._lock:
            if self._context is None:
                raise RuntimeError("this tensorrt runner is closed")
            for start in range(0, ids.shape[0], self.max_batch):
                parts.append(self._run_chunk(ids[start:start + self.max_batch], mask[start:start + self.max_batch]))
        return np.concatenate(parts)

    def close(self) -> None:
        """Free the device buffers, the CUDA stream and the execution context."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        for pointer in getattr(self, "_buffers", {}).values():
            try:
                rt.cudaFree(pointer)
            except Exception:
                pass
        self._buffers = {}
        stream = getattr(self, "_stream", None)
        if stream is not None:
            try:
                rt.cudaStreamDestroy(stream)
            except Exception:
                pass
            self._stream = None
        self._context = None
        self._engine = None

    def __del__(self):
        self._release()


def create_score_runner(bundle: Bundle, device: str, **_options) -> TensorRTRunner:
    if device != "cuda":
        raise BackendUnavailableError(f"TensorRT runs on a GPU; device={device!r} was asked for")
    if tensorrt_version() is None:
        raise BackendUnavailableError("TensorRT is not installed (pip install 'siren-deploy[tensorrt]')")
    if cudart() is None:
        raise BackendUnavailableError("cuda-python is not installed (pip install 'siren-deploy[tensorrt]')")
    entry, reason = usable_engine(bundle, "model")
    if entry is None:
        raise BackendUnavailableError(reason)
    return TensorRTRunner(bundle.path(entry["path"]), entry)


def create_step_runner(bundle: Bundle, device: str, **_options):
    raise BackendUnavailableError("the TensorRT backend does not run the streaming step graph yet")

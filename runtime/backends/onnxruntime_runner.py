"""ONNX Runtime backend: CPU here; CUDA (or TensorRT) providers with onnxruntime-gpu."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import BackendUnavailableError
from ..manifest import safe_relative_path

_GPU_PROVIDERS = ("CUDAExecutionProvider",)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailableError(
            "onnxruntime is not installed (pip install 'siren-deploy[onnxruntime]', "
            "or onnxruntime-gpu for CUDA)") from e
    return ort


def physical_cores() -> int:
    """Threads for intra-op parallelism: hyperthreads only add contention for GEMMs."""
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        usable = len(os.sched_getaffinity(0))
        return max(1, min(len(cores) or usable, usable))
    except (OSError, AttributeError):
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeRunner:
    name = "onnxruntime"

    def __init__(self, session, device: str):
        self._session = session
        self.device = device
        self.providers = session.get_providers()
        self._output_names = ["score"]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (score,) = self._session.run(self._output_names, {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        })
        return np.asarray(score, dtype=np.float32).reshape(-1)


def create(bundle_dir: Path, manifest: dict[str, Any], device: Optional[str] = None,
           providers: Optional[Sequence[str]] = None, intra_op_threads: Optional[int] = None,
           model_key: str = "model", spinning: bool = True) -> OnnxRuntimeRunner:
    ort = _import_ort()
    model_path = safe_relative_path(Path(bundle_dir), manifest[model_key]["path"])
    available = ort.get_available_providers()
    gpu_available = any(p in available for p in _GPU_PROVIDERS)

    if providers is None:
        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
        if device == "cuda" and not gpu_available:
            raise BackendUnavailableError(
                "device='cuda' needs onnxruntime-gpu with CUDAExecutionProvider; this "
                f"onnxruntime offers {', '.join(available)}")
        use_gpu = device == "cuda" or (device is None and gpu_available)
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if use_gpu
                     else ["CPUExecutionProvider"])

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads or physical_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        if device is None and providers[0] != "CPUExecutionProvider":  # the GPU was only preferred
            from . import warn_once
            warn_once(f"ONNX Runtime could not use the GPU ({e}); scoring on the CPU")
            return create(bundle_dir, manifest, device="cpu", intra_op_threads=intra_op_threads,
                          model_key=model_key, spinning=spinning)
        raise BackendUnavailableError(f"ONNX Runtime could not load {model_path}: {e}") from e
    active = session.get_providers()
    used_device = "cuda" if any(p in active for p in _GPU_PROVIDERS) else "cpu"
    if device == "cuda" and used_device != "cuda":
        raise BackendUnavailableError("ONNX Runtime fell back to the CPU although device='cuda' was asked for")
    return OnnxRuntimeRunner(session, used_device)


class OnnxRuntimeStepRunner:
    """Runs the streaming step graph: (new ids, past KV, sums, count) -> (score, KV, sums, count)."""
    name = "onnxruntime"

    def __init__(self, session, device: str):
        self._session = session
        self.device = device
        self._outputs = ["score", "present_kv", "sums", "count"]
        kv_type = session.get_inputs()[1].type
        self.kv_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(kv_type)
        if self.kv_dtype is None:
            raise BackendUnavailableError(f"streaming graph keeps its KV cache as {kv_type}, which numpy cannot hold")

    def step(self, input_ids: np.ndarray, past_kv: np.ndarray, past_sums: np.ndarray, past_count: np.ndarray):
        score, kv, sums, count = self._session.run(self._outputs, {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "past_kv": np.ascontiguousarray(past_kv),
            "past_sums": np.ascontiguousarray(past_sums, dtype=np.float32),
            "past_count": np.ascontiguousarray(past_count, dtype=np.float32),
        })
        return np.asarray(score, dtype=np.float32).reshape(-1), kv, sums, count


def create_step(bundle_dir: Path, manifest: dict[str, Any], device: Optional[str] = None,
                **options) -> OnnxRuntimeStepRunner:
    # A step runs a handful of tokens: thread-pool spinning costs more than it saves.
    options.setdefault("spinning", False)
    runner = create(bundle_dir, manifest, device=device, model_key="streaming", **options)
    return OnnxRuntimeStepRunner(runner._session, runner.device)

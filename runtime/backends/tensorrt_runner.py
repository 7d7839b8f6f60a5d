"""TensorRT backend (torch-free): tensorrt + cuda-python, scoring and streaming.

Every TensorRT call whose result says whether it worked is checked; a failure while
opening (no CUDA, no driver, a plan from another TensorRT, no memory for a context) is a
``BackendUnavailableError`` so ``backend=None`` falls back, and a failure while running is
a ``RuntimeError`` naming the call. Engine bytes are read once and checked against the
manifest before TensorRT sees them. An execution context is not thread-safe, so each
runner serializes its runs (create more guards for parallel GPU streams).
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from ..bundle import SCORE_IO, STEP_IO, Bundle, GraphIO
from ..engine_compat import engine_gpu_warning, engine_incompatibility, pick_profile
from ..errors import BackendUnavailableError, BundleError, install_hint
from .base import Runner, RunnerLimits
from .cuda_env import CudaError, cudart, gpu_info, gpu_problem, tensorrt_version
from .cuda_memory import CudaStream, DeviceBuffer
from .device_kv import DeviceStepRunner


def usable_engine(bundle: Bundle, graph: str = "model") -> tuple[Optional[dict], str]:
    """The newest engine record of `graph` this machine can run, or (None, why not)."""
    entries = [e.record for e in bundle.engines_for(graph)]
    if not entries:
        what = "TensorRT engine" if graph == "model" else f"TensorRT {graph} engine"
        return None, f"the bundle has no {what} (build one with `siren build`)"
    gpu = gpu_info()
    reason, usable = "", []
    for entry in reversed(entries):
        reason = engine_incompatibility(entry, tensorrt_version(), gpu and gpu["compute_capability"])
        if reason is None:
            usable.append(entry)
    if usable:      # the newest built on this very GPU model, else the newest that loads (said once)
        entry = next((e for e in usable if e.get("gpu") == gpu["name"]), usable[0])
        warning = engine_gpu_warning(entry, gpu["name"])
        if warning:
            from . import warn_once
            warn_once(f"siren_runtime: {warning}")
        return entry, ""
    if gpu is None and tensorrt_version() is not None:
        reason += f" ({gpu_problem()})"
    return None, reason


#: the manifest's element types as TensorRT's DataType names
TRT_TYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32"}


class TensorRTEngine:
    """A deserialized engine and its one execution context. `dtypes`: each tensor's element
    type as the bundle declares it; a plan whose tensors differ is refused by name before the
    first run (buffers are sized from the bundle, so a mismatch would read or write past them)."""

    def __init__(self, plan: bytes, what: str, io: GraphIO, dtypes: Optional[dict] = None):
        import tensorrt as trt
        self._trt = trt
        self.what = what
        self._logger = trt.Logger(trt.Logger.WARNING)
        try:
            self._runtime = trt.Runtime(self._logger)
        except TypeError as e:   # pybind11 "returned nullptr": TensorRT could not start CUDA
            raise BackendUnavailableError(f"TensorRT could not start CUDA ({gpu_problem() or e})") from e
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize the {what} engine (damaged, or built "
                                          "by another TensorRT); run `siren build` again")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = set(names) - inputs
        if inputs != set(io.inputs) or not set(io.outputs) <= outputs:
            raise BundleError(f"the {what} engine has inputs {sorted(inputs)} and outputs {sorted(outputs)}; the "
                              f"bundle contract says {list(io.inputs)} -> {list(io.outputs)} (rebuild it)")
        self.outputs = tuple(n for n in names if n in outputs)
        for name, declared in (dtypes or {}).items():
            if name in names and declared in TRT_TYPES:
                have = engine.get_tensor_dtype(name)
                if have != getattr(trt.DataType, TRT_TYPES[declared]):
                    raise BundleError(f"the {what} engine's {name} is {getattr(have, 'name', have)}, the bundle "
                                      f"declares {declared} ({TRT_TYPES[declared]}): the plan was built from "
                                      "another export; rebuild it with `siren build`")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailableError(f"TensorRT could not create an execution context for the {what} engine "
                                          "(out of GPU memory?)")
        self.profile = 0

    def static_dim(self, name: str, axis: int) -> int:
        dim = int(self.engine.get_tensor_shape(name)[axis])
        if dim < 0:
            raise BundleError(f"the {self.what} engine's {name} has a dynamic axis {axis}")
        return dim

    def bind(self, stream: CudaStream, profile: int, shapes: dict, addresses: dict) -> None:
        """Select `profile`, set the input shapes and every tensor's address."""
        context = self.context
        if profile != self.profile:
            if not context.set_optimization_profile_async(profile, int(stream)):
                raise RuntimeError(f"TensorRT could not switch the {self.what} engine to profile {profile}")
            self.profile = profile
        for name, shape in shapes.items():
            if not context.set_input_shape(name, tuple(int(d) for d in shape)):
                raise ValueError(f"the {self.what} engine does not accept {name} of shape {list(shape)} "
                                 "(outside its profile; rebuild with `siren build`)")
        for name, pointer in addresses.items():
            if not context.set_tensor_address(name, int(pointer)):
                raise RuntimeError(f"TensorRT refused the address of {name} for the {self.what} engine")

    def execute(self, stream: CudaStream) -> None:
        if not self.context.execute_async_v3(int(stream)):
            raise RuntimeError(f"TensorRT failed to run the {self.what} engine (see the TensorRT log above)")

    def close(self) -> None:
        self.context = self.engine = self._runtime = None


class TensorRTRunner(Runner):
    """The full scoring graph. Batches larger than the engine's profiles are split."""
    name = "tensorrt"
    device = "cuda"

    def __init__(self, plan: bytes, entry: dict, dtypes: Optional[dict] = None):
        super().__init__()
        self._rt = cudart()
        self._lock = threading.Lock()
        self._profiles = entry["profiles"]
        self._engine = TensorRTEngine(plan, "model", SCORE_IO, dtypes)
        self._classes = self._engine.static_dim(SCORE_IO.outputs[1], 1)
        self.stream: Optional[CudaStream] = CudaStream(self._rt)
        self.max_batch = max(p["shapes"][SCORE_IO.inputs[0]]["max"][0] for p in self._profiles)
        self.max_seq = max(p["shapes"][SCORE_IO.inputs[0]]["max"][1] for p in self._profiles)
        self.limits = RunnerLimits(max_batch=self.max_batch, max_sequence=self.max_seq, max_padding=0.6)
        self._buffers = {name: DeviceBuffer(self._rt, name) for name in SCORE_IO.inputs + self._engine.outputs}

    def _run_chunk(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        batch, seq = ids.shape
        profile = pick_profile(self._profiles, batch, seq)
        if profile < 0:
            raise ValueError(f"[{batch}, {seq}] is outside every profile of this engine (at most {self.max_seq} "
                             f"tokens); rebuild with `siren build --max-seq {seq}`")
        sizes = {SCORE_IO.inputs[0]: ids.nbytes, SCORE_IO.inputs[1]: mask.nbytes,
                 SCORE_IO.outputs[0]: batch * 4, SCORE_IO.outputs[1]: batch * self._classes * 4}
        addresses = {name: self._buffers[name].ensure(sizes.get(name, batch * 4 * self._classes))
                     for name in self._buffers}
        self._engine.bind(self.stream, profile, {name: SCORE_IO.shape(name, batch=batch, sequence=seq)
                                                 for name in SCORE_IO.inputs}, addresses)
        self.stream.upload(addresses[SCORE_IO.inputs[0]], ids)
        self.stream.upload(addresses[SCORE_IO.inputs[1]], mask)
        self._engine.execute(self.stream)
        out = np.empty(batch, dtype=np.float32)
        self.stream.download(out, addresses[SCORE_IO.outputs[0]])
        self.stream.synchronize()
        return out

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        parts = []
        with self._lock:
            self.check_open()
            for start in range(0, ids.shape[0], self.max_batch):
                parts.append(self._run_chunk(ids[start:start + self.max_batch], mask[start:start + self.max_batch]))
        return np.concatenate(parts)

    def close(self) -> None:
        """Free the device buffers, the execution context and the CUDA stream."""
        with self._lock:
            super().close()

    def _release(self) -> None:
        for buffer in self._buffers.values():
            buffer.free()
        self._engine.close()
        stream, self.stream = self.stream, None
        stream.close()


class TensorRTStepRunner(DeviceStepRunner):
    """The batched streaming step engine; KV caches stay in device memory."""
    name = "tensorrt"

    def __init__(self, plan: bytes, entry: dict, bundle: Bundle):
        spec, max_length = bundle.streaming, bundle.inference.max_length
        shapes = entry["profiles"][0]["shapes"]
        max_batch = shapes[STEP_IO.inputs[0]]["max"][0]
        max_new = shapes[STEP_IO.inputs[0]]["max"][1]
        max_past = shapes["past_kv"]["max"][4]
        if max_new < max_length or max_past < max_length - 1:
            raise BackendUnavailableError(
                f"the streaming engine takes {max_new} new tokens after up to {max_past} past ones; streams of this "
                f"bundle need {max_length} and {max_length - 1}: rebuild it with `siren build`")
        self._engine = TensorRTEngine(plan, "streaming", STEP_IO, bundle.streaming.graph.tensor_dtypes)
        super().__init__(cudart(), spec, max_length, max_batch)

    def _execute(self, shapes: dict, out_shapes: dict, addresses: dict) -> None:
        self._engine.bind(self.stream, 0, shapes, addresses)
        self._engine.execute(self.stream)

    def _release_engine(self) -> None:
        self._engine.close()


def _require(device: str) -> None:
    if device != "cuda":
        raise BackendUnavailableError(f"TensorRT runs on a GPU; device={device!r} was asked for")
    if tensorrt_version() is None:
        raise BackendUnavailableError(f"TensorRT is not installed ({install_hint('tensorrt-cu12')}, or the "
                                      "tensorrt-cu13 extra: the one matching the driver's CUDA)")
    if cudart() is None:
        raise BackendUnavailableError(f"cuda-python is not installed ({install_hint('tensorrt-cu12')}, or the "
                                      "tensorrt-cu13 extra: the one matching the driver's CUDA)")


def _open(make, bundle: Bundle, graph: str):
    entry, reason = usable_engine(bundle, graph)
    if entry is None:
        raise BackendUnavailableError(reason)
    plan = bundle.read_verified(entry["path"])
    try:
        return make(plan, entry)
    except CudaError as e:
        raise BackendUnavailableError(str(e)) from e


def create_score_runner(bundle: Bundle, device: str, **_options) -> TensorRTRunner:
    _require(device)
    return _open(lambda plan, entry: TensorRTRunner(plan, entry, bundle.model.tensor_dtypes), bundle, "model")


def create_step_runner(bundle: Bundle, device: str, step_engine: Optional[dict] = None,
                       **_options) -> TensorRTStepRunner:
    """The bundle's recorded step engine; `step_engine`: an engine entry `siren build` has
    written but not yet recorded (its own check before it is)."""
    _require(device)
    if bundle.streaming is None:
        raise BackendUnavailableError("the bundle has no streaming step graph")
    if step_engine is not None:
        try:
            return TensorRTStepRunner((bundle.directory / step_engine["path"]).read_bytes(), step_engine, bundle)
        except CudaError as e:
            raise BackendUnavailableError(str(e)) from e
    return _open(lambda plan, entry: TensorRTStepRunner(plan, entry, bundle), bundle, "streaming")

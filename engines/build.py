"""`siren build`: the bundle's ONNX graph -> a strongly typed TensorRT engine in the bundle.

Precision lives in the graph (TensorRT 11 removed the weak-typing FP16/BF16 builder flags):
the engine's precision is the bundle's export dtype, so a bf16 engine comes from
`siren export --dtype bf16`. The engine is recorded in the manifest with what it was built
for (TensorRT version, GPU, compute capability, profiles) and its checksum.

The model engine is recorded as soon as it is built, so a failure in the riskier
streaming step engine (CumSum over a dynamic axis, an empty past, bf16 KV I/O) never costs
it; the step engine is recorded only when it loads and streams the calibration texts to
the model engine's scores, else it is dropped with a warning.
"""
from __future__ import annotations

import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from siren_runtime.backends.cuda_env import gpu_info, gpu_problem, tensorrt_version
from siren_runtime.bundle import EngineRecord, read_bundle, record_engine
from siren_runtime.errors import install_hint
from siren_runtime.graph_refs import check_external_files

from . import EngineUnavailableError
from .profiles import scorer_profiles, step_profiles

MIN_TENSORRT = (10, 12)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def require_tensorrt() -> tuple[object, str, dict]:
    """(tensorrt module, version, gpu info), or one clear EngineUnavailableError."""
    version = tensorrt_version()
    if version is None:
        raise EngineUnavailableError(f"TensorRT is not installed: {install_hint('tensorrt')} on an NVIDIA "
                                     "GPU machine (Jetson: use JetPack's TensorRT 10.x)")
    if _version_tuple(version) < MIN_TENSORRT:
        raise EngineUnavailableError(f"TensorRT {version} is too old; 10.12 or newer is needed")
    gpu = gpu_info()
    if gpu is None:
        raise EngineUnavailableError(f"no usable NVIDIA GPU: {gpu_problem()}; engines are built on the GPU "
                                     "that will run them")
    import tensorrt as trt
    return trt, version, gpu


def _progress_monitor(trt, stream):
    """TensorRT >= 10 reports build phases through IProgressMonitor; print them."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._started = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            print(f"  [{time.perf_counter() - self._started:7.1f}s] {phase_name} ({num_steps} steps)",
                  file=stream, flush=True)

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            pass
    return Monitor()


def _builder(trt, logger):
    try:
        return trt.Builder(logger)
    except TypeError as e:   # pybind11 "returned nullptr": TensorRT could not start CUDA
        raise EngineUnavailableError(f"TensorRT could not start CUDA ({gpu_problem() or e})") from e


def _use_timing_cache(config, timing_cache: Optional[Path]) -> None:
    """Start from the saved timing cache when it fits this GPU and TensorRT; else from an
    empty one (a cache from another machine is refused by TensorRT, never fatal here)."""
    data = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(data)      # None (a nullptr) for bytes TensorRT cannot read at all
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    warnings.warn(f"timing cache {timing_cache} was made by another GPU or TensorRT version, or is not a timing "
                  "cache; starting a fresh one", RuntimeWarning, stacklevel=3)
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        warnings.warn("TensorRT refused an empty timing cache; building without one", RuntimeWarning, stacklevel=3)


def _save_timing_cache(config, timing_cache: Optional[Path]) -> None:
    cache = config.get_timing_cache()
    if timing_cache is None or cache is None:
        return
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = timing_cache.with_name(timing_cache.name + ".tmp")
    tmp.write_bytes(bytes(memoryview(cache.serialize())))
    os.replace(tmp, timing_cache)


def _build_one(trt, onnx_path: Path, profiles, workspace_gib: Optional[float], timing_cache: Optional[Path],
               show_progress: bool) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = _builder(trt, logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for profile in profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, shape in profile.shapes.items():
            optimization_profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(optimization_profile)
    _use_timing_cache(config, timing_cache)
    monitor = _progress_monitor(trt, sys.stderr) if show_progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    plan = bytes(memoryview(serialized))
    _save_timing_cache(config, timing_cache)
    return plan


def _write_plan(bundle: Path, rel: str, plan: bytes) -> None:
    path = bundle / rel
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".plan.tmp")
    tmp.write_bytes(plan)
    os.replace(tmp, path)


def _record(bundle: Path, entry: dict) -> None:
    """Add (or replace) one engine in the manifest, with its file's checksum."""
    record_engine(bundle, EngineRecord(graph=entry["graph"], path=entry["path"], record=entry))


def build_engines(bundle: str | Path, precision: Optional[str] = None, max_batch: int = 32,
                  max_seq: Optional[int] = None, opt_batch: Optional[int] = None, opt_seq: Optional[int] = None,
                  workspace_gib: Optional[float] = None, timing_cache: Optional[str | Path] = None,
                  streaming: bool = True, verify: bool = True, show_progress: bool = True,
                  reference_bundle: Optional[str | Path] = None, stream_batch: int = 16) -> dict:
    """Build the model engine (and the streaming step engine) into `bundle`.

    Returns {"engines": [records], "warnings": [...]}: a step engine that fails to build or
    to pass its check is a warning, never a lost model engine."""
    from .verify import format_report, reference_unavailable, verify_bundle, verify_streaming_engine
    bundle = Path(bundle)
    contract = read_bundle(bundle)
    dtype = contract.model.dtype
    if precision is not None and precision != dtype:
        raise ValueError(f"{bundle} holds a {dtype} graph; precision lives in the graph, so a {precision} engine "
                         f"needs `siren export --dtype {precision}`")
    max_length = contract.inference.max_length
    profiles = scorer_profiles(max_length, max_batch, max_seq, opt_batch, opt_seq)  # validates before any GPU work
    step = None
    if streaming and contract.streaming is not None:
        s = contract.streaming
        step = step_profiles(max_length, s.kv_layers, s.kv_heads, s.head_dim, s.feature_dim, max_batch=stream_batch)
    trt, version, gpu = require_tensorrt()
    contract.verify()
    for spec, where in ((contract.model, "model."),) + (((contract.streaming.graph, "streaming."),) if step else ()):
        # TensorRT's parser opens every file the graph names: each must be one verify() just hashed
        check_external_files(contract.path(spec.path).read_bytes(), spec.path, spec.external_name(), where, bundle)
    notes = []
    unverified = reference_unavailable() if verify else None
    if unverified:
        notes.append(f"not verified: {unverified}")
    timing_cache = Path(timing_cache) if timing_cache else bundle / "engines" / "timing.cache"
    # the GPU model is in the name: an H100 and an H200 engine (same capability) live side by side
    gpu_model = re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower().removeprefix("nvidia ")).strip("-")[:40] or "gpu"
    tag = f"{dtype}-sm{gpu['compute_capability'].replace('.', '')}-{gpu_model}-trt{version}"

    def build(graph: str, rel: str, graph_profiles) -> dict:
        if show_progress:
            print(f"building the {graph} engine ({dtype}, {gpu['name']}, TensorRT {version}) ...", file=sys.stderr)
        started = time.perf_counter()
        plan = _build_one(trt, contract.path(rel), graph_profiles, workspace_gib, timing_cache, show_progress)
        entry = {"graph": graph, "path": f"engines/{graph}-{tag}.plan", "precision": dtype,
                 "tensorrt_version": version, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
                 "profiles": [p.to_dict() for p in graph_profiles],
                 "build_seconds": round(time.perf_counter() - started, 1)}
        _write_plan(bundle, entry["path"], plan)
        return entry

    model = build("model", contract.model.path, profiles)
    if verify and not unverified:
        if dtype != "fp32" and reference_bundle is None:
            model["verify"] = {"skipped": f"a {dtype} engine is verified against an fp32 export: pass "
                                          "--reference-bundle"}
            notes.append(f"not verified: {model['verify']['skipped']}")
        else:
            _record(bundle, model)
            model["verify"] = verify_bundle(bundle, backend="tensorrt", reference_bundle=reference_bundle)
            if show_progress:
                print(format_report(model["verify"]), file=sys.stderr)
    _record(bundle, model)
    entries = [model]

    if step is not None:
        try:
            entry = build("streaming", contract.streaming.graph.path, step)
            check = verify_streaming_engine(bundle, entry)
        except Exception as e:   # the model engine is already safe in the manifest
            entry, check = None, {"passed": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        if check["passed"]:
            entry["verify"] = check
            _record(bundle, entry)
            entries.append(entry)
        else:
            if entry is not None:
                (bundle / entry["path"]).unlink(missing_ok=True)
            notes.append(f"the streaming step engine was not kept ({check['reason']}); streams on this bundle "
                         "will rescore on TensorRT or step on ONNX Runtime")
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
        if show_progress:
            print(f"warning: {note}", file=sys.stderr)
    return {"engines": entries, "warnings": notes}

"""`siren build`: the bundle's ONNX graph -> a strongly typed TensorRT engine in the bundle.

Precision lives in the graph (TensorRT 11 removed the weak-typing FP16/BF16 builder flags):
the engine's precision is the bundle's export dtype, so a bf16 engine comes from
`siren export --dtype bf16`. The engine is recorded in the manifest with what it was built
for (TensorRT version, GPU, compute capability, profiles) and its checksum.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from siren_runtime.backends.cuda_env import gpu_info, tensorrt_version
from siren_runtime.bundle import describe_file, read_bundle, write_manifest

from . import EngineUnavailableError
from .profiles import scorer_profiles, step_profiles

MIN_TENSORRT = (10, 12)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def require_tensorrt() -> tuple[object, str, dict]:
    """(tensorrt module, version, gpu info), or one clear EngineUnavailableError."""
    version = tensorrt_version()
    if version is None:
        raise EngineUnavailableError("TensorRT is not installed: pip install 'siren-deploy[tensorrt]' on an NVIDIA "
                                     "GPU machine (Jetson: use JetPack's TensorRT 10.x)")
    if _version_tuple(version) < MIN_TENSORRT:
        raise EngineUnavailableError(f"TensorRT {version} is too old; 10.12 or newer is needed")
    gpu = gpu_info()
    if gpu is None:
        raise EngineUnavailableError("no usable NVIDIA GPU found (cuda-python sees none); engines are built on "
                                     "the GPU that will run them")
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


def _build_one(trt, onnx_path: Path, profiles, workspace_gib: Optional[float], timing_cache: Optional[Path],
               show_progress: bool) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
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
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, sys.stderr) if show_progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized))


def build_engines(bundle: str | Path, precision: Optional[str] = None, max_batch: int = 32,
                  max_seq: Optional[int] = None, opt_batch: Optional[int] = None, opt_seq: Optional[int] = None,
                  workspace_gib: Optional[float] = None, timing_cache: Optional[str | Path] = None,
                  streaming: bool = True, verify: bool = True, show_progress: bool = True,
                  reference_bundle: Optional[str | Path] = None) -> dict:
    bundle = Path(bundle)
    contract = read_bundle(bundle)
    dtype = contract.model.dtype
    if precision is not None and precision != dtype:
        raise ValueError(f"{bundle} holds a {dtype} graph; precision lives in the graph, so a {precision} engine "
                         f"needs `siren export --dtype {precision}`")
    max_length = contract.inference.max_length
    profiles = scorer_profiles(max_length, max_batch, max_seq, opt_batch, opt_seq)  # validates before any GPU work
    trt, version, gpu = require_tensorrt()
    contract.verify()
    timing_cache = Path(timing_cache) if timing_cache else bundle / "engines" / "timing.cache"

    jobs = [("model", contract.model.path, profiles)]
    if streaming and contract.streaming is not None:
        s = contract.streaming
        jobs.append(("streaming", s.graph.path, step_profiles(max_length, s.kv_layers, s.kv_heads, s.head_dim,
                                                              s.feature_dim)))
    tag = f"{dtype}-sm{gpu['compute_capability'].replace('.', '')}-trt{version}"
    entries = []
    for graph, rel, graph_profiles in jobs:
        if show_progress:
            print(f"building the {graph} engine ({dtype}, {gpu['name']}, TensorRT {version}) ...", file=sys.stderr)
        started = time.perf_counter()
        plan = _build_one(trt, contract.path(rel), graph_profiles, workspace_gib, timing_cache,
                          show_progress)
        seconds = time.perf_counter() - started
        engine_rel = f"engines/{graph}-{tag}.plan"
        path = bundle / engine_rel
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".plan.tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, path)
        entries.append({"graph": graph, "path": engine_rel, "precision": dtype, "tensorrt_version": version,
                        "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
                        "profiles": [p.to_dict() for p in graph_profiles], "build_seconds": round(seconds, 1)})

    manifest = read_bundle(bundle).raw()
    kept = [e for e in manifest.get("engines") or [] if e["path"] not in {x["path"] for x in entries}]
    manifest["engines"] = kept + entries
    for entry in entries:
        manifest["files"][entry["path"]] = describe_file(bundle, entry["path"])
    write_manifest(bundle, manifest)

    if verify and dtype != "fp32" and reference_bundle is None:
        report = {"skipped": f"a {dtype} engine is verified against an fp32 export: pass --reference-bundle"}
        if show_progress:
            print(f"not verified: {report['skipped']}", file=sys.stderr)
    elif verify:
        from .verify import format_report, verify_bundle
        report = verify_bundle(bundle, backend="tensorrt", reference_bundle=reference_bundle)
        if show_progress:
            print(format_report(report), file=sys.stderr)
    if verify:
        manifest = read_bundle(bundle).raw()
        for entry in manifest["engines"]:
            if entry["path"] == entries[0]["path"]:
                entry["verify"] = report
        write_manifest(bundle, manifest)
    return {"engines": entries}

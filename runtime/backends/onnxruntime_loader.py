"""ONNX Runtime's loader (Polygraphy's `backend/onnxrt/loader.py`): sessions over a bundle's
graphs with their weights read once (a private copy where the signed twin applies, pages
dropped after the load), the run options, and the checks made before a session exists (the
installed release, the graph's signature). The runners (onnxruntime_runner.py) take what this
opens."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from ..bundle import Bundle, GraphSpec, parse_version
from ..cpu_features import exact_u8s8
from ..errors import BackendUnavailableError, BundleError, install_hint
from ..graph_refs import check_external_files
from ..private_copy import DroppingPages, release_pages
from .ort_cuda_probe import CUDA_PROVIDER, cuda_provider_problem

log = logging.getLogger("siren_runtime.backends")


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailableError(
            f"onnxruntime is not installed ({install_hint('onnxruntime')}, or an onnxruntime-gpu extra for "
            "CUDA)") from e
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


def gpu_available() -> bool:
    """Whether the CUDA provider really starts here (not merely listed: see ort_cuda_probe)."""
    return cuda_provider_problem() is None


def open_session(graph, device: str, intra_op_threads: Optional[int] = None, spinning: bool = True,
                 external: Optional[dict] = None, prepack_weights: bool = False):
    """An InferenceSession on exactly `device`, from a graph path or the graph's bytes (then
    `external` maps each external-data file name, as the graph refers to it, to its
    contents, which ONNX Runtime uses in place: keep them alive with the session).

    prepack_weights (CPU): let ONNX Runtime re-lay every MatMul weight for its GEMM. Each
    session then holds its own re-laid copy (the Python API cannot share one between the
    scoring and step sessions), ~0.75x the weights file per session; without it the sessions
    read the one mapped copy in place. Measured at Qwen3-0.6B dims (docs/benchmarks.md):
    scoring throughput level, a feed of a few tokens ~1.7x slower, a one-token step level."""
    ort = _import_ort()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    problem = cuda_provider_problem() if device == "cuda" else None
    if problem:
        raise BackendUnavailableError(f"ONNX Runtime on the GPU: {problem}")
    providers = [CUDA_PROVIDER, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads or physical_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device == "cpu" and not prepack_weights:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if external:
        names = list(external)
        options.add_external_initializers_from_files_in_memory(
            names, [external[n] for n in names], [int(external[n].nbytes) for n in names])
        options.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
    what = graph if isinstance(graph, (str, Path)) else "the bundle's graph"
    try:
        session = ort.InferenceSession(graph if isinstance(graph, (str, Path)) else bytes(graph),
                                       sess_options=options, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise BackendUnavailableError(f"ONNX Runtime could not load {what} on the {device}: "
                                      f"{str(e).splitlines()[0][:300]}") from e
    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise BackendUnavailableError("ONNX Runtime did not enable CUDAExecutionProvider for this graph")
    return session


def signed_twin(bundle: Bundle, spec: GraphSpec, device: str):
    """The bundle's u8 x s8 twin of `spec` where this CPU computes it exactly (VNNI), else None."""
    twin = bundle.signed_twin
    if device != "cpu" or twin is None or spec.path not in twin.graphs:   # read_bundle checked the weights
        return None
    return twin if exact_u8s8() else None


def open_bundle_session(bundle: Bundle, spec: GraphSpec, device: str, intra_op_threads: Optional[int] = None,
                        spinning: bool = True, prepack_weights: bool = False):
    """(session, buffers it uses, int8 coding or None) for one of the bundle's graphs, loaded from the verified
    bytes of its files, never from their paths: ONNX Runtime would otherwise keep reading
    the weights file after the check (a later overwrite changes scores, a truncation is a
    SIGBUS)."""
    twin = signed_twin(bundle, spec, device)
    if twin is not None:
        log.info("%s: int8 weights coded u8 x s8 (exact and faster with VNNI on this CPU)", spec.path)
    graph_path = twin.graphs[spec.path] if twin else spec.path
    graph = bundle.read_verified(graph_path)
    name = spec.external_name()
    # every file the graph refers to is one the manifest names: ONNX Runtime would resolve any
    # other against the working directory and read it unhashed
    check_external_files(graph, graph_path, name, "model." if spec is bundle.model else "streaming.",
                         bundle.directory)
    external = {}
    if name is not None:
        external[name] = bundle.read_verified(spec.external_data, flip=twin.flip if twin else ())
    try:
        # pre-packing copies every weight panel: drop the mapped copy's pages as it goes, so the
        # weights are never resident twice (the packed copy is what the session keeps)
        with DroppingPages(external.values() if device == "cpu" and prepack_weights else ()):
            session = open_session(graph, device, intra_op_threads, spinning, external=external,
                                   prepack_weights=prepack_weights)
    except BackendUnavailableError as e:
        if _is_bad_file(e.__cause__):     # the checksums matched, but the bytes are no graph
            raise BundleError(f"{bundle.directory}: {spec.path}"
                              f"{' + ' + spec.external_data if spec.external_data else ''} is not a loadable "
                              f"ONNX graph ({str(e.__cause__).splitlines()[0][:200]}); the bundle was written "
                              "wrong or replaced with its checksums: re-export it") from None
        raise
    if device == "cuda" or prepack_weights:
        # the weights now live on the GPU or re-laid in the session: the mapped copy's pages
        # need not stay resident (one read again comes back from the private copy)
        for buffer in external.values():
            release_pages(buffer)
    return session, (graph, *external.values()), ("u8 x s8" if twin else None)


def _is_bad_file(error: Optional[BaseException]) -> bool:
    """Whether ONNX Runtime refused a graph for its contents (not for the device): a protobuf
    that does not parse, a graph that does not check, external weights of the wrong size."""
    if error is None:
        return False
    text = str(error)
    return (type(error).__name__ in ("InvalidProtobuf", "InvalidGraph") or "INVALID_PROTOBUF" in text
            or "INVALID_GRAPH" in text or "External initializer" in text)


def _signature_error(session, io, what: str) -> Optional[str]:
    names = tuple(i.name for i in session.get_inputs())
    if names != io.inputs:
        return f"{what} has inputs {list(names)}, the bundle contract says {list(io.inputs)}"
    return None


def run_options(device: str):
    """Per-run options: on the CPU, ONNX Runtime's arena gives back what a run used when it
    ends, so two sessions' arenas do not both stay at their largest batch's size."""
    ort = _import_ort()
    options = ort.RunOptions()
    if device == "cpu":
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def check_version(bundle: Bundle) -> None:
    """The bundle's `requires.onnxruntime` against the installed release, before a session
    exists: an int8 bundle's ops load on older releases and fail at the first run (blocked
    QuantizeLinear before 1.19) or at load with ONNX Runtime's own words (8-bit MatMulNBits
    before 1.22)."""
    need = bundle.requires.get("onnxruntime")
    if need is None:
        return
    ort = _import_ort()
    have = parse_version(ort.__version__)
    if have is not None and have < need:
        raise BackendUnavailableError(
            f"this bundle needs onnxruntime >= {'.'.join(map(str, need))} (installed: {ort.__version__}); "
            "upgrade onnxruntime (pip install -U onnxruntime)")

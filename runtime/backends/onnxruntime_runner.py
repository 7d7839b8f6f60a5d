"""ONNX Runtime backend: CPU here; the CUDA provider with onnxruntime-gpu.

Both loaders take a device ("cpu" or "cuda") that the selection in
:func:`siren_runtime.backends.open_runners` has already decided; a device this
onnxruntime cannot serve is a ``BackendUnavailableError``, never a silent switch.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..bundle import SCORE_IO, STEP_IO, Bundle, GraphSpec, StreamingSpec, parse_version
from ..cpu_features import exact_u8s8
from ..errors import BackendUnavailableError, BundleError
from ..graph_refs import check_external_files
from .base import BaseStepRunner, Runner, RunnerLimits, StepOutput, StepRow, check_state
from .cuda_env import CudaError, cudart
from .device_kv import DeviceStepRunner
from .ort_cuda_probe import CUDA_PROVIDER, cuda_provider_problem
from ..errors import install_hint
from ..private_copy import DroppingPages, release_pages

log = logging.getLogger("siren_runtime.backends")

_NUMPY_KV = {"fp32": np.float32, "fp16": np.float16}
_PADDING = {"cpu": 0.25, "cuda": 0.6}
#: padded tokens per call: on a CPU activations (and ONNX Runtime's arena) scale with it,
#: throughput does not (a 512-token GEMM already runs at full speed); a GPU needs big batches
_MAX_TOKENS = {"cpu": 512, "cuda": None}
#: whole texts on the step graph also write every token's keys and values (~230 KB a token at
#: Qwen3-0.6B dims): half the scoring graph's tokens per call keep a CPU's peak under the
#: weights file (0.94x vs 0.99x at 0.6B dims), at the same throughput
_STEP_SCORE_MAX_TOKENS = {"cpu": 256, "cuda": None}
_ORT_TYPES = {"tensor(float)": "fp32", "tensor(float16)": "fp16", "tensor(bfloat16)": "bf16"}


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


class _SessionRunner(Runner):
    """A runner over one ONNX Runtime session (closing drops it)."""
    _session = None

    def _live_session(self):
        self.check_open()
        return self._session

    def _release(self) -> None:
        self._session = None


class OnnxRuntimeRunner(_SessionRunner):
    """The full scoring graph."""
    name = "onnxruntime"

    def __init__(self, session, device: str, *, batch_invariant: bool = False, int8_coding: Optional[str] = None,
                 buffers: tuple = ()):
        problem = _signature_error(session, SCORE_IO, "the scoring graph")
        if problem:
            raise BundleError(f"{problem} (does model.path point at the right graph?)")
        super().__init__(int8_coding=int8_coding, buffers=buffers)
        #: a text's score does not depend on its batch (CPU, a bundle exported for it)
        self.batch_invariant = batch_invariant
        self._session = session
        self.device = device
        self.providers = session.get_providers()
        self._run_options = run_options(device)
        self.limits = RunnerLimits(max_padding=_PADDING[device], max_tokens=_MAX_TOKENS[device])

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        session = self._live_session()
        names = SCORE_IO.inputs
        (score,) = session.run([SCORE_IO.outputs[0]], {
            names[0]: np.ascontiguousarray(input_ids, dtype=np.int64),
            names[1]: np.ascontiguousarray(attention_mask, dtype=np.int64),
        }, self._run_options)
        return np.asarray(score, dtype=np.float32).reshape(-1)


class HostKVState:
    """A stream's KV cache in host memory, [layers, 2, kv_heads, capacity, head_dim], grown
    by doubling; only the first `length` positions are meaningful."""
    __slots__ = ("kv", "length", "owner")

    def __init__(self, kv: np.ndarray, length: int, owner):
        self.kv, self.length, self.owner = kv, length, owner

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


class OnnxRuntimeStepRunner(_SessionRunner, BaseStepRunner):
    """The batched streaming step graph; stream states live in host arrays."""
    name = "onnxruntime"
    state_type = HostKVState

    def __init__(self, session, device: str, spec: StreamingSpec, max_length: int, *,
                 int8_coding: Optional[str] = None, buffers: tuple = ()):
        problem = _signature_error(session, STEP_IO, "the streaming step graph")
        if problem:
            raise BundleError(f"{problem} (does streaming.path point at the right graph?)")
        kv = session.get_inputs()[STEP_IO.inputs.index("past_kv")].shape
        sums = session.get_inputs()[STEP_IO.inputs.index("past_sums")].shape
        declared = [spec.kv_layers, 2, None, spec.kv_heads, None, spec.head_dim]
        for axis, (have, want) in enumerate(zip(kv, declared)):
            if want is not None and isinstance(have, int) and have != want:
                raise BundleError(f"streaming: the step graph's past_kv axis {axis} is {have}, the manifest "
                                  f"says {want} (kv_layers/kv_heads/head_dim)")
        kv_type = session.get_inputs()[STEP_IO.inputs.index("past_kv")].type
        if _ORT_TYPES.get(kv_type) != spec.kv_dtype:
            raise BundleError(f"streaming.kv_dtype is {spec.kv_dtype}, the step graph's past_kv is {kv_type}")
        if len(sums) == 2 and isinstance(sums[1], int) and sums[1] != spec.feature_dim:
            raise BundleError(f"streaming.feature_dim is {spec.feature_dim}, the step graph has {sums[1]}")
        if spec.kv_dtype not in _NUMPY_KV:
            raise BackendUnavailableError(
                f"the step graph keeps its KV cache in {spec.kv_dtype}, which host arrays cannot hold; "
                "stream a bf16 bundle on TensorRT, or export fp32/fp16 for the CPU")
        super().__init__(int8_coding=int8_coding, buffers=buffers)
        self._session = session
        self.device = device
        self.providers = session.get_providers()
        self._spec = spec
        self._dtype = _NUMPY_KV[spec.kv_dtype]
        self._max_length = int(max_length)
        self._run_options = run_options(device)
        self.limits = RunnerLimits(max_sequence=self._max_length, max_padding=_PADDING[device],
                                   state_dtype=spec.kv_dtype, max_tokens=_MAX_TOKENS[device])

    def score_whole(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Scores of right-padded whole texts, as the scoring graph gives them (no stream state)."""
        session = self._live_session()
        s, batch = self._spec, input_ids.shape[0]
        (score,) = session.run([STEP_IO.outputs[0]], dict(zip(STEP_IO.inputs, (
            np.ascontiguousarray(input_ids, dtype=np.int64),
            np.asarray(attention_mask, dtype=np.int64).sum(axis=1),
            np.zeros(batch, dtype=np.int64),
            np.zeros((s.kv_layers, 2, batch, s.kv_heads, 0, s.head_dim), dtype=self._dtype),
            np.zeros((batch, s.feature_dim), dtype=np.float32)))), self._run_options)
        return np.asarray(score, dtype=np.float32).reshape(-1)

    def score_in_pieces(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """score_whole's scores for texts longer than a piece: through stream states of this
        call's own, so step() runs them WHOLE_TEXT_PIECE tokens at a time."""
        lengths = np.asarray(attention_mask, dtype=np.int64).sum(axis=1).tolist()
        zeros = np.zeros(self._spec.feature_dim, dtype=np.float32)
        outputs = self.step([StepRow(self.new_state(), 0, input_ids[b, :n].tolist(), zeros)
                             for b, n in enumerate(lengths)])
        return np.asarray([out.score for out in outputs], dtype=np.float32)

    def _empty(self, capacity: int) -> np.ndarray:
        s = self._spec
        return np.zeros((s.kv_layers, 2, s.kv_heads, capacity, s.head_dim), dtype=self._dtype)

    def new_state(self) -> HostKVState:
        return HostKVState(self._empty(0), 0, self)

    def fork(self, state: HostKVState, length: int) -> HostKVState:
        check_state(self, state, HostKVState, length)
        kv = self._empty(length)
        kv[:, :, :, :length] = state.kv[:, :, :, :length]
        return HostKVState(kv, length, self)

    def step(self, rows: Sequence[StepRow]) -> list[StepOutput]:
        rows = self.checked(rows)
        session = self._session
        if not rows:
            return []
        if max(len(row.new_ids) for row in rows) <= WHOLE_TEXT_PIECE:
            return self._step_once(session, rows)
        return self._step_in_pieces(session, rows)

    def _step_in_pieces(self, session, rows: Sequence[StepRow]) -> list[StepOutput]:
        """Rows with many new tokens (a long first feed, a whole text) run WHOLE_TEXT_PIECE
        tokens at a time, each piece a step over the ones before: attention costs piece x past,
        not length x length. A failure leaves every row's state at its resume point (its prefix
        intact), as a failed single step does."""
        resumes = [row.resume for row in rows]
        scores, pieces, sums = [0.0] * len(rows), [[] for _ in rows], [row.past_sums for row in rows]
        try:
            for start in range(0, max(len(row.new_ids) for row in rows), WHOLE_TEXT_PIECE):
                live = [i for i, row in enumerate(rows) if len(row.new_ids) > start]
                outputs = self._step_once(session, [
                    StepRow(rows[i].state, rows[i].resume + start, rows[i].new_ids[start:start + WHOLE_TEXT_PIECE],
                            sums[i]) for i in live])
                for i, out in zip(live, outputs):
                    scores[i], sums[i] = out.score, out.sums[-1]
                    pieces[i].append(out.sums)
        except BaseException:
            for row, resume in zip(rows, resumes):
                row.state.length = resume
            raise
        return [StepOutput(score=score, sums=np.concatenate(parts, axis=0)) for score, parts in zip(scores, pieces)]

    def _step_once(self, session, rows: Sequence[StepRow]) -> list[StepOutput]:
        s = self._spec
        batch = len(rows)
        past = max(row.resume for row in rows)
        width = max(len(row.new_ids) for row in rows)
        ids = np.zeros((batch, width), dtype=np.int64)
        # each row's past, then zeros to the longest (masked, but must be finite: 0 x NaN is NaN);
        # only the padding is zeroed, not the whole buffer
        past_kv = np.empty((s.kv_layers, 2, batch, s.kv_heads, past, s.head_dim), dtype=self._dtype)
        sums = np.empty((batch, s.feature_dim), dtype=np.float32)
        for b, row in enumerate(rows):
            ids[b, :len(row.new_ids)] = row.new_ids
            past_kv[:, :, b, :, :row.resume] = row.state.kv[:, :, :, :row.resume]
            past_kv[:, :, b, :, row.resume:] = 0
            sums[b] = row.past_sums
        new_lengths = np.asarray([len(r.new_ids) for r in rows], dtype=np.int64)
        past_lengths = np.asarray([r.resume for r in rows], dtype=np.int64)
        score, new_kv, new_sums = session.run(list(STEP_IO.outputs), dict(zip(STEP_IO.inputs, (
            ids, new_lengths, past_lengths, past_kv, sums))), self._run_options)
        # commit only now: buffers first (the one step that can fail), then the writes
        grown = []
        for row in rows:
            end = row.resume + len(row.new_ids)
            state = row.state
            if end > state.kv.shape[3]:
                # doubling, with room past a long first feed (its next step must not copy it all)
                bigger = self._empty(min(self._max_length, max(end + end // 4, 2 * state.kv.shape[3], 16)))
                bigger[:, :, :, :row.resume] = state.kv[:, :, :, :row.resume]
                grown.append(bigger)
            else:
                grown.append(state.kv)
        outputs = []
        for b, (row, kv) in enumerate(zip(rows, grown)):
            n = len(row.new_ids)
            kv[:, :, :, row.resume:row.resume + n] = new_kv[:, :, b, :, :n]
            row.state.kv, row.state.length = kv, row.resume + n
            outputs.append(StepOutput(score=float(score[b]), sums=np.array(new_sums[b, :n], dtype=np.float32)))
        return outputs


class StepGraphScoreRunner(Runner):
    """Whole texts scored on the streaming step graph (every token new, no past): on a CPU the
    guard then holds one ONNX Runtime session instead of two, so that session can pre-pack its
    weights (a few-token feed ~1.7x faster than reading them in place) within the memory of one
    copy of them. The step graph computes the same readout: running sums over the text's tokens
    (read at its last one) into the head."""
    name = "onnxruntime"

    def __init__(self, step: "OnnxRuntimeStepRunner", batch_invariant: bool):
        super().__init__(int8_coding=step.int8_coding)
        self._step = step
        self.device = step.device
        self.providers = step.providers
        self.batch_invariant = batch_invariant
        self.limits = RunnerLimits(max_sequence=step.limits.max_sequence, max_padding=_PADDING[step.device],
                                   max_tokens=_STEP_SCORE_MAX_TOKENS[step.device])

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.check_open()
        if input_ids.shape[1] <= WHOLE_TEXT_PIECE:
            return self._step.score_whole(input_ids, attention_mask)
        return self._step.score_in_pieces(input_ids, attention_mask)

    def _release(self) -> None:
        self._step.close()


#: a step (or a whole text) of more new tokens than this runs in pieces of it, each piece a
#: step over the ones before (chunked prefill): attention then costs piece x past instead of a
#: full length x length matrix (a 3,900-token trajectory at mid dims: 3.5 s in pieces of 256,
#: 8.6 s in one; scores within 1e-7)
WHOLE_TEXT_PIECE = 256


class OnnxRuntimeDeviceStepRunner(DeviceStepRunner):
    """The step graph on ONNX Runtime CUDA with stream states in device memory: every
    tensor is bound by address (IO binding), so a step moves only ids, lengths and sums
    across PCIe, never a KV cache. `memory` is the device type the bound addresses live
    on ("cuda"; the tests bind the CUDA stand-in's host-backed memory as "cpu")."""
    name = "onnxruntime"

    def __init__(self, session, spec: StreamingSpec, max_length: int, rt, memory: str = "cuda",
                 max_batch: int = 16, *, int8_coding: Optional[str] = None, buffers: tuple = ()):
        problem = _signature_error(session, STEP_IO, "the streaming step graph")
        if problem:
            raise BundleError(f"{problem} (does streaming.path point at the right graph?)")
        kv = bind_type(spec.kv_dtype)
        self._session = session
        self._memory = memory
        self._types = {"input_ids": np.int64, "new_lengths": np.int64, "past_lengths": np.int64, "past_kv": kv,
                       "past_sums": np.float32, "score": np.float32, "new_kv": kv, "sums": np.float32}
        super().__init__(rt, spec, max_length, max_batch, int8_coding=int8_coding, buffers=buffers)

    def _execute(self, shapes: dict, out_shapes: dict, addresses: dict) -> None:
        binding = self._session.io_binding()
        for name in STEP_IO.inputs:
            binding.bind_input(name, self._memory, 0, self._types[name], list(shapes[name]), addresses[name])
        for name in STEP_IO.outputs:
            binding.bind_output(name, self._memory, 0, self._types[name], list(out_shapes[name]), addresses[name])
        self.stream.synchronize()          # ONNX Runtime runs on its own stream: inputs must be in place
        self._session.run_with_iobinding(binding)

    def _release_engine(self) -> None:
        self._session = None


#: ONNX's element type number for bfloat16 (onnx.TensorProto.BFLOAT16), which IO binding takes
#: from onnxruntime 1.20 on where numpy has no bf16 type
_ONNX_BFLOAT16 = 16
BF16_BINDING_SINCE = (1, 20)


def bind_type(kv_dtype: str):
    """The element type IO binding takes for a KV cache: a numpy type, or for bf16 ONNX's
    type number (onnxruntime >= 1.20; older releases refused by name)."""
    if kv_dtype in _NUMPY_KV:
        return _NUMPY_KV[kv_dtype]
    if kv_dtype != "bf16":
        raise BackendUnavailableError(f"ONNX Runtime cannot bind a {kv_dtype} KV cache")
    ort = _import_ort()
    have = parse_version(ort.__version__)
    if have is not None and have < BF16_BINDING_SINCE:
        raise BackendUnavailableError(
            f"a bf16 KV cache is bound by ONNX element type, which onnxruntime "
            f"{'.'.join(map(str, BF16_BINDING_SINCE))} added (installed: {ort.__version__}); upgrade onnxruntime-gpu "
            "or stream this bundle on TensorRT")
    return _ONNX_BFLOAT16


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


def create_score_runner(bundle: Bundle, device: str, intra_op_threads: Optional[int] = None,
                        spinning: bool = True, prepack_weights: bool = False, **_options) -> OnnxRuntimeRunner:
    check_version(bundle)
    if bundle.model.dtype == "bf16" and device == "cpu":
        raise BackendUnavailableError("ONNX Runtime's CPU provider has no bf16 kernels")
    session, buffers, coding = open_bundle_session(bundle, bundle.model, device, intra_op_threads, spinning,
                                                   prepack_weights)
    return OnnxRuntimeRunner(session, device, batch_invariant=device == "cpu" and bundle.model.batch_invariant,
                             int8_coding=coding, buffers=buffers)


def create_step_runner(bundle: Bundle, device: str, intra_op_threads: Optional[int] = None,
                       prepack_weights: bool = False, **_options) -> OnnxRuntimeStepRunner:
    check_version(bundle)
    if bundle.streaming is None:
        raise BackendUnavailableError("the bundle has no streaming step graph")
    if bundle.streaming.kv_dtype not in _NUMPY_KV and device == "cpu":
        raise BackendUnavailableError(f"a {bundle.streaming.kv_dtype} KV cache cannot stream on the CPU")
    # A step runs a handful of tokens: thread-pool spinning costs more than it saves.
    session, buffers, coding = open_bundle_session(bundle, bundle.streaming.graph, device, intra_op_threads,
                                                   spinning=False, prepack_weights=prepack_weights)
    if device == "cuda" and cudart() is not None and bundle.streaming.kv_dtype in (*_NUMPY_KV, "bf16"):
        try:
            return OnnxRuntimeDeviceStepRunner(session, bundle.streaming, bundle.inference.max_length, cudart(),
                                               int8_coding=coding, buffers=buffers)
        except CudaError as e:
            raise BackendUnavailableError(str(e)) from e
    # without cuda-python the states stay on the host (ONNX Runtime copies them each step)
    return OnnxRuntimeStepRunner(session, device, bundle.streaming, bundle.inference.max_length,
                                 int8_coding=coding, buffers=buffers)


def create_shared_runners(bundle: Bundle, device: str, intra_op_threads: Optional[int] = None,
                          prepack_weights: Optional[bool] = None, **_options):
    """(score runner, step runner) over ONE session of the step graph, on a CPU: whole texts,
    streams and prefixes all run on it, so it may pre-pack its weights (default) and still
    hold one copy of them. None where that does not apply (a GPU, no step graph, a KV cache
    host arrays cannot hold): the caller opens the graphs separately."""
    if device != "cpu" or bundle.streaming is None or bundle.streaming.kv_dtype not in _NUMPY_KV:
        return None
    prepack = True if prepack_weights is None else bool(prepack_weights)
    step = create_step_runner(bundle, device, intra_op_threads, prepack_weights=prepack)
    # without pre-packing a one-row product takes the GEMV path; bundles exported for it
    # (model.batch_invariant) run their head on two rows, pre-packed sessions never take it
    # (int8 bundles quantize activations with one scale per batch: never invariant)
    invariant = "quantization" not in bundle.manifest and (prepack or bundle.model.batch_invariant)
    return StepGraphScoreRunner(step, batch_invariant=invariant), step

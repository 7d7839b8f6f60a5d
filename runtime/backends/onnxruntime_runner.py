"""ONNX Runtime backend: CPU here; the CUDA provider with onnxruntime-gpu. The runners and
their loaders; sessions are opened by onnxruntime_loader.py.

Both loaders take a device ("cpu" or "cuda") that the selection in
:func:`siren_runtime.backends.open_runners` has already decided; a device this
onnxruntime cannot serve is a ``BackendUnavailableError``, never a silent switch.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from ..bundle import DYNAMIC_AXES, SCORE_IO, STEP_IO, Bundle, StreamingSpec, parse_version
from ..errors import BackendUnavailableError, BundleError
from .base import BaseStepRunner, Runner, RunnerLimits, StepOutput, StepRow, check_state
from .cuda_env import CudaError, cudart
from .device_kv import DeviceStepRunner
from .onnxruntime_loader import _import_ort, _signature_error, check_version, open_bundle_session, run_options

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
        fixed = STEP_IO.shape("past_kv", **spec.sizes(batch=0, past=0))
        declared = [None if axis in DYNAMIC_AXES else size for axis, size in zip(STEP_IO.axes["past_kv"], fixed)]
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
            np.zeros(STEP_IO.shape("past_kv", **s.sizes(batch=batch, past=0)), dtype=self._dtype),
            np.zeros(STEP_IO.shape("past_sums", **s.sizes(batch=batch)), dtype=np.float32)))), self._run_options)
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
        past_kv = np.empty(STEP_IO.shape("past_kv", **s.sizes(batch=batch, past=past)), dtype=self._dtype)
        sums = np.empty(STEP_IO.shape("past_sums", **s.sizes(batch=batch)), dtype=np.float32)
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

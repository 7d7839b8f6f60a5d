"""The device-KV step's host work does not grow with streams or layers: one batched copy
gathers every stream's cache, one scatters the new keys/values (and a grown cache's
prefix), inputs are staged in pinned memory, and grown caches are allocated
stream-ordered; the copies the bindings convert grow with streams only (one 3-D entry per
stream, every layer and head in it). Checked on the CUDA stand-in (which counts every
cuda-python call and every copy entry) with an emulated step engine that verifies,
position by position, that the past it is handed is exactly what was scattered for that
stream, at 2 and 36 layers and 1 to 64 streams; and on real bundles against llm-siren
through every copy path (3-D batch, row batch, 2-D copies)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from corpus import CORPUS, LONG
from helpers import TOL, random_chunks

#: allocation calls: amortized by doubling, so not part of the per-step count
ALLOCATION_CALLS = {"cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync", "cudaMallocHost", "cudaFreeHost"}


def expected_kv(token: int, layer_kv: int, head: int, dim: int) -> float:
    """What the emulated engine writes for a token (so a gathered past can be checked)."""
    return token * 1000.0 + layer_kv * 10.0 + head + dim / 100.0


def emulated_runner(standin, layers: int, heads: int = 2, head_dim: int = 4, max_length: int = 64,
                    max_batch: int = 64):
    from siren_runtime.backends.device_kv import DeviceStepRunner
    from siren_runtime.bundle import STEP_IO, GraphSpec, StreamingSpec

    spec = StreamingSpec(graph=GraphSpec(path="step.onnx", external_data=None, dtype="fp32", io=STEP_IO),
                         kv_layers=layers, kv_heads=heads, head_dim=head_dim, kv_dtype="fp32", feature_dim=3)

    class EmulatedStep(DeviceStepRunner):
        """A step 'engine' in numpy over the stand-in's memory."""
        name = "emulated"

        def __init__(self):
            super().__init__(standin.cudart, spec, max_length, max_batch)
            self.history: dict[int, list[int]] = {}      # batch row -> the tokens its stream holds

        def _execute(self, shapes, out_shapes, addresses):
            gpu = standin.gpu

            def tensor(name, shape, dtype):
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                return gpu.device_view(addresses[name], nbytes, name).view(dtype).reshape(shape)
            ids = tensor("input_ids", shapes["input_ids"], np.int64)
            new_lengths = tensor("new_lengths", shapes["new_lengths"], np.int64)
            past_lengths = tensor("past_lengths", shapes["past_lengths"], np.int64)
            past = tensor("past_kv", shapes["past_kv"], np.float32)
            lk = np.arange(layers * 2).reshape(layers, 2)[:, :, None, None]
            h = np.arange(heads)[None, None, :, None]
            d = np.arange(head_dim)[None, None, None, :]
            for b, tokens in self.current.items():        # the past of row b is its stream's own tokens
                assert past_lengths[b] == len(tokens)
                for t, token in enumerate(tokens):
                    np.testing.assert_array_equal(past[:, :, b, :, t, :], expected_kv(token, lk, h, d).astype(np.float32))
            new_kv = tensor("new_kv", out_shapes["new_kv"], np.float32)
            for b in range(ids.shape[0]):
                for t in range(int(new_lengths[b])):
                    new_kv[:, :, b, :, t, :] = expected_kv(int(ids[b, t]), lk, h, d)
            tensor("score", out_shapes["score"], np.float32)[:] = 0.5
            tensor("sums", out_shapes["sums"], np.float32)[:] = 1.0

    return EmulatedStep()


def run_steps(runner, standin, streams: int, steps: int, seed: int = 0, entries: list = None) -> list[int]:
    """Feed `streams` streams `steps` times (1-3 new tokens each, one first step of a few);
    returns the host calls of each step, allocations left out (and appends each step's copy
    entries to `entries`)."""
    from siren_runtime.backends.base import StepRow
    rng = random.Random(seed)
    states = [runner.new_state() for _ in range(streams)]
    held: list[list[int]] = [[] for _ in range(streams)]
    counts = []
    for step in range(steps):
        rows, new = [], []
        for j, state in enumerate(states):
            ids = [rng.randrange(1, 500) for _ in range(rng.randint(1, 3 if step else 5))]
            rows.append(StepRow(state, len(held[j]), ids, np.zeros(3, np.float32)))
            new.append(ids)
        runner.current = {b: list(held[j]) for b, j in enumerate(range(streams))}
        before, entries_before = dict(standin.gpu.calls), standin.gpu.copy_entries
        runner.step(rows)
        counts.append(sum(n - before.get(name, 0) for name, n in standin.gpu.calls.items()
                          if name not in ALLOCATION_CALLS))
        if entries is not None:
            entries.append(standin.gpu.copy_entries - entries_before)
        for j, ids in enumerate(new):
            held[j].extend(ids)
    if standin.gpu.async_alloc:                            # every cache was allocated stream-ordered
        assert all(state.ptr in standin.gpu.async_pointers for state in states)
    return counts


@pytest.mark.parametrize("binding_line", [12, 13])
def test_host_calls_per_step_are_constant_and_entries_grow_with_streams_only(binding_line):
    from trt_standin import StandIn
    per_config, entries = {}, {}
    for layers in (2, 36):
        for streams in (1, 8, 64):
            standin = StandIn(binding_line=binding_line)
            runner = emulated_runner(standin, layers)
            entries[(layers, streams)] = []
            counts = run_steps(runner, standin, streams, steps=6, entries=entries[(layers, streams)])
            assert standin.gpu.calls["cudaMemcpy3DBatchAsync"] >= 6
            assert standin.gpu.calls["cudaMemcpy2DAsync"] == standin.gpu.calls["cudaMemcpyBatchAsync"] == 0
            assert standin.gpu.calls["cudaMallocAsync"] >= streams and standin.gpu.calls["cudaMalloc"] <= 16
            per_config[(layers, streams)] = counts[1:]          # the first step has no past to gather
            runner.close()
            assert standin.gpu.live_bytes() == 0 and not standin.gpu.pinned
    # the same count for every config and step; one stream alone skips the zero-fill of
    # shorter pasts (a single memset: there is no shorter past to pad)
    many = {c for (_, streams), counts in per_config.items() if streams > 1 for c in counts}
    one = {c for (_, streams), counts in per_config.items() if streams == 1 for c in counts}
    assert len(many) == 1 and one == {many.pop() - 1}, per_config
    assert max(one) + 1 <= 10
    # entries: 4 uploads and 2 downloads, one gather entry per stream with a past, one scatter
    # entry per stream and one per grown cache: O(streams), the same at 2 and 36 layers
    for streams in (1, 8, 64):
        assert entries[(2, streams)] == entries[(36, streams)], entries
        assert max(entries[(36, streams)]) <= 3 * streams + 6, entries


def test_row_batches_convert_an_entry_per_row_still_constant_calls():
    """A binding with cudaMemcpyBatchAsync but not its 3-D form: one call per gather still,
    but one entry per (stream, layer, k/v, head) row, the host cost the 3-D copy removes."""
    from trt_standin import StandIn
    entries = {}
    for layers in (2, 36):
        standin = StandIn(batch_copy_3d=False)
        runner = emulated_runner(standin, layers)
        entries[layers] = []
        run_steps(runner, standin, 8, steps=4, entries=entries[layers])
        assert standin.gpu.calls["cudaMemcpyBatchAsync"] >= 4 and standin.gpu.calls["cudaMemcpy2DAsync"] == 0
        runner.close()
        assert standin.gpu.live_bytes() == 0
    assert min(entries[36][1:]) > 8 * 36 * 2 * 2 > max(entries[2][1:])


@pytest.mark.parametrize("refused, path", [
    ({"cudaMemcpy3DBatchAsync": 801}, "cudaMemcpyBatchAsync"),
    ({"cudaMemcpy3DBatchAsync": 801, "cudaMemcpyBatchAsync": 801}, "cudaMemcpy2DAsync")])
def test_a_driver_that_refuses_a_batched_copy_falls_back_once_still_exact(refused, path, caplog):
    """A driver that answers a batched copy with an error (not "no driver") is said once; the
    refused copies are replayed on the older path and every later step takes it; the pasts
    gathered stay exact."""
    from trt_standin import StandIn
    standin = StandIn(refuse_batch=refused)
    runner = emulated_runner(standin, 4)
    with caplog.at_level("WARNING", logger="siren_runtime.backends"):
        run_steps(runner, standin, 8, steps=4)
    warned = [r.getMessage() for r in caplog.records if r.name == "siren_runtime.backends"]
    assert len(warned) == len(refused) and all("(801)" in w and "from now on" in w for w in warned), warned
    assert all(standin.gpu.calls[name] == 1 for name in refused)            # tried once each, then not again
    assert standin.gpu.calls[path] > 0
    runner.close()
    assert standin.gpu.live_bytes() == 0


def test_other_batched_copy_errors_are_raised_not_papered_over():
    from trt_standin import StandIn
    from siren_runtime.backends.cuda_env import CudaError
    standin = StandIn(refuse_batch={"cudaMemcpy3DBatchAsync": 2})          # out of memory: not a refusal
    runner = emulated_runner(standin, 2)
    with pytest.raises(CudaError, match=r"\(2\) in cudaMemcpy3DBatchAsync"):
        run_steps(runner, standin, 4, steps=3)
    assert standin.gpu.calls["cudaMemcpyBatchAsync"] == standin.gpu.calls["cudaMemcpy2DAsync"] == 0
    runner.close()


def test_a_legacy_stream_handle_is_refused():
    from trt_standin import StandIn
    from siren_runtime.backends.cuda_memory import CudaStream
    standin = StandIn()
    for legacy in (0, 1):
        with pytest.raises(ValueError, match="legacy NULL stream"):
            CudaStream(standin.cudart, handle=legacy)


def test_older_bindings_fall_back_to_pitched_copies_still_exact():
    """Without batched copies (or below CUDA 12.8 in the runtime or the driver) and
    without stream-ordered allocation, the 2D-copy path runs and the gathered pasts still
    check out; its host calls then grow with streams x layers."""
    from trt_standin import StandIn
    for knobs in ({"batch_copy": False, "batch_copy_3d": False, "async_alloc": False}, {"driver_version": 12040}):
        counts = {}
        for streams in (1, 8):
            standin = StandIn(**knobs)
            runner = emulated_runner(standin, 4)
            counts[streams] = run_steps(runner, standin, streams, steps=4)[1:]
            assert standin.gpu.calls["cudaMemcpyBatchAsync"] == standin.gpu.calls["cudaMemcpy3DBatchAsync"] == 0
            assert standin.gpu.calls["cudaMemcpy2DAsync"] > 0
            runner.close()
            assert standin.gpu.live_bytes() == 0
        assert min(counts[8]) > max(counts[1])


@pytest.mark.parametrize("knobs", [{}, {"binding_line": 13}, {"batch_copy_3d": False},
                                   {"batch_copy": False, "batch_copy_3d": False, "async_alloc": False}],
                         ids=["cuda-bindings-12.9", "cuda-bindings-13", "row-batch", "older-binding"])
def test_device_streams_equal_llm_siren_on_every_copy_path(all_layers, monkeypatch, knobs):
    """16 streams of random chunks, fed together through ONNX Runtime's IO-binding step runner
    over the stand-in's device memory: every score equals llm-siren's on the prefix."""
    from trt_standin import StandIn
    from siren_runtime import SirenGuard
    from siren_runtime.backends import Runners, open_runners
    from siren_runtime.backends.onnxruntime_loader import open_session
    from siren_runtime.backends.onnxruntime_runner import OnnxRuntimeDeviceStepRunner
    from siren_runtime.bundle import read_bundle
    standin = StandIn(**knobs).install(monkeypatch)
    contract = read_bundle(all_layers.bundle)
    session = open_session(contract.path(contract.streaming.graph.path), "cpu", spinning=False)
    step = OnnxRuntimeDeviceStepRunner(session, contract.streaming, contract.inference.max_length,
                                       standin.cudart, memory="cpu", max_batch=8)
    score = open_runners(contract, backend="onnxruntime", device="cpu", streaming=False).score
    rng = random.Random(11)
    texts = [CORPUS[i % len(CORPUS)] + " " + LONG[:120] for i in range(16)]
    plans = [random_chunks(t, rng, 1, 30) for t in texts]
    with SirenGuard(contract, Runners(score, step)) as guard:
        sessions = [guard.stream() for _ in texts]
        while any(plans):
            live = [(s, p.pop(0)) for s, p in zip(sessions, plans) if p]
            guard.feed_batch([s for s, _ in live], [d for _, d in live])
        ours = [s.score.score for s in sessions]
        ref = [r.score for r in all_layers.reference.score_batch([s.text for s in sessions])]
        assert max(abs(a - b) for a, b in zip(ours, ref)) <= TOL
    assert standin.gpu.live_bytes() == 0 and not standin.gpu.pinned and standin.gpu.streams == set()
    blocks, rows = standin.gpu.calls["cudaMemcpy3DBatchAsync"], standin.gpu.calls["cudaMemcpyBatchAsync"]
    assert (blocks > 0) == knobs.get("batch_copy_3d", True)
    assert (rows > 0) == (knobs.get("batch_copy", True) and not knobs.get("batch_copy_3d", True))


def _bf16_cast_step_graph(path, layers: int, heads: int, head_dim: int, features: int) -> None:
    """A step graph of STEP_IO's signature that only moves a bf16 KV cache: each new token's
    keys/values are its id (cast to bf16), the score is the sum of the past it was handed
    (cast back to fp32). ONNX Runtime's CPU provider runs Cast on bf16, not the real graph."""
    import onnx
    from onnx import TensorProto, helper
    ones = helper.make_tensor("ones", TensorProto.FLOAT, [layers, 2, 1, heads, 1, head_dim],
                              [1.0] * (layers * 2 * heads * head_dim))
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "kv_axes"], ["ids_kv"]),           # [1, 1, B, 1, new, 1]
        helper.make_node("Mul", ["ids_kv", "ones"], ["new_f"]),
        helper.make_node("Cast", ["new_f"], ["new_kv"], to=TensorProto.BFLOAT16),
        helper.make_node("Cast", ["past_kv"], ["past_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["past_f", "sum_axes"], ["score"], keepdims=0),
        helper.make_node("Unsqueeze", ["ids_f", "two"], ["ids_col"]),             # [B, new, 1]
        helper.make_node("Mul", ["ids_col", "zero"], ["zeros"]),
        helper.make_node("Unsqueeze", ["past_sums", "one"], ["sums_row"]),        # [B, 1, F]
        helper.make_node("Add", ["sums_row", "zeros"], ["sums"]),
    ]
    consts = [ones, helper.make_tensor("kv_axes", TensorProto.INT64, [4], [0, 1, 3, 5]),
              helper.make_tensor("sum_axes", TensorProto.INT64, [5], [0, 1, 3, 4, 5]),
              helper.make_tensor("two", TensorProto.INT64, [1], [2]), helper.make_tensor("one", TensorProto.INT64, [1], [1]),
              helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    graph = helper.make_graph(nodes, "bf16_kv", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "new"]),
        helper.make_tensor_value_info("new_lengths", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("past_lengths", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("past_kv", TensorProto.BFLOAT16, [layers, 2, "batch", heads, "past", head_dim]),
        helper.make_tensor_value_info("past_sums", TensorProto.FLOAT, ["batch", features])], [
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("new_kv", TensorProto.BFLOAT16, [layers, 2, "batch", heads, "new", head_dim]),
        helper.make_tensor_value_info("sums", TensorProto.FLOAT, ["batch", "new", features])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def test_bf16_kv_streams_through_onnxruntime_io_binding(tmp_path, monkeypatch):
    """A bf16 KV cache is bound by ONNX element type (onnxruntime >= 1.20): each stream's past,
    gathered from device memory as 2-byte elements, is exactly the ids it was fed."""
    from trt_standin import StandIn
    from siren_runtime.backends.base import StepRow
    from siren_runtime.backends.onnxruntime_loader import open_session
    from siren_runtime.backends.onnxruntime_runner import OnnxRuntimeDeviceStepRunner, bind_type
    from siren_runtime.bundle import STEP_IO, GraphSpec, StreamingSpec
    layers, heads, head_dim, features = 3, 2, 4, 2
    _bf16_cast_step_graph(tmp_path / "step.onnx", layers, heads, head_dim, features)
    spec = StreamingSpec(graph=GraphSpec(path="step.onnx", external_data=None, dtype="bf16", io=STEP_IO),
                         kv_layers=layers, kv_heads=heads, head_dim=head_dim, kv_dtype="bf16", feature_dim=features)
    assert bind_type("bf16") == 16
    standin = StandIn().install(monkeypatch)
    session = open_session(tmp_path / "step.onnx", "cpu", spinning=False)
    runner = OnnxRuntimeDeviceStepRunner(session, spec, 64, standin.cudart, memory="cpu", max_batch=8)
    fed = [[3, 5], [7], [11, 13, 17]]
    states = [runner.new_state() for _ in fed]
    sums = np.zeros(features, np.float32)
    runner.step([StepRow(s, 0, ids, sums) for s, ids in zip(states, fed)])
    more = [[19], [23, 29], [31]]
    out = runner.step([StepRow(s, len(ids), extra, sums) for s, ids, extra in zip(states, fed, more)])
    per_token = layers * 2 * heads * head_dim
    assert [o.score for o in out] == [float(sum(ids) * per_token) for ids in fed]
    out = runner.step([StepRow(s, len(a) + len(b), [2], sums) for s, a, b in zip(states, fed, more)])
    assert [o.score for o in out] == [float((sum(a) + sum(b)) * per_token) for a, b in zip(fed, more)]
    runner.close()
    assert standin.gpu.live_bytes() == 0


def test_bf16_binding_is_refused_by_name_before_onnxruntime_1_20(monkeypatch):
    import onnxruntime
    from siren_runtime.backends.onnxruntime_runner import bind_type
    from siren_runtime.errors import BackendUnavailableError
    monkeypatch.setattr(onnxruntime, "__version__", "1.19.2")
    with pytest.raises(BackendUnavailableError, match=r"onnxruntime 1\.20 added \(installed: 1\.19\.2\)"):
        bind_type("bf16")
    assert bind_type("fp16") is np.float16

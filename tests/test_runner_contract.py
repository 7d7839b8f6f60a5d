"""The runner contract: every runner passes the same checks, on the tiny bundle. ONNX Runtime's
(the scoring graph, whole texts on the step graph, host KV states, device KV states bound by
IO binding) on the real ONNX Runtime; TensorRT's score and step runners, and the device
states, on the CPU stand-in of TensorRT and cuda-python (tests/trt_standin.py)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import TOL


def _open(bundle_dir):
    from siren_runtime.backends import open_runners
    from siren_runtime.bundle import read_bundle
    bundle = read_bundle(bundle_dir)
    return bundle, open_runners(bundle, backend="onnxruntime", device="cpu")


@pytest.fixture(scope="module")
def opened(all_layers):
    return _open(all_layers.bundle)


@pytest.fixture(scope="module")
def trt_bundle(all_layers, tmp_path_factory):
    """The tiny bundle with TensorRT engines built on the stand-in."""
    import shutil
    from trt_standin import StandIn
    from siren_engines.build import build_engines
    bundle = tmp_path_factory.mktemp("contract-trt") / "bundle"
    shutil.copytree(all_layers.bundle, bundle)
    with pytest.MonkeyPatch.context() as mp:
        StandIn().install(mp)
        build_engines(bundle, max_batch=4, stream_batch=3, show_progress=False)
    return bundle


def _graph_score(bundle, request):
    from siren_runtime.backends import open_runners
    from siren_runtime.bundle import read_bundle
    return open_runners(read_bundle(bundle), backend="onnxruntime", device="cpu", streaming=False).score


def _device_step(bundle, request):
    """ONNX Runtime's IO-binding step runner over the device-state code (the stand-in's
    host-backed memory bound as "cpu"; "cuda" on a GPU)."""
    from siren_runtime.backends.onnxruntime_loader import open_session
    from siren_runtime.backends.onnxruntime_runner import OnnxRuntimeDeviceStepRunner
    from siren_runtime.bundle import read_bundle
    standin = request.getfixturevalue("trt_standin")
    contract = read_bundle(bundle)
    session = open_session(contract.path(contract.streaming.graph.path), "cpu", spinning=False)
    return OnnxRuntimeDeviceStepRunner(session, contract.streaming, contract.inference.max_length, standin.cudart,
                                       memory="cpu", max_batch=5)


def _tensorrt(role):
    def make(bundle, request):
        from siren_runtime.backends import create_runner
        from siren_runtime.bundle import read_bundle
        request.getfixturevalue("trt_standin")
        return create_runner(role, read_bundle(request.getfixturevalue("trt_bundle")), "tensorrt", "cuda")
    return make


SCORE_RUNNERS = {"onnxruntime-step-graph-score": lambda b, request: _open(b)[1].score,
                 "onnxruntime-score-graph": _graph_score,
                 "tensorrt-score (stand-in)": _tensorrt("score")}
STEP_RUNNERS = {"onnxruntime-step (host states)": lambda b, request: _open(b)[1].step,
                "onnxruntime-step (device states, stand-in)": _device_step,
                "tensorrt-step (stand-in)": _tensorrt("step")}


def _declares(runner):
    from siren_runtime.backends import RunnerLimits
    from siren_runtime.backends.base import Runner
    assert isinstance(runner, Runner) and not runner.closed      # the base: the closed check, close once
    assert isinstance(runner.name, str) and runner.device in ("cpu", "cuda")
    assert isinstance(runner.limits, RunnerLimits) and 0.0 <= runner.limits.max_padding <= 1.0
    assert runner.int8_coding is None                          # an fp32 bundle: weights as stored


@pytest.mark.parametrize("factory", SCORE_RUNNERS.values(), ids=SCORE_RUNNERS.keys())
def test_score_runner_contract(factory, all_layers, opened, request):
    runner = factory(all_layers.bundle, request)
    _declares(runner)
    ids = np.array([[9707, 1879, 11, 1246, 525], [9707, 1879, 151643, 151643, 151643]], dtype=np.int64)
    mask = (ids != 151643).astype(np.int64)
    batch = runner.run(ids, mask)
    assert batch.dtype == np.float32 and batch.shape == (2,)
    rows = [runner.run(ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())])[0] for i in range(2)]
    assert np.max(np.abs(batch - rows)) <= TOL           # padding never changes a row's score
    runner.close()
    runner.close()                                       # twice: a no-op
    assert runner.closed
    with pytest.raises(RuntimeError, match="closed"):
        runner.run(ids, mask)


def _full(opened, ids):
    return float(opened[1].score.run(np.asarray([ids], np.int64), np.ones((1, len(ids)), np.int64))[0])


@pytest.mark.parametrize("factory", STEP_RUNNERS.values(), ids=STEP_RUNNERS.keys())
def test_step_runner_contract(factory, all_layers, opened, request):
    from siren_runtime.backends import StepRow
    runner = factory(all_layers.bundle, request)
    _declares(runner)
    assert runner.limits.state_dtype == opened[0].streaming.kv_dtype
    features = opened[0].streaming.feature_dim
    zero = np.zeros(features, np.float32)
    a_ids, b_ids = [9707, 1879, 11, 1246, 525, 8661, 13], [3838, 374, 279]
    a, b = runner.new_state(), runner.new_state()
    assert a.length == 0

    # two streams with different past and new lengths in one call equal the full graph
    out = runner.step([StepRow(a, 0, a_ids[:4], zero), StepRow(b, 0, b_ids[:1], zero)])
    assert (a.length, b.length) == (4, 1) and out[0].sums.shape == (4, features)
    sums_a, sums_b = np.vstack([zero, out[0].sums]), np.vstack([zero, out[1].sums])
    out = runner.step([StepRow(a, 4, a_ids[4:], sums_a[4]), StepRow(b, 1, b_ids[1:], sums_b[1])])
    assert abs(out[0].score - _full(opened, a_ids)) <= TOL and abs(out[1].score - _full(opened, b_ids)) <= TOL
    sums_a = np.vstack([sums_a, out[0].sums])

    # a fork is independent of its source
    fork = runner.fork(a, 3)
    assert fork.length == 3 and a.length == len(a_ids)
    got = runner.step([StepRow(fork, 3, [42, 43], sums_a[3])])[0].score
    assert abs(got - _full(opened, a_ids[:3] + [42, 43])) <= TOL
    assert a.length == len(a_ids)

    # rollback by length: resume inside the stream, different continuation
    got = runner.step([StepRow(a, 5, [77], sums_a[5])])[0].score
    assert a.length == 6 and abs(got - _full(opened, a_ids[:5] + [77])) <= TOL

    # a rejected call changes no state
    for bad in ([StepRow(b, b.length + 1, [1], zero)], [StepRow(b, 0, [], zero)],
                [StepRow(b, 0, [1], zero), StepRow(b, 0, [2], zero)], [StepRow(object(), 0, [1], zero)]):
        with pytest.raises(ValueError):
            runner.step(bad)
        assert b.length == len(b_ids)
    runner.close()
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.step([StepRow(b, 0, [1], zero)])

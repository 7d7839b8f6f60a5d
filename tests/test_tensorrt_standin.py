"""The TensorRT runners' real logic on the CPU stand-in (tests/trt_standin.py, a test
double): building, profile choice and switching, batch splitting, streaming with KV caches
kept in "device" memory, the defects the first review found, and fallback. Numerics and
speed on a real GPU are benchmarks/gpu_check.sh's; these prove the code paths."""
from __future__ import annotations

import json
import random
import shutil
import warnings

import numpy as np
import pytest

from corpus import CORPUS
from helpers import TOL, random_chunks

LONG = ("Explain, step by step and in great detail, how the ancient Romans built their aqueducts, which "
        "materials they used, how they kept the slope constant over many miles, and why some still stand. ")


@pytest.fixture(scope="module")
def engines(all_layers, tmp_path_factory):
    """A copy of the all-layers bundle with stand-in engines: max_batch 4 (so 16 texts split)
    and 3 streams per step call (so 16 streams take several calls)."""
    from trt_standin import StandIn
    from siren_engines.build import build_engines
    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(all_layers.bundle, bundle)
    with pytest.MonkeyPatch.context() as mp:
        StandIn().install(mp)
        result = build_engines(bundle, max_batch=4, stream_batch=3, show_progress=False)
    return bundle, result


def _fresh(engines, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(engines[0], bundle)
    return bundle


def _trt_guard(bundle, **options):
    from siren_runtime import SirenGuard
    return SirenGuard.from_pretrained(bundle, backend="tensorrt", device="cuda", **options)


def test_build_records_both_engines_after_their_checks(engines, trt_standin):
    bundle, result = engines
    from siren_runtime.bundle import read_bundle
    contract = read_bundle(bundle)
    contract.verify()
    model, step = contract.engines_for("model")[0].record, contract.engines_for("streaming")[0].record
    assert model["verify"]["passed"] and model["verify"]["max_abs_diff"] <= TOL
    assert step["verify"]["passed"] and step["verify"]["texts"] == 8 and step["verify"]["max_abs_diff"] <= TOL
    assert step["profiles"][0]["shapes"]["input_ids"]["max"] == [3, 64]       # new tokens up to max_length
    assert result["warnings"] == []
    assert (bundle / "engines" / "timing.cache").read_bytes().startswith(b"SIREN-TIMING-CACHE:")


def test_scores_match_llm_siren_with_batches_split(engines, trt_standin, all_layers):
    guard = _trt_guard(engines[0])
    assert (guard.backend, guard.device, guard.runners.step.name) == ("tensorrt", "cuda", "tensorrt")
    ours = np.array([r.score for r in guard.score_batch(CORPUS)])
    ref = np.array([r.score for r in all_layers.reference.score_batch(CORPUS)])
    assert np.max(np.abs(ours - ref)) <= TOL
    runs = [e for e in trt_standin.gpu.executions if e[0] == "model.onnx"]
    assert len(runs) >= len(CORPUS) // 4 and all(shapes["input_ids"][0] <= 4 for _, _, shapes in runs)
    guard.close()
    assert trt_standin.gpu.streams == set() and trt_standin.gpu.live_bytes() == 0


def test_profiles_are_chosen_and_switched(all_layers, trt_standin):
    """Two profiles (short and long sequences): each batch runs on the tightest one."""
    import tensorrt as trt
    from siren_engines.build import _build_one
    from siren_engines.profiles import Profile
    from siren_runtime.backends.tensorrt_runner import TensorRTRunner
    from siren_runtime.bundle import SCORE_IO

    def profile(seq):
        return Profile({n: {"min": [1, 1], "opt": [2, seq // 2], "max": [4, seq]} for n in SCORE_IO.inputs})
    profiles = [profile(16), profile(64)]
    plan = _build_one(trt, all_layers.bundle / "model.onnx", profiles, None, None, False)
    runner = TensorRTRunner(plan, {"profiles": [p.to_dict() for p in profiles]})
    rng = np.random.default_rng(0)
    for seq, want in ((10, 0), (50, 1), (12, 0), (64, 1)):
        ids = rng.integers(0, 1000, (3, seq))
        runner.run(ids, np.ones_like(ids))
        assert trt_standin.gpu.executions[-1][1] == want
    with pytest.raises(ValueError, match="outside every profile.*siren build --max-seq 65"):
        runner.run(np.zeros((1, 65), np.int64), np.ones((1, 65), np.int64))
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.run(np.zeros((1, 4), np.int64), np.ones((1, 4), np.int64))


def _sixteen_streams(guard, standin, reference):
    """feed_batch over 16 sessions with random chunking (rollbacks whenever a chunk splits a
    token, groups re-merging as lengths change), past max_length, each score equal to
    llm-siren's on the prefix; no KV byte reaches the host."""
    rng = random.Random(7)
    texts = [(CORPUS[i % len(CORPUS)] + " " + LONG) for i in range(16)]
    plans = [random_chunks(t, rng, 1, 40) for t in texts]
    sessions = [guard.stream() for _ in texts]
    worst, rounds, past_max = 0.0, 0, False
    while any(plans):
        live = [(s, p.pop(0)) for s, p in zip(sessions, plans) if p]
        results = guard.feed_batch([s for s, _ in live], [d for _, d in live])
        rounds += 1
        if rounds % 3 == 0:   # the oracle on a sample of rounds (llm-siren is the slow part)
            ref = reference.score_batch([s.text for s, _ in live])
            worst = max([worst] + [abs(a.score - b.score) for a, b in zip(results, ref)])
        past_max = past_max or any(len(guard.token_ids(s.text)) == guard.max_length for s, _ in live)
    assert past_max and worst <= TOL
    ours = [s.score.score for s in sessions]
    ref = [r.score for r in reference.score_batch([s.text for s in sessions])]
    assert max(abs(a - b) for a, b in zip(ours, ref)) <= TOL
    # what crossed to the host is exactly each step's scores and feature sums: no KV byte
    features = guard.bundle.streaming.feature_dim
    steps = [c for c in standin.gpu.copies if c.kind == "d2h"]
    assert steps
    return sum(c.nbytes for c in steps), features


def test_sixteen_streams_on_tensorrt_equal_whole_prefix_scores(engines, trt_standin, all_layers):
    guard = _trt_guard(engines[0])
    read, features = _sixteen_streams(guard, trt_standin, all_layers.reference)
    steps = [e for e in trt_standin.gpu.executions if e[0] == "step.onnx"]
    assert max(shapes["input_ids"][0] for _, _, shapes in steps) == 3        # several streams per call
    # first feeds get one masked past position: the profile's minimum past is 1, never an
    # empty dimension (TensorRT may clamp it), and the stand-in refuses shapes below it
    assert min(shapes["past_kv"][4] for _, _, shapes in steps) == 1
    from siren_runtime.bundle import read_bundle
    step_engines = read_bundle(engines[0]).engines_for("streaming")
    assert step_engines and all(profile["shapes"]["past_kv"]["min"][4] == 1
                                for e in step_engines for profile in e.record["profiles"])
    expected = sum(shapes["input_ids"][0] * 4 * (1 + (shapes["input_ids"][1] * features if name == "step.onnx" else 0))
                   for name, _, shapes in trt_standin.gpu.executions)
    assert read == expected
    guard.close()
    assert trt_standin.gpu.live_bytes() == 0 and trt_standin.gpu.streams == set()


def test_sixteen_streams_on_onnxruntime_device_states(all_layers, trt_standin):
    """ONNX Runtime's IO-binding step runner over the same device-state code (bound as
    host memory here, as "cuda" on a GPU)."""
    from siren_runtime import SirenGuard
    from siren_runtime.backends import Runners, open_runners
    from siren_runtime.backends.onnxruntime_loader import open_session
    from siren_runtime.backends.onnxruntime_runner import OnnxRuntimeDeviceStepRunner
    from siren_runtime.bundle import read_bundle
    contract = read_bundle(all_layers.bundle)
    session = open_session(contract.path(contract.streaming.graph.path), "cpu", spinning=False)
    step = OnnxRuntimeDeviceStepRunner(session, contract.streaming, contract.inference.max_length,
                                       trt_standin.cudart, memory="cpu", max_batch=5)
    calls, execute = [], step._execute
    step._execute = lambda shapes, out, addresses: (calls.append(shapes["input_ids"]),
                                                    execute(shapes, out, addresses))
    score = open_runners(contract, backend="onnxruntime", device="cpu", streaming=False).score
    with SirenGuard(contract, Runners(score, step)) as guard:
        read, features = _sixteen_streams(guard, trt_standin, all_layers.reference)
    assert max(b for b, _ in calls) == 5
    assert read == sum(b * 4 * (1 + w * features) for b, w in calls)      # scores and sums only
    assert trt_standin.gpu.live_bytes() == 0 and trt_standin.gpu.streams == set()


def test_interleaved_score_streaming_forks_device_states(engines, trt_standin, all_layers):
    guard = _trt_guard(engines[0])
    openings = ["Tell me how to", "Tell me how to"]
    endings = [[" bake", " bread", " at home"], [" build", " a", " bomb"]]
    texts = list(openings)
    for step in range(3):
        for i in range(2):
            texts[i] += endings[i][step]
            got = guard.score_streaming(texts[i]).score
            assert abs(got - all_layers.reference.score(texts[i]).score) <= TOL
    assert len(guard.stream_cache) == 2
    guard.close()
    assert trt_standin.gpu.live_bytes() == 0


def test_step_failure_changes_no_stream(engines, trt_standin, all_layers):
    guard = _trt_guard(engines[0])
    session = guard.stream()
    first = session.feed("How do I pick").score
    trt_standin.gpu.fail_execute.add("step.onnx")
    with pytest.raises(RuntimeError, match="TensorRT failed to run the streaming engine"):
        session.feed(" a lock")
    assert session.text == "How do I pick" and session.score.score == first
    trt_standin.gpu.fail_execute.clear()
    assert abs(session.feed(" a lock").score - all_layers.reference.score("How do I pick a lock").score) <= TOL


def test_grow_allocation_failure_changes_no_stream(engines, trt_standin, all_layers):
    guard = _trt_guard(engines[0])
    session = guard.stream()
    session.feed("Hi")
    trt_standin.gpu.fail_malloc_after = trt_standin.gpu.mallocs      # no more device memory
    with pytest.raises(Exception, match="cudaErrorMemoryAllocation"):
        session.feed(" " + LONG)
    assert session.text == "Hi"
    trt_standin.gpu.fail_malloc_after = -1
    assert abs(session.feed(" there").score - all_layers.reference.score("Hi there").score) <= TOL


# -- the review's defects, each failing on the code before this change --------------------
def test_old_driver_is_named_and_falls_back(engines, tmp_path, monkeypatch):
    """Risk: a CUDA 12 driver under cuda-python 13 read as 'sees none'."""
    from trt_standin import StandIn
    from siren_runtime import BackendUnavailableError, SirenGuard
    from siren_runtime.backends import forget_warnings
    StandIn(count_error=35).install(monkeypatch)
    with pytest.raises(BackendUnavailableError, match="cudaErrorInsufficientDriver.*tensorrt-cu12"):
        _trt_guard(engines[0])
    forget_warnings()
    with pytest.warns(RuntimeWarning, match="cudaErrorInsufficientDriver.*falling back to onnxruntime"):
        guard = SirenGuard.from_pretrained(engines[0])
    assert guard.backend == "onnxruntime"


def test_runtime_that_cannot_start_cuda_is_unavailable(engines, monkeypatch):
    """Defect 6: trt.Runtime() raises TypeError when CUDA cannot start."""
    from trt_standin import StandIn
    from siren_runtime import BackendUnavailableError
    from siren_runtime.backends.tensorrt_runner import TensorRTEngine
    from siren_runtime.bundle import SCORE_IO, read_bundle
    standin = StandIn().install(monkeypatch)
    plan = read_bundle(engines[0]).read_verified(read_bundle(engines[0]).engines_for("model")[0].path)
    standin.gpu.device_count = 0
    with pytest.raises(BackendUnavailableError, match="could not start CUDA.*no NVIDIA GPU"):
        TensorRTEngine(plan, "model", SCORE_IO)


def test_context_that_cannot_be_created_falls_back(engines, trt_standin):
    """Defect 6: create_execution_context() returning None was unchecked."""
    from siren_runtime import BackendUnavailableError, SirenGuard
    from siren_runtime.backends import forget_warnings
    trt_standin.gpu.fail_context = True
    with pytest.raises(BackendUnavailableError, match="execution context"):
        _trt_guard(engines[0])
    forget_warnings()
    with pytest.warns(RuntimeWarning, match="execution context.*falling back"):
        assert SirenGuard.from_pretrained(engines[0]).backend == "onnxruntime"


def test_refused_shapes_and_addresses_raise(engines, trt_standin):
    """Defect 6: set_input_shape / set_tensor_address / profile results were unchecked."""
    from siren_runtime.backends.cuda_memory import CudaStream
    from siren_runtime.backends.tensorrt_runner import TensorRTEngine
    from siren_runtime.bundle import SCORE_IO, read_bundle
    contract = read_bundle(engines[0])
    engine = TensorRTEngine(contract.read_verified(contract.engines_for("model")[0].path), "model", SCORE_IO)
    stream = CudaStream(trt_standin.cudart)
    with pytest.raises(ValueError, match="does not accept input_ids of shape \\[5, 8\\]"):
        engine.bind(stream, 0, {"input_ids": (5, 8)}, {})
    with pytest.raises(RuntimeError, match="refused the address of nonexistent"):
        engine.bind(stream, 0, {}, {"nonexistent": 4096})
    with pytest.raises(RuntimeError, match="could not switch.*profile 3"):
        engine.bind(stream, 3, {}, {})
    stream.close()


def test_damaged_or_foreign_plan(engines, tmp_path, trt_standin):
    from siren_runtime import BackendUnavailableError, BundleError
    from siren_runtime.bundle import describe_file
    bundle = _fresh(engines, tmp_path)
    manifest = json.loads((bundle / "siren_bundle.json").read_text())
    rel = manifest["engines"][0]["path"]
    (bundle / rel).write_bytes(b"x" + (bundle / rel).read_bytes())
    with pytest.raises(BundleError, match="truncated or altered"):
        _trt_guard(bundle, verify=False)                # the bytes TensorRT would get are checked
    manifest["files"][rel] = describe_file(bundle, rel)
    (bundle / "siren_bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailableError, match="could not deserialize the model engine"):
        _trt_guard(bundle)


def test_failing_step_engine_keeps_the_model_engine(all_layers, tmp_path, trt_standin):
    """Defect 2: a failure in the step engine lost a good model engine."""
    from siren_engines.build import build_engines
    from siren_runtime.bundle import read_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(all_layers.bundle, bundle)
    trt_standin.gpu.fail_build.add("step.onnx")
    with pytest.warns(RuntimeWarning, match="streaming step engine was not kept.*failed to build"):
        result = build_engines(bundle, max_batch=4, show_progress=False)
    contract = read_bundle(bundle)
    assert [e.graph for e in contract.engines] == ["model"] and len(result["engines"]) == 1
    assert not list((bundle / "engines").glob("streaming-*"))
    trt_standin.gpu.fail_build.clear()
    trt_standin.gpu.fail_execute.add("step.onnx")      # builds, but cannot pass its own check
    with pytest.warns(RuntimeWarning, match="streaming step engine was not kept.*failed to run"):
        build_engines(bundle, max_batch=4, verify=False, show_progress=False)
    assert [e.graph for e in read_bundle(bundle).engines] == ["model"]


def test_foreign_timing_cache_is_replaced(all_layers, tmp_path, trt_standin):
    """Defect 7: a timing cache from another GPU/TensorRT killed the build after it succeeded."""
    from siren_engines.build import build_engines
    bundle = tmp_path / "bundle"
    shutil.copytree(all_layers.bundle, bundle)
    cache = tmp_path / "other-gpu.cache"
    cache.write_bytes(b"SIREN-TIMING-CACHE:9.0.0/another GPU")
    with pytest.warns(RuntimeWarning, match="another GPU or TensorRT"):
        build_engines(bundle, max_batch=2, streaming=False, verify=False, timing_cache=cache, show_progress=False)
    assert b"NVIDIA Stand-in" in cache.read_bytes()
    # bytes TensorRT cannot read at all: create_timing_cache gives None, passing it on was a TypeError
    cache.write_bytes(b"\x00garbage, not a timing cache")
    with pytest.warns(RuntimeWarning, match="not a timing cache"):
        build_engines(bundle, max_batch=2, streaming=False, verify=False, timing_cache=cache, show_progress=False)
    assert b"NVIDIA Stand-in" in cache.read_bytes()


def test_build_without_onnxruntime_keeps_the_engine(all_layers, tmp_path, trt_standin, monkeypatch):
    """Defect 5: with only the tensorrt extra, verify crashed after the engines were written."""
    import sys
    from siren_engines.build import build_engines
    bundle = tmp_path / "bundle"
    shutil.copytree(all_layers.bundle, bundle)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)     # import onnxruntime now fails
    with pytest.warns(RuntimeWarning, match="not verified: ONNX Runtime is not installed"):
        result = build_engines(bundle, max_batch=2, show_progress=False)
    assert [e["graph"] for e in result["engines"]] == ["model", "streaming"]
    assert "verify" not in result["engines"][0]


def test_max_seq_below_max_length(all_layers, tmp_path, trt_standin):
    """Defect 4: texts between --max-seq and max_length crashed score_batch and the build's verify."""
    from siren_engines.build import build_engines
    bundle = tmp_path / "bundle"
    shutil.copytree(all_layers.bundle, bundle)
    result = build_engines(bundle, max_batch=4, max_seq=16, streaming=False, show_progress=False)
    report = result["engines"][0]["verify"]
    assert report["passed"] and report["left_out_too_long"] > 0
    from siren_runtime.backends import forget_warnings
    forget_warnings()
    with pytest.warns(RuntimeWarning, match="takes at most 16 tokens of the bundle.s 64"):
        guard = _trt_guard(bundle)
    runs = len(trt_standin.gpu.executions)
    with pytest.raises(ValueError, match="has [0-9]+ tokens.*at most 16.*siren build --max-seq 64"):
        guard.score_batch(["hi", LONG])
    assert len(trt_standin.gpu.executions) == runs          # refused before any work
    assert abs(guard.score("hi").score - all_layers.reference.score("hi").score) <= TOL


def test_step_profiles_fit_short_bundles():
    """Defect 3: the default 64 new tokens did not fit a bundle with max_length < 64."""
    from siren_engines.profiles import step_profiles
    shapes = step_profiles(40, kv_layers=2, kv_heads=2, head_dim=8, features=16)[0].to_dict()["shapes"]
    assert shapes["input_ids"]["max"] == [16, 40] and shapes["past_kv"]["max"][4] == 40


def test_step_engine_with_too_few_new_tokens_is_refused(engines, tmp_path, trt_standin):
    from siren_runtime import BackendUnavailableError
    from siren_runtime.backends.tensorrt_runner import TensorRTStepRunner
    from siren_runtime.bundle import read_bundle
    contract = read_bundle(engines[0])
    entry = json.loads(json.dumps(contract.engines_for("streaming")[0].record))
    entry["profiles"][0]["shapes"]["input_ids"]["max"][1] = 8
    with pytest.raises(BackendUnavailableError, match="takes 8 new tokens.*rebuild"):
        TensorRTStepRunner(contract.read_verified(entry["path"]), entry, contract)


def test_without_gpu_backend_tensorrt_says_why_and_none_falls_back_once(engines, monkeypatch):
    from siren_runtime import BackendUnavailableError, SirenGuard
    from siren_runtime.backends import forget_warnings
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="^TensorRT is not installed") as info:
        SirenGuard.from_pretrained(engines[0], backend="tensorrt")
    assert "\n" not in str(info.value)
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SirenGuard.from_pretrained(engines[0])
        SirenGuard.from_pretrained(engines[0])
    said = [w for w in caught if "falling back to onnxruntime" in str(w.message)]
    assert len(said) == 1


def test_prefix_scores_on_the_tensorrt_step_engine(engines, trt_standin, guard):
    """score_prefixes needs only the step runner's per-token sums: on the TensorRT step engine
    (device KV) it equals the ONNX Runtime CPU guard's, and a stream's onset comes with it."""
    from corpus import MIXED
    trt_guard = _trt_guard(engines[0])
    assert trt_guard.backend == "tensorrt" and trt_guard.prefix_scores_available
    texts = MIXED[:3] + CORPUS[:3]
    ours, cpu = trt_guard.score_prefixes_batch(texts), guard.score_prefixes_batch(texts)
    for a, b in zip(ours, cpu):
        assert a.token_ids == b.token_ids and a.spans == b.spans
        assert np.max(np.abs(a.scores - b.scores)) <= TOL
    session = trt_guard.stream(threshold=0.0)
    session.feed("Hello there")
    assert session.onset == 0
    trt_guard.close()


def test_no_host_copy_of_a_plan_outlives_its_engine(engines, trt_standin):
    """Issue 22: a TensorRT guard's host memory holds no plan once its engines exist (the
    verified bytes are read, hashed, deserialized and let go)."""
    import gc
    guard = _trt_guard(engines[0])
    gc.collect()
    plans = {e.path for e in guard.bundle.engines}
    assert plans and not plans & set(guard.bundle._loaded.keys())
    assert guard.score("hello").score >= 0.0
    guard.close()


def test_engine_from_another_gpu_model_of_the_same_capability_warns(engines, tmp_path, monkeypatch, all_layers):
    """An H100 engine on an H200 (both 9.0) loads, as TensorRT allows, with its warning; an
    engine built on this very GPU model is preferred when the bundle has both."""
    import json
    from trt_standin import StandIn
    from siren_runtime.backends import forget_warnings
    from siren_engines.build import build_engines
    bundle = _fresh(engines, tmp_path)          # built on "NVIDIA Stand-in", capability 9.0
    StandIn(name="NVIDIA H200").install(monkeypatch)
    forget_warnings()
    with pytest.warns(RuntimeWarning, match="built on NVIDIA Stand-in and runs here on NVIDIA H200 .*siren build"):
        guard = _trt_guard(bundle)
    assert abs(guard.score("Hello there").score - all_layers.reference.score("Hello there").score) <= TOL
    guard.close()
    build_engines(bundle, max_batch=4, stream_batch=3, show_progress=False)      # now one for the H200 too
    manifest = json.loads((bundle / "siren_bundle.json").read_text())
    assert {e["gpu"] for e in manifest["engines"]} == {"NVIDIA Stand-in", "NVIDIA H200"}
    forget_warnings()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard = _trt_guard(bundle)
    guard.close()


def test_bf16_engines_build_gate_and_stream_with_a_bf16_kv_cache(reduced, all_layers, tmp_path, trt_standin):
    """A bf16 bundle on the stand-in (its bf16 tensors as raw 16 bits; the graph runs as its
    fp32 twin): both engines build, the model engine passes the margin-aware gate against the
    fp32 bundle, and streams keep a bf16 KV cache (2 bytes an element on the device) whose
    scores follow the model engine's score of the prefix within bf16 tolerance."""
    from siren_engines.build import build_engines
    from siren_runtime.bundle import read_bundle
    bundle = tmp_path / "bf16"
    shutil.copytree(reduced["bf16"], bundle)
    result = build_engines(bundle, max_batch=4, stream_batch=3, reference_bundle=all_layers.bundle,
                           show_progress=False)
    assert {e["graph"] for e in result["engines"]} == {"model", "streaming"}, result["warnings"]
    model = next(e for e in result["engines"] if e["graph"] == "model")
    assert model["precision"] == "bf16" and model["verify"]["passed"]
    guard = _trt_guard(bundle)
    spec = read_bundle(bundle).streaming
    assert spec.kv_dtype == "bf16" and guard.runners.step.token_bytes == spec.kv_layers * 2 * spec.kv_heads * spec.head_dim * 2
    ours = np.array([r.score for r in guard.score_batch(CORPUS[:8])])
    ref = np.array([r.score for r in all_layers.reference.score_batch(CORPUS[:8])])
    assert 0 < np.abs(ours - ref).max() <= 6e-2          # bf16 weights: close to fp32, not equal
    session = guard.stream()
    for word in CORPUS[0].split(" "):
        got = session.feed(word + " ").score
        assert abs(got - guard.score(session.text).score) <= 3e-2
    guard.close()
    assert trt_standin.gpu.live_bytes() == 0


# -- memory pools and engine tensor types (GPU round 3) -------------------------------------

def test_a_device_without_memory_pools_streams_on_plain_allocations(engines, monkeypatch, all_layers):
    """cudaMallocAsync needs memory pools: a device without them (the attribute says 0) gets
    cudaMalloc, exact; with them, the default pool keeps freed memory (release threshold) and
    is trimmed when the runner closes."""
    from trt_standin import StandIn
    plain = StandIn(memory_pools=False).install(monkeypatch)
    guard = _trt_guard(engines[0])
    _sixteen_streams(guard, plain, all_layers.reference)
    guard.close()
    assert plain.gpu.calls["cudaMallocAsync"] == 0 and plain.gpu.calls["cudaMalloc"] > 0
    assert plain.gpu.pool_release_threshold == 0 and plain.gpu.pool_trims == 0
    assert plain.gpu.live_bytes() == 0
    pooled = StandIn().install(monkeypatch)
    guard = _trt_guard(engines[0])
    session = guard.stream()
    session.feed(LONG)
    assert pooled.gpu.calls["cudaMallocAsync"] > 0 and pooled.gpu.pool_release_threshold == 2 ** 64 - 1
    guard.close()
    assert pooled.gpu.pool_trims >= 1 and pooled.gpu.live_bytes() == 0


@pytest.mark.parametrize("tensor,graph", [("past_kv", "streaming"), ("input_ids", "model"), ("score", "model")])
def test_an_engine_whose_tensor_types_differ_from_the_bundle_is_refused_by_name(engines, trt_standin, tensor,
                                                                               graph):
    from siren_runtime import BundleError
    from siren_runtime.backends import create_runner
    from siren_runtime.bundle import read_bundle
    trt_standin.gpu.dtype_override = {tensor: trt_standin.tensorrt.DataType.HALF}
    contract = read_bundle(engines[0])
    with pytest.raises(BundleError, match=f"the {graph} engine's {tensor} is HALF, the bundle declares"):
        create_runner("step" if graph == "streaming" else "score", contract, "tensorrt", "cuda")
    assert trt_standin.gpu.live_bytes() == 0

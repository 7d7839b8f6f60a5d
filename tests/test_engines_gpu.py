"""TensorRT on a real GPU: build, load, parity. Skipped, with the reason, where there is none
(these machines and CI); benchmarks/gpu_check.sh runs the same path with timings."""
from __future__ import annotations

import numpy as np
import pytest

from corpus import CORPUS
from siren_runtime.backends.cuda_env import gpu_info, tensorrt_version

_REASON = ("TensorRT is not installed" if tensorrt_version() is None
           else "no usable NVIDIA GPU (cuda-python sees none)" if gpu_info() is None else "")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=_REASON or "GPU present")]


@pytest.fixture(scope="module")
def engine_bundle(all_layers, tmp_path_factory):
    import shutil
    from siren_engines.build import build_engines
    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(all_layers.bundle, bundle)
    build_engines(bundle, max_batch=8, max_seq=64, show_progress=False)
    return bundle


def test_engine_scores_match_reference(engine_bundle, all_layers):
    from siren_runtime import SirenGuard
    guard = SirenGuard.from_pretrained(engine_bundle, backend="tensorrt", device="cuda")
    ours = np.array([r.score for r in guard.score_batch(CORPUS)])      # 16 texts > max_batch 8: split
    ref = np.array([r.score for r in all_layers.reference.score_batch(CORPUS)])
    assert np.max(np.abs(ours - ref)) < 5e-3                              # fp32 engine; TensorRT may use TF32


def test_manifest_records_engine(engine_bundle):
    from siren_runtime.bundle import read_bundle
    entry = read_bundle(engine_bundle).engines[0].record
    assert entry["tensorrt_version"] == tensorrt_version()
    assert entry["compute_capability"] == gpu_info()["compute_capability"]
    assert entry["verify"]["passed"]


def test_streaming_engine_on_the_gpu(engine_bundle, all_layers):
    """16 sessions through the step engine, KV caches on the device, each feed equal to the
    reference on the prefix (fp32 engine; TensorRT may use TF32)."""
    from siren_runtime import SirenGuard
    guard = SirenGuard.from_pretrained(engine_bundle, backend="tensorrt", device="cuda")
    assert guard.runners.step is not None and guard.runners.step.name == "tensorrt"
    sessions = [guard.stream() for _ in range(16)]
    words = [CORPUS[i % len(CORPUS)].split(" ") for i in range(16)]
    for round_ in range(max(len(w) for w in words)):
        live = [(s, (" " if round_ else "") + w[round_]) for s, w in zip(sessions, words) if round_ < len(w)]
        results = guard.feed_batch([s for s, _ in live], [d for _, d in live])
        ref = all_layers.reference.score_batch([s.text for s, _ in live])
        assert max(abs(a.score - b.score) for a, b in zip(results, ref)) < 5e-3
    guard.close()


def test_onnxruntime_cuda_streams_on_the_device(all_layers):
    from siren_runtime import SirenGuard
    from siren_runtime.backends.ort_cuda_probe import cuda_provider_problem
    if cuda_provider_problem():
        pytest.skip(cuda_provider_problem())
    guard = SirenGuard.from_pretrained(all_layers.bundle, backend="onnxruntime", device="cuda")
    assert type(guard.runners.step).__name__ == "OnnxRuntimeDeviceStepRunner"
    session = guard.stream()
    for word in CORPUS[0].split(" "):
        got = session.feed(word + " ").score
        assert abs(got - all_layers.reference.score(session.text).score) < 5e-3
    guard.close()

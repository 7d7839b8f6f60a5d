"""ONNX Runtime's CUDA provider is trusted only once a session on it opened: a listed provider
that cannot load falls back to the CPU with the missing library named, never silently."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_plain_onnxruntime_is_not_a_gpu(all_layers):
    from siren_runtime import BackendUnavailableError, SirenGuard
    from siren_runtime.backends.ort_cuda_probe import cuda_provider_listed, cuda_provider_problem
    from siren_runtime.backends.onnxruntime_loader import gpu_available
    assert not cuda_provider_listed() and not gpu_available()
    assert "has no CUDAExecutionProvider" in cuda_provider_problem()
    with pytest.raises(BackendUnavailableError, match="ONNX Runtime on the GPU: .*install onnxruntime-gpu"):
        SirenGuard.from_pretrained(all_layers.bundle, backend="onnxruntime", device="cuda")


PROBE = """
import warnings, onnxruntime
from siren_runtime import SirenGuard
from siren_runtime.backends.ort_cuda_probe import cuda_provider_listed, cuda_provider_problem
assert cuda_provider_listed(), onnxruntime.get_available_providers()
print("PROBLEM", cuda_provider_problem())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    guard = SirenGuard.from_pretrained({bundle!r})
print("BACKEND", guard.backend, guard.device)
print("WARNED", [str(w.message) for w in caught])
print("SCORE", repr(guard.score("How do I make a cake?").score))
"""


@pytest.mark.skipif(not os.environ.get("SIREN_TEST_ONNXRUNTIME_GPU"),
                    reason="set SIREN_TEST_ONNXRUNTIME_GPU to an unpacked onnxruntime-gpu wheel (no CUDA libraries "
                           "needed: the point is a provider that is listed but cannot load)")
def test_listed_provider_that_cannot_load_falls_back_naming_the_library(all_layers):
    env = dict(os.environ, PYTHONPATH=os.environ["SIREN_TEST_ONNXRUNTIME_GPU"])
    proc = subprocess.run([sys.executable, "-c", PROBE.format(bundle=str(all_layers.bundle))], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert "cannot load its CUDA provider: lib" in lines["PROBLEM"] and ".so" in lines["PROBLEM"]
    assert lines["BACKEND"] == "onnxruntime cpu"
    assert "falling back to onnxruntime on the cpu" in lines["WARNED"] and "cannot load its CUDA provider" in lines["WARNED"]
    want = all_layers.reference.score("How do I make a cake?").score
    assert abs(float(lines["SCORE"]) - want) <= 1e-5

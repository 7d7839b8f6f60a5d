"""Does ONNX Runtime's CUDA provider really start here? Asked once per process.

`get_available_providers()` lists CUDAExecutionProvider whenever onnxruntime-gpu is
installed, even when the provider library cannot load (cuDNN or cuBLAS missing, a CUDA 13
build on a CUDA 12 driver); ONNX Runtime then runs the session on the CPU and says so only
in its log. So the probe (1) lets onnxruntime find pip-installed NVIDIA libraries
(`preload_dlls()`, ONNX Runtime 1.21+), (2) loads the provider library itself, which names
the first missing library, and (3) opens a one-node session on the GPU and checks the
provider was kept, which fails on a driver too old or no visible GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
from importlib import resources
from typing import Optional

from ..errors import install_hint

CUDA_PROVIDER = "CUDAExecutionProvider"
#: onnxruntime-gpu 1.27+ are CUDA 13 builds (driver R580+); earlier ones CUDA 12 (R525+)
DRIVER_HINT = ("onnxruntime-gpu 1.27 and newer need CUDA 13 (driver R580+): on an older driver install "
               "the onnxruntime-gpu-cu12 extra (pip install \".[onnxruntime-gpu-cu12]\" in the checkout); CUDA 12 builds need driver R525+, cuDNN 9 and cuBLAS 12 "
               "(pip install 'onnxruntime-gpu[cuda,cudnn]' brings both)")


def cuda_provider_listed() -> bool:
    """onnxruntime-gpu is installed (whether its provider starts or not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return CUDA_PROVIDER in ort.get_available_providers()


def _provider_library(ort) -> Optional[str]:
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    path = os.path.join(capi, "libonnxruntime_providers_cuda.so")
    return path if os.path.isfile(path) else None


def _cause(message: str) -> str:
    """The line of an ONNX Runtime error that says what failed ("CUDA failure 35: CUDA driver
    version is insufficient ..."), not the C++ signature it starts with."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "CUDA failure" in line or "CUDA error" in line:
            return line[line.find("CUDA"):][:240]
    return (lines[-1] if lines else "unknown error")[:240]


@functools.lru_cache(maxsize=1)
def cuda_provider_problem() -> Optional[str]:
    """None when a session on CUDAExecutionProvider opens and keeps it, else the reason in
    one line (naming the missing library or the driver)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return f"onnxruntime is not installed ({install_hint('onnxruntime-gpu')})"
    offered = ort.get_available_providers()
    if CUDA_PROVIDER not in offered:
        return (f"this onnxruntime ({ort.__version__}) has no {CUDA_PROVIDER} (it offers {', '.join(offered)}); "
                "install onnxruntime-gpu in place of onnxruntime")
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:                     # cuDNN/cuBLAS/CUDA runtime from the nvidia-* wheels, when installed;
            with contextlib.redirect_stdout(io.StringIO()):      # it prints each library it misses
                preload()
        except Exception:        # noqa: BLE001 - a failed preload is diagnosed by the load below
            pass
    library = _provider_library(ort)
    if library is not None:
        try:
            ctypes.CDLL(library)
        except OSError as e:
            return (f"onnxruntime-gpu {ort.__version__} cannot load its CUDA provider: {str(e).strip()[:240]}; "
                    + DRIVER_HINT)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    probe = resources.files("siren_runtime.data").joinpath("cuda_probe.onnx").read_bytes()
    try:
        # no fallback: when the provider fails to start (a driver too old for its CUDA), ONNX
        # Runtime would otherwise print an "EP Error" banner to stdout and go on on the CPU
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(probe, sess_options=options, providers=[CUDA_PROVIDER],
                                           enable_fallback=0)
    except Exception as e:  # noqa: BLE001 - ORT's own error types
        return (f"onnxruntime-gpu {ort.__version__} could not open a session on the GPU: {_cause(str(e))}; "
                + DRIVER_HINT)
    if CUDA_PROVIDER not in session.get_providers():
        from .cuda_env import cudart, gpu_problem
        why = (gpu_problem() if cudart() is not None else None) or "no visible GPU, or a driver older than its CUDA"
        return f"onnxruntime-gpu {ort.__version__} fell back to the CPU ({why}); {DRIVER_HINT}"
    return None

"""What this machine offers for TensorRT: the TensorRT version and the GPU (via cuda-python).

Imported lazily; every probe returns None instead of raising, so callers can print one
clear line.
"""
from __future__ import annotations

from typing import Optional


def cudart():
    """cuda-python's runtime module (new and old import paths), or None."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
            return runtime
        except ImportError:
            return None


def check(result):
    """Unwrap a cuda-python (error, *values) tuple, raising on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        rt = cudart()
        name = rt.cudaGetErrorName(err)[1] if rt is not None else err
        raise RuntimeError(f"CUDA error {name!r}")
    return values[0] if len(values) == 1 else tuple(values)


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def gpu_info(device: int = 0) -> Optional[dict]:
    """{"name", "compute_capability", "memory_bytes"} of `device`, or None without a usable GPU."""
    rt = cudart()
    if rt is None:
        return None
    try:
        if check(rt.cudaGetDeviceCount()) <= device:
            return None
        props = check(rt.cudaGetDeviceProperties(device))
    except Exception:
        return None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.totalGlobalMem)}

"""What this machine offers for TensorRT: the TensorRT version and the GPU (via cuda-python).

Imported lazily; the probes return None instead of raising, and :func:`gpu_problem` says
in one line why no GPU is usable (a CUDA 12 driver under cuda-python 13 reports
cudaErrorInsufficientDriver, which must not read as "no GPU").
"""
from __future__ import annotations

from typing import Optional

#: cuda-python / TensorRT wheels come in pairs per CUDA major version (README "TensorRT").
INSTALL_PAIRS = ("in the siren-deploy checkout, for a CUDA 12 driver (R525+): pip install \".[tensorrt-cu12]\"; "
                 "for a CUDA 13 driver (R580+): pip install \".[tensorrt-cu13]\"")


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and the CUDA error."""

    def __init__(self, call: str, code: int, name: str):
        self.call, self.code, self.name = call, int(code), name
        hint = ""
        if name == "cudaErrorInsufficientDriver":
            hint = (": the NVIDIA driver is older than the CUDA version of this cuda-python; install the "
                    f"matching pair ({INSTALL_PAIRS}) or update the driver")
        elif name == "cudaErrorNoDevice":
            hint = ": no NVIDIA GPU is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)"
        elif name == "cudaErrorMemoryAllocation":
            hint = ": out of GPU memory"
        super().__init__(f"CUDA error {name} ({self.code}) in {call}{hint}")


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


def _error_name(rt, err) -> str:
    try:
        name = rt.cudaGetErrorName(err)[1]
    except Exception:
        return f"error {int(err)}"
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def check(result, call: str = "a CUDA call"):
    """Unwrap a cuda-python ``(error, *values)`` tuple, raising CudaError on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        rt = cudart()
        raise CudaError(call, int(err), _error_name(rt, err) if rt is not None else f"error {int(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def gpu_problem(device: int = 0) -> Optional[str]:
    """None when `device` is usable through cuda-python, else the one-line reason."""
    rt = cudart()
    if rt is None:
        return f"cuda-python is not installed ({INSTALL_PAIRS})"
    try:
        count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except CudaError as e:
        return str(e)
    if count <= device:
        return f"no NVIDIA GPU {device} (cuda-python sees {count})"
    return None


def gpu_info(device: int = 0) -> Optional[dict]:
    """{"name", "compute_capability", "memory_bytes"} of `device`, or None without a usable
    GPU (then :func:`gpu_problem` says why)."""
    if gpu_problem(device) is not None:
        return None
    rt = cudart()
    try:
        props = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    except CudaError:
        return None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.totalGlobalMem)}

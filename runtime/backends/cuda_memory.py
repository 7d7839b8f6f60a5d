"""Device memory for GPU runners: one CUDA stream, buffers grown on demand, and the copies
between host and device (and within the device) that the runners need.

Every copy goes through :class:`CudaStream` so a runner's traffic is in one place: the
tests' CUDA stand-in checks each copy's bounds and direction, and that no stream's KV
cache is ever read back to the host.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .cuda_env import check

#: TensorRT wants tensor addresses aligned and non-null even for empty tensors
_MIN_BYTES = 256


class CudaStream:
    """A CUDA stream and the copies queued on it; ``close()`` destroys it."""

    def __init__(self, rt):
        self.rt = rt
        self.handle = check(rt.cudaStreamCreate(), "cudaStreamCreate")
        kinds = rt.cudaMemcpyKind
        self._h2d, self._d2h, self._d2d = (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost,
                                           kinds.cudaMemcpyDeviceToDevice)

    def __int__(self) -> int:
        return int(self.handle)

    def upload(self, device_ptr: int, array: np.ndarray) -> None:
        """Queue a copy of a C-contiguous host array to `device_ptr` (keep `array` alive
        until :meth:`synchronize`)."""
        if array.nbytes:
            check(self.rt.cudaMemcpyAsync(device_ptr, array.ctypes.data, array.nbytes, self._h2d, self.handle),
                  "cudaMemcpyAsync (host to device)")

    def download(self, array: np.ndarray, device_ptr: int) -> None:
        """Queue a copy from `device_ptr` into a C-contiguous host array."""
        if array.nbytes:
            check(self.rt.cudaMemcpyAsync(array.ctypes.data, device_ptr, array.nbytes, self._d2h, self.handle),
                  "cudaMemcpyAsync (device to host)")

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        """Queue a device-to-device copy of `height` rows of `width` bytes between pitched
        layouts (a slab of a KV cache into a batch tensor, or back)."""
        if width and height:
            check(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, self._d2d, self.handle),
                  "cudaMemcpy2DAsync (device to device)")

    def zero(self, device_ptr: int, nbytes: int) -> None:
        """Queue a memset of `nbytes` device bytes to 0."""
        if nbytes:
            check(self.rt.cudaMemsetAsync(device_ptr, 0, nbytes, self.handle), "cudaMemsetAsync")

    def synchronize(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(self.rt.cudaStreamDestroy(handle), "cudaStreamDestroy")


class DeviceBuffer:
    """One device allocation, reallocated (contents dropped) when a call needs more."""

    def __init__(self, rt, name: str):
        self.rt, self.name = rt, name
        self.ptr: Optional[int] = None
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        """The pointer of an allocation of at least `nbytes` (grown by doubling)."""
        nbytes = max(int(nbytes), _MIN_BYTES)
        if self.ptr is None or nbytes > self.nbytes:
            size = max(nbytes, 2 * self.nbytes)
            new = check(self.rt.cudaMalloc(size), f"cudaMalloc ({size} bytes for {self.name})")
            self.free()
            self.ptr, self.nbytes = int(new), size
        return self.ptr

    def free(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr, self.nbytes = self.ptr, None, 0
            check(self.rt.cudaFree(ptr), "cudaFree")


def allocate(rt, nbytes: int, what: str) -> int:
    nbytes = max(int(nbytes), _MIN_BYTES)
    return int(check(rt.cudaMalloc(nbytes), f"cudaMalloc ({nbytes} bytes for {what})"))


def free(rt, ptr: int) -> None:
    check(rt.cudaFree(ptr), "cudaFree")

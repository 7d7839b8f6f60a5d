"""Device memory for GPU runners: one CUDA stream, buffers grown on demand, and the copies
between host and device (and within the device) that the runners need.

Every copy goes through :class:`CudaStream` so a runner's traffic is in one place: the
tests' CUDA stand-in checks each copy's bounds and direction, and that no stream's KV
cache is ever read back to the host.

Host calls and the entries the bindings convert are what a many-stream step costs on the
host: :meth:`CudaStream.copy_blocks` queues any number of 3-D pitched device copies (one
per stream: every layer's keys and values of every head) as one ``cudaMemcpy3DBatchAsync``
entry each where the runtime and driver have it (CUDA 12.8+); without it, one
``cudaMemcpyBatchAsync`` of one entry per row, or one ``cudaMemcpy2DAsync`` per slab on
older CUDA. Stream KV caches are allocated and freed stream-ordered
(``cudaMallocAsync``/``cudaFreeAsync``, no device-wide synchronization) where available;
host staging is pinned.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .cuda_env import CudaError, check

log = logging.getLogger("siren_runtime.backends")
#: what a driver answers to a batched copy it cannot do here (an argument form it does not take,
#: no support, a capturing stream): the older copy path is taken instead; any other error is raised
_REFUSED = {1: "cudaErrorInvalidValue", 801: "cudaErrorNotSupported", 900: "cudaErrorStreamCaptureUnsupported"}

#: TensorRT wants tensor addresses aligned and non-null even for empty tensors
_MIN_BYTES = 256
#: CUDA versions (as cudaRuntimeGetVersion / cudaDriverGetVersion report them) of the features
BATCHED_COPY_VERSION = 12080        # cudaMemcpyBatchAsync and cudaMemcpy3DBatchAsync
ASYNC_ALLOC_VERSION = 11020         # cudaMallocAsync / cudaFreeAsync


def _version(rt, call: str) -> int:
    try:
        return int(check(getattr(rt, call)(), call) or 0)
    except (AttributeError, RuntimeError):
        return 0


#: freed stream-ordered memory the default pool keeps (all of it) rather than returning it to
#: the OS at every synchronization, which the default threshold (0) does: a steady run of
#: steps then reuses its memory instead of re-mapping it; `CudaStream.close` trims the pool
POOL_RELEASE_THRESHOLD = 2 ** 64 - 1


def _pools_supported(rt) -> bool:
    """Whether the current device has stream-ordered memory pools (cudaMallocAsync needs
    them; a device without them refuses the call)."""
    try:
        device = check(rt.cudaGetDevice(), "cudaGetDevice")
        attr = rt.cudaDeviceAttr.cudaDevAttrMemoryPoolsSupported
        return int(check(rt.cudaDeviceGetAttribute(attr, device), "cudaDeviceGetAttribute")) == 1
    except (AttributeError, RuntimeError):
        return False


def cuda_features(rt) -> dict:
    """Which of the newer calls this runtime, binding, driver and device all support."""
    have = min(_version(rt, "cudaRuntimeGetVersion"), _version(rt, "cudaDriverGetVersion"))
    return {"batched_copy": have >= BATCHED_COPY_VERSION and hasattr(rt, "cudaMemcpyBatchAsync"),
            "batched_copy_3d": have >= BATCHED_COPY_VERSION and hasattr(rt, "cudaMemcpy3DBatchAsync"),
            "async_alloc": (have >= ASYNC_ALLOC_VERSION and hasattr(rt, "cudaMallocAsync")
                            and _pools_supported(rt))}


def _uint64(rt, value: int):
    """A cuuint64_t of the bindings' driver module (what a pool's byte attributes take)."""
    package = rt.__name__.rsplit(".", 1)[0]          # cuda.bindings.runtime -> .driver; cuda.cudart -> cuda.cuda
    driver = importlib.import_module(package + ".driver" if package == "cuda.bindings" else "cuda.cuda")
    return driver.cuuint64_t(value)


def default_pool(rt):
    """The current device's default memory pool, told to keep freed memory (None where that
    cannot be set: the pool then keeps its own default, which is only slower)."""
    try:
        device = check(rt.cudaGetDevice(), "cudaGetDevice")
        pool = check(rt.cudaDeviceGetDefaultMemPool(device), "cudaDeviceGetDefaultMemPool")
        check(rt.cudaMemPoolSetAttribute(pool, rt.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold,
                                         _uint64(rt, POOL_RELEASE_THRESHOLD)), "cudaMemPoolSetAttribute")
        return pool
    except (AttributeError, ImportError, RuntimeError):
        return None


@dataclass(frozen=True)
class BlockCopies:
    """Many 3-D device-to-device copies of one shape: copy i moves `depth` layers of `height`
    rows of width[i] bytes. Each side is a pointer, a row pitch (bytes) and the rows per
    layer (its layer pitch is pitch x layer_rows), all int64 arrays of one length."""
    dst: np.ndarray
    dst_pitch: np.ndarray
    dst_layer_rows: np.ndarray
    src: np.ndarray
    src_pitch: np.ndarray
    src_layer_rows: np.ndarray
    width: np.ndarray
    height: int
    depth: int

    def __len__(self) -> int:
        return len(self.width)

    #: the per-copy arrays (the rest is one shape for all copies)
    ARRAYS = ("dst", "dst_pitch", "dst_layer_rows", "src", "src_pitch", "src_layer_rows", "width")

    def __add__(self, other: "BlockCopies") -> "BlockCopies":
        if (self.height, self.depth) != (other.height, other.depth):
            raise ValueError("block copies of different heights or depths")
        return replace(self, **{f: np.concatenate([getattr(self, f), getattr(other, f)]) for f in self.ARRAYS})

    def nonempty(self) -> "BlockCopies":
        keep = self.width > 0
        return replace(self, **{f: getattr(self, f)[keep] for f in self.ARRAYS})

    def layers(self) -> tuple:
        """The same copies as 2-D ones, one per (copy, layer): copy_rows_many's arguments."""
        k = np.arange(self.depth, dtype=np.int64)[None, :]
        flat = lambda base, pitch, rows: (base[:, None] + k * (pitch * rows)[:, None]).ravel()   # noqa: E731
        rep = lambda a: np.repeat(a, self.depth)                                                 # noqa: E731
        return (flat(self.dst, self.dst_pitch, self.dst_layer_rows), rep(self.dst_pitch),
                flat(self.src, self.src_pitch, self.src_layer_rows), rep(self.src_pitch), rep(self.width))


class CudaStream:
    """A CUDA stream and the copies queued on it; ``close()`` destroys it."""

    def __init__(self, rt, features: Optional[dict] = None, handle=None):
        """A new stream, or `handle`: an existing one to queue on (its owner destroys it; not
        the legacy NULL stream, which batched copies refuse)."""
        if handle is not None and int(handle) in (0, 1):
            raise ValueError("CudaStream needs a created stream, not the legacy NULL stream (0 or 1): batched copies "
                             "refuse it")
        self.rt = rt
        self._owned = handle is None
        self.handle = check(rt.cudaStreamCreate(), "cudaStreamCreate") if handle is None else handle
        kinds = rt.cudaMemcpyKind
        self._h2d, self._d2h, self._d2d = (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost,
                                           kinds.cudaMemcpyDeviceToDevice)
        self.features = cuda_features(rt) if features is None else features
        self._pool = default_pool(rt) if self.features["async_alloc"] else None
        self._batch_attrs = None
        if self.features["batched_copy"]:
            attrs = rt.cudaMemcpyAttributes()
            # the copies are ordered with the stream's other work (the engine reads/writes them)
            attrs.srcAccessOrder = rt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
            self._batch_attrs = [attrs]
        self._blocks_3d = self.features.get("batched_copy_3d", False)

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

    def copy_rows_many(self, dst: np.ndarray, dst_pitch: np.ndarray, src: np.ndarray, src_pitch: np.ndarray,
                       width: np.ndarray, height: int) -> None:
        """Queue many pitched device-to-device copies (copy i: `height` rows of width[i] bytes,
        equal-length int64 arrays): one host call where batched copies exist, whatever the
        count, else one ``cudaMemcpy2DAsync`` per copy."""
        keep = width > 0
        dst, dst_pitch, src, src_pitch, width = (a[keep] for a in (dst, dst_pitch, src, src_pitch, width))
        if not len(width) or not height:
            return
        if self._batch_attrs is None:
            for args in zip(dst.tolist(), dst_pitch.tolist(), src.tolist(), src_pitch.tolist(), width.tolist()):
                self.copy_rows(*args[:4], args[4], height)
            return
        rows = np.arange(height, dtype=np.int64)
        dsts = (dst[:, None] + rows * dst_pitch[:, None]).ravel()
        srcs = (src[:, None] + rows * src_pitch[:, None]).ravel()
        sizes = np.repeat(width, height)
        try:
            check(self.rt.cudaMemcpyBatchAsync(dsts.tolist(), srcs.tolist(), sizes.tolist(), len(sizes),
                                               self._batch_attrs, [0], 1, self.handle),
                  f"cudaMemcpyBatchAsync ({len(sizes)} device-to-device copies)")
        except CudaError as e:
            self._fall_back(e, "one cudaMemcpy2DAsync per slab")
            self._batch_attrs = None
            self.copy_rows_many(dst, dst_pitch, src, src_pitch, width, height)

    @staticmethod
    def _fall_back(error: CudaError, to: str) -> None:
        """A batched copy this driver refuses (_REFUSED): say so once and take the older path
        from now on; the copies are replayed there (a batch whose call failed queued nothing,
        and replaying a copy writes the same bytes). Any other error is raised."""
        if error.code not in _REFUSED:
            raise error
        log.warning("%s; this stream's KV copies use %s from now on", error, to)

    def copy_blocks(self, copies: BlockCopies) -> None:
        """Queue many 3-D device-to-device copies: one ``cudaMemcpy3DBatchAsync`` entry per
        copy where the runtime has it (the host cost grows with copies, not with their layers
        or rows), else :meth:`copy_rows_many` over their layers."""
        copies = copies.nonempty()
        if not len(copies) or not copies.height or not copies.depth:
            return
        if not self._blocks_3d:
            self.copy_rows_many(*copies.layers(), copies.height)
            return
        rt = self.rt
        pointer = rt.cudaMemcpy3DOperandType.cudaMemcpyOperandTypePointer
        in_stream_order = rt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        ops = []
        for dst, dst_pitch, dst_rows, src, src_pitch, src_rows, width in zip(
                copies.dst.tolist(), copies.dst_pitch.tolist(), copies.dst_layer_rows.tolist(), copies.src.tolist(),
                copies.src_pitch.tolist(), copies.src_layer_rows.tolist(), copies.width.tolist()):
            op = rt.cudaMemcpy3DBatchOp()
            # pointer to pointer: an element is one byte, so rows and widths are in bytes
            op.src.type, op.dst.type = pointer, pointer
            op.src.op.ptr.ptr, op.src.op.ptr.rowLength, op.src.op.ptr.layerHeight = src, src_pitch, src_rows
            op.dst.op.ptr.ptr, op.dst.op.ptr.rowLength, op.dst.op.ptr.layerHeight = dst, dst_pitch, dst_rows
            op.extent.width, op.extent.height, op.extent.depth = width, copies.height, copies.depth
            op.srcAccessOrder = in_stream_order
            ops.append(op)
        try:
            check(rt.cudaMemcpy3DBatchAsync(len(ops), ops, 0, self.handle),
                  f"cudaMemcpy3DBatchAsync ({len(ops)} device-to-device copies)")
        except CudaError as e:
            self._fall_back(e, "a batch of row copies")
            self._blocks_3d = False
            self.copy_rows_many(*copies.layers(), copies.height)

    def allocate(self, nbytes: int, what: str) -> int:
        """Device memory ordered on this stream (no device-wide synchronization) where the
        runtime has stream-ordered allocation, else ``cudaMalloc``."""
        nbytes = max(int(nbytes), _MIN_BYTES)
        if self.features["async_alloc"]:
            return int(check(self.rt.cudaMallocAsync(nbytes, self.handle), f"cudaMallocAsync ({nbytes} bytes for {what})"))
        return allocate(self.rt, nbytes, what)

    def free(self, ptr: int) -> None:
        """Free what :meth:`allocate` gave, after the work queued before it."""
        if self.features["async_alloc"]:
            check(self.rt.cudaFreeAsync(ptr, self.handle), "cudaFreeAsync")
        else:
            free(self.rt, ptr)

    def zero(self, device_ptr: int, nbytes: int) -> None:
        """Queue a memset of `nbytes` device bytes to 0."""
        if nbytes:
            check(self.rt.cudaMemsetAsync(device_ptr, 0, nbytes, self.handle), "cudaMemsetAsync")

    def synchronize(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            if self._owned:
                check(self.rt.cudaStreamDestroy(handle), "cudaStreamDestroy")
            if self._pool is not None:       # what this stream freed goes back to the OS now
                check(self.rt.cudaMemPoolTrimTo(self._pool, 0), "cudaMemPoolTrimTo")


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


class PinnedBuffer:
    """Page-locked host memory, grown on demand, seen as bytes: host staging that an async
    copy really overlaps (a pageable source is staged by the driver, synchronously)."""

    def __init__(self, rt, name: str):
        self.rt, self.name = rt, name
        self.ptr: Optional[int] = None
        self.nbytes = 0

    def view(self, nbytes: int) -> np.ndarray:
        nbytes = max(int(nbytes), 1)
        if self.ptr is None or nbytes > self.nbytes:
            size = max(nbytes, 2 * self.nbytes, _MIN_BYTES)
            new = int(check(self.rt.cudaMallocHost(size), f"cudaMallocHost ({size} bytes for {self.name})"))
            self.free()
            self.ptr, self.nbytes = new, size
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.ptr))

    def stage(self, array: np.ndarray) -> np.ndarray:
        """`array`'s bytes in this buffer, as an array of its dtype and shape."""
        staged = self.view(array.nbytes)[:array.nbytes].view(array.dtype).reshape(array.shape)
        staged[...] = array
        return staged

    def free(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr, self.nbytes = self.ptr, None, 0
            check(self.rt.cudaFreeHost(ptr), "cudaFreeHost")


def allocate(rt, nbytes: int, what: str) -> int:
    nbytes = max(int(nbytes), _MIN_BYTES)
    return int(check(rt.cudaMalloc(nbytes), f"cudaMalloc ({nbytes} bytes for {what})"))


def free(rt, ptr: int) -> None:
    check(rt.cudaFree(ptr), "cudaFree")

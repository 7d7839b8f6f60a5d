"""TEST DOUBLE: a CPU stand-in for TensorRT and cuda-python's runtime, for tests only.

It implements exactly the subset of ``tensorrt`` and ``cuda.bindings.runtime`` that
siren_runtime and siren_engines call, with the real signatures and result conventions
(TensorRT's bool results and None returns, cuda-python's ``(error, value)`` tuples), and
raises ``StandInError`` on any other attribute, so new API use cannot pass unnoticed.

- "Device" memory is host memory the stand-in allocates, filled with 0xFF bytes (NaN as
  floats, -1 as ids) so a read of memory nobody wrote shows. Every copy is checked: its
  direction (a host pointer never passes for a device one), and that it stays inside one
  allocation. Every copy is logged, so a test can assert what crossed to the host.
- An "engine" is the ONNX graph it was built from plus its profiles; running it checks
  that every input shape lies in the active profile and every tensor has an address
  inside device memory, runs the graph with ONNX Runtime on the CPU, and writes the
  outputs to their addresses (bounds-checked).
- Every cuda-python call is counted (``gpu.calls``), and every copy described to the binding
  (``gpu.copy_entries``: a batch's entries, one per plain copy), so a test can assert how
  many host calls a step costs and how much the bindings convert. The newer calls
  (``cudaMemcpyBatchAsync``, ``cudaMemcpy3DBatchAsync``, stream-ordered allocation, pinned
  host memory) follow cuda-bindings 12.9 (``(err, failIdx)`` from a batched copy) or 13.x
  (``(err,)``), per ``binding_line``; ``batch_copy=False``, ``batch_copy_3d=False`` or
  ``async_alloc=False`` remove them as an older binding lacks them (AttributeError), and
  ``cuda_version``/``driver_version`` say what the runtime and driver report.
- Knobs make the failures real TensorRT/CUDA show: no device, an old driver (error 35),
  a context that cannot be created, a failed execution, a failed build, a timing cache
  from another GPU.

This proves the runners' logic (profiles, buffers, state, copies, error paths), not
TensorRT's numerics or speed: only a GPU run shows those (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import collections
import ctypes
import enum
import itertools
import json
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PLAN_MAGIC = b"SIREN-TRT-STANDIN\n"
CACHE_MAGIC = b"SIREN-TIMING-CACHE:"
_NP = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(float16)": np.float16,
       "tensor(bfloat16)": np.uint16}       # bf16 as its raw 16 bits (numpy has no bfloat16)
_BF16 = 16                                  # onnx.TensorProto.BFLOAT16
_FLOAT = 1                                  # onnx.TensorProto.FLOAT


def bf16_to_fp32(raw: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> the float32 they stand for (exact: bf16 is float32's top half)."""
    return (np.ascontiguousarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounded to nearest even as a Cast to bfloat16 rounds."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


_TWINS: dict = {}


def fp32_twin(onnx_path: str) -> tuple[str, dict]:
    """(a graph ONNX Runtime's CPU provider can run, the original's I/O element types), for a
    graph ONNX Runtime could not load as it is (a bf16 graph: no bf16 CPU kernels).

    The twin has every bf16 initializer, constant, cast target and tensor type widened to
    float32 (exact for the weights). Its arithmetic is fp32, so a bf16 engine on the stand-in
    is closer to the fp32 bundle than a real one: this tests the runtime's handling of bf16
    tensors (sizes, bits, KV caches), not TensorRT's bf16 numerics."""
    import onnx
    header = onnx.load(onnx_path, load_external_data=False)
    names = {1: "tensor(float)", 7: "tensor(int64)", 10: "tensor(float16)", _BF16: "tensor(bfloat16)"}
    io_types = {v.name: names[v.type.tensor_type.elem_type] for v in list(header.graph.input) + list(header.graph.output)}
    if onnx_path in _TWINS:
        return _TWINS[onnx_path], io_types
    import tempfile
    from onnx import numpy_helper
    model = onnx.load(onnx_path)

    def widen(tensor):
        if tensor.data_type != _BF16:
            return
        raw = (np.frombuffer(tensor.raw_data, dtype=np.uint16) if tensor.raw_data
               else np.asarray(tensor.int32_data, dtype=np.uint16))
        tensor.CopyFrom(numpy_helper.from_array(bf16_to_fp32(raw).reshape(tuple(tensor.dims)), tensor.name))

    graph = model.graph
    for tensor in graph.initializer:
        widen(tensor)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == _BF16:
                attr.i = _FLOAT
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == _BF16:
            value.type.tensor_type.elem_type = _FLOAT
    twin = str(Path(tempfile.mkdtemp(prefix="standin-fp32-twin-")) / Path(onnx_path).name)
    onnx.save(model, twin)
    _TWINS[onnx_path] = twin
    return twin, io_types


class StandInError(AssertionError):
    """A call outside the stand-in's subset, or a use real CUDA/TensorRT would not allow."""


class _Strict:
    def __getattr__(self, name):
        raise StandInError(f"the TensorRT/CUDA stand-in does not implement {type(self).__name__}.{name}")


def _strict_module(name: str, members: dict, absent: tuple = ()) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(members)

    def missing(attr):
        if attr.startswith("__") or attr in absent:      # `absent`: what an older binding has not
            raise AttributeError(attr)
        raise StandInError(f"the stand-in module {name} does not implement {attr}")
    module.__getattr__ = missing
    return module


# ---------------------------------------------------------------------------------------
# cuda.bindings.runtime
# ---------------------------------------------------------------------------------------
class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorNotSupported = 801


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaMemcpySrcAccessOrder(enum.IntEnum):
    cudaMemcpySrcAccessOrderInvalid = 0
    cudaMemcpySrcAccessOrderStream = 1
    cudaMemcpySrcAccessOrderDuringApiCall = 2
    cudaMemcpySrcAccessOrderAny = 3


class cudaMemcpyAttributes:
    """The struct's four fields and nothing else (an unknown field is an error, as in the binding)."""
    __slots__ = ("srcAccessOrder", "srcLocHint", "dstLocHint", "flags")

    def __init__(self):
        self.srcAccessOrder = cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderInvalid
        self.srcLocHint = self.dstLocHint = None
        self.flags = 0


class cudaMemcpy3DOperandType(enum.IntEnum):
    cudaMemcpyOperandTypePointer = 1
    cudaMemcpyOperandTypeArray = 2


class _PointerOperand:
    __slots__ = ("ptr", "rowLength", "layerHeight", "locHint")

    def __init__(self):
        self.ptr, self.rowLength, self.layerHeight, self.locHint = 0, 0, 0, None


class _OperandUnion:
    __slots__ = ("ptr", "array")

    def __init__(self):
        self.ptr, self.array = _PointerOperand(), None


class cudaMemcpy3DOperand:
    __slots__ = ("type", "op")

    def __init__(self):
        self.type, self.op = 0, _OperandUnion()


class cudaExtent:
    __slots__ = ("width", "height", "depth")

    def __init__(self):
        self.width = self.height = self.depth = 0


class cudaMemcpy3DBatchOp:
    """The struct's fields and nothing else, nested as in the binding (op.src.op.ptr.ptr)."""
    __slots__ = ("src", "dst", "extent", "srcAccessOrder", "flags")

    def __init__(self):
        self.src, self.dst, self.extent = cudaMemcpy3DOperand(), cudaMemcpy3DOperand(), cudaExtent()
        self.srcAccessOrder = cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderInvalid
        self.flags = 0


#: the batched-copy and stream-ordered-allocation calls, absent from an older binding
BATCH_COPY_CALLS = ("cudaMemcpyBatchAsync", "cudaMemcpyAttributes", "cudaMemcpySrcAccessOrder")
BATCH_COPY_3D_CALLS = ("cudaMemcpy3DBatchAsync", "cudaMemcpy3DBatchOp", "cudaMemcpy3DOperandType")
ASYNC_ALLOC_CALLS = ("cudaMallocAsync", "cudaFreeAsync")


class cudaDeviceAttr(enum.IntEnum):
    cudaDevAttrMemoryPoolsSupported = 115


class cudaMemPoolAttr(enum.IntEnum):
    cudaMemPoolAttrReleaseThreshold = 4


class cuuint64_t:
    """cuda.bindings.driver.cuuint64_t: a 64-bit value the bindings pass by pointer."""

    def __init__(self, value: int = 0):
        if not isinstance(value, int) or not 0 <= value < 2 ** 64:
            raise TypeError(f"cuuint64_t({value!r})")
        self._value = value

    def __int__(self) -> int:
        return self._value

    def getPtr(self) -> int:
        return id(self)


_POOL = object()          # the device's default memory pool (an opaque handle)


class cudaStream_t(_Strict):
    def __init__(self, handle: int):
        self._handle = handle

    def __int__(self):
        return self._handle

    __index__ = __int__


@dataclass
class Copy:
    kind: str            # "h2d", "d2h", "d2d"
    dst: int
    src: int
    nbytes: int


@dataclass
class FakeGPU:
    """The state behind the stand-in: memory, streams, the copy log and failure knobs."""
    name: str = "NVIDIA Stand-in"
    compute_capability: tuple = (9, 0)
    device_count: int = 1
    count_error: int = 0                  # e.g. 35: cudaGetDeviceCount fails as with an old driver
    fail_malloc_after: int = -1           # allocations allowed before cudaMalloc fails (-1: never)
    fail_context: bool = False
    fail_execute: set = field(default_factory=set)  # ONNX file names whose execution fails
    fail_build: set = field(default_factory=set)    # ONNX file names whose build fails
    allocations: dict = field(default_factory=dict)  # base pointer -> uint8 array
    copies: list = field(default_factory=list)
    streams: set = field(default_factory=set)
    executions: list = field(default_factory=list)  # (engine onnx name, profile, {input: shape})
    mallocs: int = 0
    calls: "collections.Counter" = field(default_factory=lambda: collections.Counter())  # cuda-python calls by name
    cuda_version: int = 12090             # what cudaRuntimeGetVersion reports
    driver_version: int = 12090           # what cudaDriverGetVersion reports
    binding_line: int = 12                # 12: batched copy returns (err, failIdx); 13: (err,)
    batch_copy: bool = True               # the binding has cudaMemcpyBatchAsync
    batch_copy_3d: bool = True            # the binding has cudaMemcpy3DBatchAsync
    copy_entries: int = 0                 # copies described to the binding (a batch's entries, 1 per plain call)
    refuse_batch: dict = field(default_factory=dict)  # batched-copy call name -> the error the driver answers
    async_alloc: bool = True              # the binding has cudaMallocAsync / cudaFreeAsync
    memory_pools: bool = True             # the device supports memory pools (cudaDevAttrMemoryPoolsSupported)
    pool_release_threshold: int = 0       # what cudaMemPoolSetAttribute set on the default pool
    pool_trims: int = 0                   # cudaMemPoolTrimTo calls
    dtype_override: dict = field(default_factory=dict)  # tensor name -> the DataType engines report for it
    pinned: dict = field(default_factory=dict)       # cudaMallocHost pointer -> uint8 array (host memory)
    async_pointers: set = field(default_factory=set)  # what cudaMallocAsync gave (and not yet freed)

    @property
    def usable(self) -> bool:
        return self.count_error == 0 and self.device_count > 0

    def allocation_of(self, ptr: int, nbytes: int):
        """(base, array) of the allocation holding [ptr, ptr + nbytes), or None."""
        for base, array in self.allocations.items():
            if base <= ptr and ptr + nbytes <= base + array.nbytes:
                return base, array
        return None

    def device_view(self, ptr: int, nbytes: int, what: str) -> np.ndarray:
        hit = self.allocation_of(ptr, nbytes)
        if hit is None:
            raise StandInError(f"{what}: [{ptr:#x}, +{nbytes}) is not inside one device allocation")
        base, array = hit
        return array[ptr - base:ptr - base + nbytes]

    def live_bytes(self) -> int:
        return sum(a.nbytes for a in self.allocations.values())


def make_cudart(gpu: FakeGPU) -> types.ModuleType:
    handles = itertools.count(0x5000)
    ok = cudaError_t.cudaSuccess

    def cudaGetErrorName(err):
        return ok, cudaError_t(int(err)).name.encode()

    def cudaGetDeviceCount():
        if gpu.count_error:
            return cudaError_t(gpu.count_error), 0
        return ok, gpu.device_count

    def cudaGetDeviceProperties(device):
        if not gpu.usable or device >= gpu.device_count:
            return cudaError_t.cudaErrorInvalidValue, None
        props = types.SimpleNamespace(name=gpu.name.encode() + b"\x00" * 4, major=gpu.compute_capability[0],
                                      minor=gpu.compute_capability[1], totalGlobalMem=80 << 30)
        return ok, props

    def cudaMalloc(size):
        if not isinstance(size, int) or size <= 0:
            raise StandInError(f"cudaMalloc({size!r})")
        if gpu.fail_malloc_after >= 0 and gpu.mallocs >= gpu.fail_malloc_after:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        gpu.mallocs += 1
        array = np.full(size, 0xFF, dtype=np.uint8)
        gpu.allocations[array.ctypes.data] = array
        return ok, array.ctypes.data

    def cudaFree(ptr):
        if ptr in gpu.async_pointers:
            raise StandInError(f"cudaFree({ptr:#x}) of stream-ordered memory: use cudaFreeAsync")
        if ptr not in gpu.allocations:
            raise StandInError(f"cudaFree({ptr:#x}): not an allocation (double free?)")
        del gpu.allocations[ptr]
        return (ok,)

    def cudaMallocAsync(size, hStream):
        _stream(hStream)
        err, ptr = cudaMalloc(size)
        if err == ok:
            gpu.async_pointers.add(ptr)
        return err, ptr

    def cudaFreeAsync(devPtr, hStream):
        _stream(hStream)
        if devPtr not in gpu.async_pointers:
            raise StandInError(f"cudaFreeAsync({devPtr:#x}): not from cudaMallocAsync")
        gpu.async_pointers.discard(devPtr)
        return cudaFree(devPtr)

    def cudaMallocHost(size):
        if not isinstance(size, int) or size <= 0:
            raise StandInError(f"cudaMallocHost({size!r})")
        array = np.full(size, 0xEE, dtype=np.uint8)
        gpu.pinned[array.ctypes.data] = array
        return ok, array.ctypes.data

    def cudaFreeHost(ptr):
        if ptr not in gpu.pinned:
            raise StandInError(f"cudaFreeHost({ptr:#x}): not pinned host memory (double free?)")
        del gpu.pinned[ptr]
        return (ok,)

    def cudaRuntimeGetVersion():
        return ok, gpu.cuda_version

    def cudaGetDevice():
        return (ok, 0) if gpu.usable else (cudaError_t.cudaErrorInvalidValue, 0)

    def cudaDeviceGetAttribute(attr, device):
        if attr != cudaDeviceAttr.cudaDevAttrMemoryPoolsSupported or device != 0:
            raise StandInError(f"cudaDeviceGetAttribute({attr!r}, {device!r}): not in the stand-in's subset")
        return ok, int(gpu.memory_pools)

    def cudaDeviceGetDefaultMemPool(device):
        if not gpu.memory_pools:
            return cudaError_t.cudaErrorNotSupported, None
        return ok, _POOL

    def cudaMemPoolSetAttribute(pool, attr, value):
        if pool is not _POOL or attr != cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold:
            raise StandInError(f"cudaMemPoolSetAttribute({pool!r}, {attr!r}): not in the stand-in's subset")
        if not isinstance(value, cuuint64_t):
            raise TypeError("cudaMemPoolSetAttribute(): the release threshold must be a cuuint64_t")
        gpu.pool_release_threshold = int(value)
        return (ok,)

    def cudaMemPoolTrimTo(pool, minBytesToKeep):
        if pool is not _POOL or minBytesToKeep != 0:
            raise StandInError(f"cudaMemPoolTrimTo({pool!r}, {minBytesToKeep!r})")
        gpu.pool_trims += 1
        return (ok,)

    def cudaDriverGetVersion():
        return ok, gpu.driver_version

    def _stream(stream):
        if int(stream) not in gpu.streams:
            raise StandInError(f"stream {int(stream):#x} is not a live stream")

    def _directions(kind, dst, src, nbytes, what):
        kind = cudaMemcpyKind(kind)
        dst_dev = gpu.allocation_of(dst, nbytes) is not None
        src_dev = gpu.allocation_of(src, nbytes) is not None
        want = {cudaMemcpyKind.cudaMemcpyHostToDevice: (True, False),
                cudaMemcpyKind.cudaMemcpyDeviceToHost: (False, True),
                cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True)}[kind]
        if (dst_dev, src_dev) != want:
            raise StandInError(f"{what} {kind.name}: destination {'device' if dst_dev else 'host/outside'}, "
                               f"source {'device' if src_dev else 'host/outside'} (or out of bounds)")
        return {1: "h2d", 2: "d2h", 3: "d2d"}[int(kind)]

    def _unordered(writes: list, reads: list, what: str) -> None:
        """The copies of one batch run in no particular order: a write that overlaps another
        write or any read is undefined behaviour on a real GPU, an error here."""
        spans = sorted([(start, start + size, True) for start, size in writes if size] +
                       [(start, start + size, False) for start, size in reads if size])
        written_to = any_to = -1
        for start, end, is_write in spans:
            if start < written_to or (is_write and start < any_to):
                raise StandInError(f"{what}: copies of one batch overlap at {start:#x} (they run in no order)")
            any_to = max(any_to, end)
            if is_write:
                written_to = max(written_to, end)

    def cudaMemcpyAsync(dst, src, count, kind, stream):
        _stream(stream)
        label = _directions(kind, int(dst), int(src), int(count), "cudaMemcpyAsync")
        ctypes.memmove(int(dst), int(src), int(count))
        gpu.copies.append(Copy(label, int(dst), int(src), int(count)))
        gpu.copy_entries += 1
        return (ok,)

    def cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream):
        _stream(stream)
        if width > dpitch or width > spitch:
            raise StandInError(f"cudaMemcpy2DAsync: width {width} exceeds a pitch ({dpitch}, {spitch})")
        for row in range(height):
            d, s = int(dst) + row * dpitch, int(src) + row * spitch
            label = _directions(kind, d, s, width, "cudaMemcpy2DAsync")
            ctypes.memmove(d, s, width)
        gpu.copies.append(Copy(label if height else "d2d", int(dst), int(src), width * height))
        gpu.copy_entries += 1
        return (ok,)

    def cudaMemcpyBatchAsync(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, stream):
        if min(gpu.cuda_version, gpu.driver_version) < 12080:
            raise StandInError("cudaMemcpyBatchAsync needs CUDA 12.8+ in both the runtime and the driver")
        if stream is None or int(stream) == 0:
            raise StandInError("cudaMemcpyBatchAsync: the legacy NULL stream is not allowed")
        _stream(stream)
        lists = (dsts, srcs, sizes, attrsIdxs)
        if not all(isinstance(v, (list, tuple)) for v in lists + (attrs,)):
            raise StandInError("cudaMemcpyBatchAsync takes lists")
        if not (len(dsts) == len(srcs) == len(sizes) == count) or not all(isinstance(v, int) for v in sizes):
            raise StandInError(f"cudaMemcpyBatchAsync: {len(dsts)}/{len(srcs)}/{len(sizes)} entries for count {count}")
        if (len(attrs) != numAttrs or len(attrsIdxs) != numAttrs or not numAttrs or attrsIdxs[0] != 0
                or sorted(attrsIdxs) != list(attrsIdxs) or any(i >= count for i in attrsIdxs)):
            raise StandInError(f"cudaMemcpyBatchAsync: attributes {attrsIdxs} x {numAttrs} do not cover the batch")
        for a in attrs:
            if not isinstance(a, cudaMemcpyAttributes) or a.srcAccessOrder == 0:
                raise StandInError("cudaMemcpyBatchAsync: each attribute needs a valid srcAccessOrder")
        if "cudaMemcpyBatchAsync" in gpu.refuse_batch:
            err = cudaError_t(gpu.refuse_batch["cudaMemcpyBatchAsync"])
            return (err, 0) if gpu.binding_line == 12 else (err,)
        _unordered(list(zip(map(int, dsts), sizes)), list(zip(map(int, srcs), sizes)), "cudaMemcpyBatchAsync")
        for dst, src, size in zip(dsts, srcs, sizes):
            _directions(cudaMemcpyKind.cudaMemcpyDeviceToDevice, int(dst), int(src), size, "cudaMemcpyBatchAsync")
            ctypes.memmove(int(dst), int(src), size)
        gpu.copies.append(Copy("d2d", int(dsts[0]) if count else 0, int(srcs[0]) if count else 0, sum(sizes)))
        gpu.copy_entries += count
        return (ok, 0) if gpu.binding_line == 12 else (ok,)

    def cudaMemcpy3DBatchAsync(numOps, opList, flags, stream):
        what = "cudaMemcpy3DBatchAsync"
        if min(gpu.cuda_version, gpu.driver_version) < 12080:
            raise StandInError(f"{what} needs CUDA 12.8+ in both the runtime and the driver")
        if stream is None or int(stream) == 0:
            raise StandInError(f"{what}: the legacy NULL stream is not allowed")
        _stream(stream)
        if not isinstance(opList, (list, tuple)) or len(opList) != numOps or not numOps or flags != 0:
            raise StandInError(f"{what}({numOps!r}, {len(opList) if isinstance(opList, (list, tuple)) else opList!r} "
                               f"ops, flags {flags!r})")
        if "cudaMemcpy3DBatchAsync" in gpu.refuse_batch:
            err = cudaError_t(gpu.refuse_batch["cudaMemcpy3DBatchAsync"])
            return (err, 0) if gpu.binding_line == 12 else (err,)
        total, moves = 0, []
        for op in opList:
            if not isinstance(op, cudaMemcpy3DBatchOp) or op.srcAccessOrder == 0 or op.flags != 0:
                raise StandInError(f"{what}: each op needs a valid srcAccessOrder and no flags")
            width, height, depth = op.extent.width, op.extent.height, op.extent.depth
            if not all(isinstance(v, int) and v > 0 for v in (width, height, depth)):
                raise StandInError(f"{what}: extent {width}x{height}x{depth} (each must be a positive int)")
            sides = []
            for side in (op.dst, op.src):
                if side.type != cudaMemcpy3DOperandType.cudaMemcpyOperandTypePointer:
                    raise StandInError(f"{what}: only pointer operands are in the stand-in's subset")
                ptr = side.op.ptr
                if (ptr.rowLength and ptr.rowLength < width) or (ptr.layerHeight and ptr.layerHeight < height):
                    raise StandInError(f"{what}: row {ptr.rowLength} / layer {ptr.layerHeight} under the extent "
                                       f"{width}x{height}")
                pitch, rows = ptr.rowLength or width, ptr.layerHeight or height
                sides.append((int(ptr.ptr), pitch, pitch * rows))
            (dst, dst_pitch, dst_layer), (src, src_pitch, src_layer) = sides
            for k in range(depth):
                for r in range(height):
                    d, s_ = dst + k * dst_layer + r * dst_pitch, src + k * src_layer + r * src_pitch
                    _directions(cudaMemcpyKind.cudaMemcpyDeviceToDevice, d, s_, width, what)
                    moves.append((d, s_, width))
            total += width * height * depth
        _unordered([(d, n) for d, _, n in moves], [(s_, n) for _, s_, n in moves], what)
        for d, s_, n in moves:
            ctypes.memmove(d, s_, n)
        gpu.copies.append(Copy("d2d", int(opList[0].dst.op.ptr.ptr), int(opList[0].src.op.ptr.ptr), total))
        gpu.copy_entries += numOps
        return (ok, 0) if gpu.binding_line == 12 else (ok,)

    def cudaMemsetAsync(devPtr, value, count, stream):
        _stream(stream)
        gpu.device_view(int(devPtr), int(count), "cudaMemsetAsync")[:] = int(value) & 0xFF
        return (ok,)

    def cudaStreamCreate():
        if not gpu.usable:
            return cudaError_t(gpu.count_error or cudaError_t.cudaErrorNoDevice), None
        handle = next(handles)
        gpu.streams.add(handle)
        return ok, cudaStream_t(handle)

    def cudaStreamSynchronize(stream):
        _stream(stream)
        return (ok,)

    def cudaStreamDestroy(stream):
        _stream(stream)
        gpu.streams.discard(int(stream))
        return (ok,)

    calls = dict(
        cudaGetErrorName=cudaGetErrorName, cudaGetDeviceCount=cudaGetDeviceCount,
        cudaGetDeviceProperties=cudaGetDeviceProperties, cudaMalloc=cudaMalloc, cudaFree=cudaFree,
        cudaMallocAsync=cudaMallocAsync, cudaFreeAsync=cudaFreeAsync, cudaMallocHost=cudaMallocHost,
        cudaFreeHost=cudaFreeHost, cudaRuntimeGetVersion=cudaRuntimeGetVersion,
        cudaDriverGetVersion=cudaDriverGetVersion, cudaMemcpyAsync=cudaMemcpyAsync,
        cudaMemcpy2DAsync=cudaMemcpy2DAsync, cudaMemcpyBatchAsync=cudaMemcpyBatchAsync,
        cudaMemcpy3DBatchAsync=cudaMemcpy3DBatchAsync,
        cudaMemsetAsync=cudaMemsetAsync, cudaStreamCreate=cudaStreamCreate, cudaGetDevice=cudaGetDevice,
        cudaDeviceGetAttribute=cudaDeviceGetAttribute, cudaDeviceGetDefaultMemPool=cudaDeviceGetDefaultMemPool,
        cudaMemPoolSetAttribute=cudaMemPoolSetAttribute, cudaMemPoolTrimTo=cudaMemPoolTrimTo,
        cudaStreamSynchronize=cudaStreamSynchronize, cudaStreamDestroy=cudaStreamDestroy)

    def counted(name, call):
        def run(*args):
            gpu.calls[name] += 1
            return call(*args)
        return run
    absent = ((BATCH_COPY_CALLS if not gpu.batch_copy else ()) + (ASYNC_ALLOC_CALLS if not gpu.async_alloc else ())
              + (BATCH_COPY_3D_CALLS if not gpu.batch_copy_3d else ()))
    members = {name: counted(name, call) for name, call in calls.items() if name not in absent}
    members.update({k: v for k, v in dict(cudaError_t=cudaError_t, cudaMemcpyKind=cudaMemcpyKind,
                                          cudaDeviceAttr=cudaDeviceAttr, cudaMemPoolAttr=cudaMemPoolAttr,
                                          cudaMemcpyAttributes=cudaMemcpyAttributes,
                                          cudaMemcpySrcAccessOrder=cudaMemcpySrcAccessOrder,
                                          cudaMemcpy3DBatchOp=cudaMemcpy3DBatchOp,
                                          cudaMemcpy3DOperandType=cudaMemcpy3DOperandType).items()
                    if k not in absent})
    return _strict_module("cuda.bindings.runtime", members, absent)


# ---------------------------------------------------------------------------------------
# tensorrt
# ---------------------------------------------------------------------------------------
def make_tensorrt(gpu: FakeGPU, version: str = "10.13.3.9") -> types.ModuleType:
    import onnxruntime as ort       # captured now: a test may hide onnxruntime from the code under test

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class Logger(_Strict):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = list(Severity)

        def __init__(self, min_severity=Severity.WARNING):
            self.min_severity = Severity(min_severity)

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3
        BOOL = 4
        BF16 = 7
        INT64 = 8

    _DATA_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF,
                   "tensor(bfloat16)": DataType.BF16, "tensor(int64)": DataType.INT64,
                   "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL}

    class TensorIOMode(enum.IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    def _start_cuda(what):
        if not gpu.usable:   # what the real bindings do when CUDA cannot start
            raise TypeError(f"{what}(): incompatible constructor arguments / factory function returned nullptr")

    def _load(onnx_path: str):
        """(a CPU session for the graph, the graph's own I/O element types): the graph itself,
        or its fp32 twin when ONNX Runtime cannot run it (bf16)."""
        try:
            session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            return session, {m.name: m.type for m in list(session.get_inputs()) + list(session.get_outputs())}
        except Exception as first:          # noqa: BLE001 - ORT's own error types
            try:
                twin, io_types = fp32_twin(onnx_path)
            except Exception:               # noqa: BLE001 - not a graph at all: ORT's words
                raise first from None
            return ort.InferenceSession(twin, providers=["CPUExecutionProvider"]), io_types

    def _session(onnx_path: str):
        return _load(onnx_path)[0]

    def _dims(shape):
        return [d if isinstance(d, int) else -1 for d in shape]

    class IProgressMonitor:
        def __init__(self):
            pass

    class INetworkDefinition(_Strict):
        def __init__(self, flags):
            self.flags = flags
            self.onnx = None
            self.inputs = {}

    class OnnxParser(_Strict):
        def __init__(self, network, logger):
            self.network, self._errors = network, []

        def parse_from_file(self, path):
            try:
                session = _session(path)
            except Exception as e:
                self._errors = [f"stand-in parser: {str(e).splitlines()[0]}"]
                return False
            self.network.onnx = str(Path(path).resolve())
            self.network.inputs = {i.name: len(i.shape) for i in session.get_inputs()}
            return True

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index):
            return self._errors[index]

    class IOptimizationProfile(_Strict):
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            lo, mid, hi = list(min), list(opt), list(max)
            if not (len(lo) == len(mid) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, mid, hi)):
                raise StandInError(f"set_shape({name}): min <= opt <= max does not hold: {lo} {mid} {hi}")
            self.shapes[name] = {"min": lo, "opt": mid, "max": hi}

    class ITimingCache(_Strict):
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return CACHE_MAGIC + f"{version}/{gpu.name}".encode()

    class IBuilderConfig(_Strict):
        def __init__(self):
            self.profiles, self.pool_limits, self._cache = [], {}, None
            self.progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            self.pool_limits[MemoryPoolType(pool)] = int(size)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            data = bytes(data)
            if data and not data.startswith(CACHE_MAGIC):
                return None                # bytes TensorRT cannot read: the binding returns a nullptr
            return ITimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if not isinstance(cache, ITimingCache):
                raise TypeError("set_timing_cache(): incompatible function arguments")   # what pybind11 says
            mine = CACHE_MAGIC + f"{version}/{gpu.name}".encode()
            if cache.data and cache.data != mine and not ignore_mismatch:
                return False               # another GPU / TensorRT: refused, nothing set
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    class Builder(_Strict):
        def __init__(self, logger):
            _start_cuda("Builder")

        def create_network(self, flags=0):
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            if not network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
                raise StandInError("networks must be strongly typed (TensorRT 11 has no weak typing)")
            if network.onnx is None or not config.profiles:
                raise StandInError("build without a parsed network or without an optimization profile")
            for profile in config.profiles:
                for name, rank in network.inputs.items():
                    shape = profile.shapes.get(name)
                    if shape is None or len(shape["max"]) != rank:
                        raise StandInError(f"profile misses input {name} or has the wrong rank")
            if Path(network.onnx).name in gpu.fail_build:
                return None
            plan = {"onnx": network.onnx, "profiles": [p.shapes for p in config.profiles], "tensorrt": version,
                    "cc": list(gpu.compute_capability)}
            return PLAN_MAGIC + json.dumps(plan).encode()

    class ICudaEngine(_Strict):
        def __init__(self, plan: dict):
            self.plan = plan
            self.session, self.io_types = _load(plan["onnx"])     # the engine's own types (bf16 stays bf16)
            self._inputs = {i.name: i for i in self.session.get_inputs()}
            self._outputs = {o.name: o for o in self.session.get_outputs()}
            self._names = list(self._inputs) + list(self._outputs)

        @property
        def num_io_tensors(self):
            return len(self._names)

        @property
        def num_optimization_profiles(self):
            return len(self.plan["profiles"])

        def get_tensor_name(self, index):
            return self._names[index]

        def get_tensor_mode(self, name):
            return (TensorIOMode.INPUT if name in self._inputs else
                    TensorIOMode.OUTPUT if name in self._outputs else TensorIOMode.NONE)

        def get_tensor_shape(self, name):
            meta = self._inputs.get(name) or self._outputs.get(name)
            if meta is None:
                raise StandInError(f"get_tensor_shape({name!r}): no such tensor")
            return _dims(meta.shape)

        def get_tensor_dtype(self, name):
            if name not in self.io_types:
                raise StandInError(f"get_tensor_dtype({name!r}): no such tensor")
            return gpu.dtype_override.get(name) or _DATA_TYPES[self.io_types[name]]

        def create_execution_context(self):
            return None if gpu.fail_context else IExecutionContext(self)

    class IExecutionContext(_Strict):
        def __init__(self, engine):
            self.engine, self.profile = engine, 0
            self.shapes, self.addresses = {}, {}

        def set_optimization_profile_async(self, index, stream_handle):
            if not isinstance(stream_handle, int) or stream_handle not in gpu.streams:
                raise StandInError(f"set_optimization_profile_async: {stream_handle!r} is not a live stream handle")
            if not 0 <= index < self.engine.num_optimization_profiles:
                return False
            self.profile, self.shapes = index, {}
            return True

        def set_input_shape(self, name, shape):
            if name not in self.engine._inputs:
                return False
            bounds = self.engine.plan["profiles"][self.profile][name]
            shape = list(shape)
            if len(shape) != len(bounds["min"]) or any(
                    not lo <= d <= hi for lo, d, hi in zip(bounds["min"], shape, bounds["max"])):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, memory):
            if not isinstance(memory, int):
                raise TypeError(f"set_tensor_address(): memory must be an int, got {type(memory).__name__}")
            if name not in self.engine._names:
                return False
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            if not isinstance(stream_handle, int) or stream_handle not in gpu.streams:
                raise StandInError(f"execute_async_v3: {stream_handle!r} is not a live stream handle")
            if Path(self.engine.plan["onnx"]).name in gpu.fail_execute:
                return False
            feeds = {}
            for name, meta in self.engine._inputs.items():
                if name not in self.shapes or name not in self.addresses:
                    raise StandInError(f"execute_async_v3: input {name} has no shape or no address")
                kind = self.engine.io_types[name]
                dtype = np.dtype(_NP[kind])
                shape = self.shapes[name]
                nbytes = int(np.prod(shape)) * dtype.itemsize
                view = gpu.device_view(self.addresses[name], max(nbytes, 1), f"input {name}")
                feeds[name] = view[:nbytes].view(dtype).reshape(shape).copy()
                if kind == "tensor(bfloat16)":
                    feeds[name] = bf16_to_fp32(feeds[name])
            for name in self.engine._outputs:
                if name not in self.addresses:
                    raise StandInError(f"execute_async_v3: output {name} has no address")
            outputs = self.engine.session.run(list(self.engine._outputs), feeds)
            for name, value in zip(self.engine._outputs, outputs):
                value = np.ascontiguousarray(value)
                if self.engine.io_types[name] == "tensor(bfloat16)":
                    value = fp32_to_bf16(value)
                view = gpu.device_view(self.addresses[name], max(value.nbytes, 1), f"output {name}")
                view[:value.nbytes] = value.reshape(-1).view(np.uint8)
            gpu.executions.append((Path(self.engine.plan["onnx"]).name, self.profile, dict(self.shapes)))
            return True

    class Runtime(_Strict):
        def __init__(self, logger):
            _start_cuda("Runtime")

        def deserialize_cuda_engine(self, serialized):
            data = bytes(serialized)
            if not data.startswith(PLAN_MAGIC):
                return None                 # TensorRT logs an error and returns None
            plan = json.loads(data[len(PLAN_MAGIC):])
            if plan["tensorrt"] != version or tuple(plan["cc"]) != tuple(gpu.compute_capability):
                return None
            return ICudaEngine(plan)

    return _strict_module("tensorrt", dict(
        __version__=version, Logger=Logger, TensorIOMode=TensorIOMode, DataType=DataType,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, MemoryPoolType=MemoryPoolType,
        IProgressMonitor=IProgressMonitor, OnnxParser=OnnxParser, Builder=Builder, Runtime=Runtime))


class StandIn:
    """Both stand-in modules over one fake GPU."""

    def __init__(self, **knobs):
        self.gpu = FakeGPU(**knobs)
        self.cudart = make_cudart(self.gpu)
        self.tensorrt = make_tensorrt(self.gpu)

    def install(self, monkeypatch) -> "StandIn":
        cuda = types.ModuleType("cuda")
        bindings = types.ModuleType("cuda.bindings")
        driver = _strict_module("cuda.bindings.driver", dict(cuuint64_t=cuuint64_t))
        bindings.runtime, bindings.driver = self.cudart, driver
        cuda.bindings = bindings
        for name, module in (("tensorrt", self.tensorrt), ("cuda", cuda), ("cuda.bindings", bindings),
                             ("cuda.bindings.runtime", self.cudart), ("cuda.bindings.driver", driver)):
            monkeypatch.setitem(__import__("sys").modules, name, module)
        return self

    def host_reads(self) -> list:
        """Device-to-host copies so far (the only way data reaches the host)."""
        return [c for c in self.gpu.copies if c.kind == "d2h"]

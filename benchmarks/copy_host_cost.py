"""Host cost of a device-KV step's copies with the real cuda-bindings, on any machine.

    pip install "cuda-bindings==12.9.*"   # or 13.*
    python benchmarks/copy_host_cost.py [--size qwen3-0.6b] [--kv fp32]

cuda-bindings imports without a driver and converts every argument of a call before the call
answers "no driver" (cudaErrorInsufficientDriver), so the host time the runtime's own copy
arguments cost (CudaStream.copy_blocks: building the 3-D ops, or expanding every row for a
row batch, and the bindings' conversion) is measured here without a GPU. A step is one gather
(every stream's past into the batch tensor) and one scatter (every stream's new keys/values
back), laid out as runtime/backends/device_kv.py lays them out.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import SIZES  # noqa: E402

PATHS = {"3-D batch (one entry per stream)": True, "row batch (one entry per row)": False}


def step_copies(streams: int, layers: int, heads: int, head_dim: int, element: int, past: int, new: int):
    """The gather and the scatter of one step for `streams` streams, as BlockCopies."""
    from siren_runtime.backends.cuda_memory import BlockCopies
    rb = head_dim * element
    base, cache = 1 << 40, 1 << 36                       # addresses only: nothing is dereferenced
    capacity = 2 * past
    rows = np.full(streams, heads, dtype=np.int64)
    b = np.arange(streams, dtype=np.int64)
    ones = lambda v: np.full(streams, v, dtype=np.int64)   # noqa: E731
    gather = BlockCopies(dst=base + b * heads * past * rb, dst_pitch=ones(past * rb), dst_layer_rows=streams * rows,
                         src=cache + b * (capacity * 2 * layers * heads * rb), src_pitch=ones(capacity * rb),
                         src_layer_rows=rows, width=ones(past * rb), height=heads, depth=2 * layers)
    scatter = BlockCopies(dst=cache + b * (capacity * 2 * layers * heads * rb) + past * rb,
                          dst_pitch=ones(capacity * rb), dst_layer_rows=rows,
                          src=base + b * heads * new * rb, src_pitch=ones(new * rb), src_layer_rows=streams * rows,
                          width=ones(new * rb), height=heads, depth=2 * layers)
    return gather, scatter


#: a stream handle that is only converted, never used (not 0 or 1: the legacy NULL stream, which
#: batched copies refuse): without a driver the call answers "no driver"; with one, "invalid handle"
FAKE_STREAM = 0x5EED


def timed_copy(stream, copies, repeat: int) -> float:
    """Median ms of queueing `copies`: the bindings convert every argument, then the call
    answers with an error (no driver here, an invalid handle on a GPU box)."""
    from siren_runtime.backends.cuda_env import CudaError
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            stream.copy_blocks(copies)
        except CudaError:
            pass
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="qwen3-0.6b", choices=sorted(SIZES))
    parser.add_argument("--kv", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--past", type=int, default=256, help="positions each stream holds")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    from cuda.bindings import runtime as rt
    from siren_runtime.backends.cuda_memory import CudaStream
    dims = SIZES[args.size]
    element = 4 if args.kv == "fp32" else 2
    print(f"cuda-bindings {metadata.version('cuda-bindings')}, Python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}; {args.size} dims ({dims['num_layers']} layers, "
          f"{dims['num_kv_heads']} KV heads, head dim {dims['head_dim']}), {args.kv} KV, {args.past} past positions\n")
    print("| streams | copy path | entries per step | host ms per step (gather + scatter) |")
    print("|---:|---|---:|---:|")
    for streams in (1, 16, 64):
        gather, scatter = step_copies(streams, dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], element,
                                      args.past, new=4)
        for label, three_d in PATHS.items():
            features = {"batched_copy": True, "batched_copy_3d": three_d, "async_alloc": False}
            stream = CudaStream(rt, features, handle=FAKE_STREAM)
            ms = timed_copy(stream, gather, args.repeat) + timed_copy(stream, scatter, args.repeat)
            entries = 2 * streams if three_d else 2 * streams * 2 * dims["num_layers"] * dims["num_kv_heads"]
            print(f"| {streams} | {label} | {entries:,} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

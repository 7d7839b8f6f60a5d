"""Reading a safetensors checkpoint one tensor at a time with plain reads.

A memory map of a shard keeps every page it has touched resident until the whole mapping
goes, so widening a mapped bf16 checkpoint to fp32 holds up to one shard (2+ GiB at Qwen3-4B)
beside the fp32 model. Here each tensor's bytes are read into a buffer of its own, which is
freed as soon as the caller has copied it where it belongs.

The format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}} and the data.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterator, Optional

#: safetensors dtype names -> torch dtype attribute names
TORCH_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                     "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, offset of the data) of one safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def iter_tensors(path: Path, wanted: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[str, "object"]]:
    """(name, torch tensor owning its own buffer) for each tensor of `path` that `wanted` accepts,
    in file order (sequential reads)."""
    import torch
    header, data_start = read_header(path)
    entries = sorted(((name, info) for name, info in header.items() if wanted is None or wanted(name)),
                     key=lambda item: item[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name, info in entries:
            begin, end = info["data_offsets"]
            dtype = getattr(torch, TORCH_DTYPE_NAMES[info["dtype"]])
            shape = tuple(info["shape"])
            if end == begin:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            buffer = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buffer) != end - begin:
                raise ValueError(f"{path}: tensor {name} runs past the end of the file")
            yield name, torch.frombuffer(buffer, dtype=dtype).reshape(shape)

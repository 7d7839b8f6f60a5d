"""The u8 x s8 twin of a dynamic int8 graph, for CPUs whose integer dot products are exact.

The dynamic scheme stores weights as uint8 around 128 (u8 x u8): exact on every CPU, since
ONNX Runtime's u8 x s8 kernel for CPUs without AVX-512 VNNI / AVX-VNNI sums pairs of products
in saturating int16. With VNNI, u8 x s8 is exact too and measured 1.3-1.7x faster end to end
(benchmarks/int8_coding.py). The same integers coded as int8 are each code with its top bit
flipped (c ^ 0x80 == c - 128 as int8), zero point 0. So the bundle ships one weights file and,
per graph, a twin that reads the same bytes as int8; the manifest lists the byte ranges a
runtime on such a CPU flips in its own private copy (once hashed) before loading the twin.
Scores are the same integers' (tested equal).
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

import numpy as np

TWIN_SUFFIX = ".s8.onnx"


def twin_name(graph_path: str) -> str:
    return graph_path[:-len(".onnx")] + TWIN_SUFFIX if graph_path.endswith(".onnx") else graph_path + TWIN_SUFFIX


def write_twin(folder: Path, graph_path: str, weights_file: str) -> tuple[str, list]:
    """Write `graph_path`'s twin beside it; returns (twin path, [[offset, length], ...] of the
    weight codes in `weights_file` that the twin reads as int8)."""
    model = onnx.load(str(folder / graph_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    weights, zero_points = set(), set()
    for node in model.graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            weights.add(node.input[1])
            zero_points.add(node.input[5])
    recoded = weights | zero_points
    for node in model.graph.node:     # a recoded tensor read elsewhere would change meaning there
        slots = {1: weights, 5: zero_points} if node.op_type == "MatMulIntegerToFloat" else {}
        for i, name in enumerate(node.input):
            if name in recoded and name not in slots.get(i, ()):
                raise ValueError(f"{graph_path}: {name} is read by {node.op_type} {node.name!r} "
                                 "as more than an int8 weight or its zero point")
    missing = sorted(n for n in recoded if n not in inits)
    if missing:
        raise ValueError(f"{graph_path}: {missing[0]} is not an initializer (computed weights cannot be recoded)")
    ranges = []
    for name in sorted(weights):
        tensor = inits[name]
        if tensor.data_type != TensorProto.UINT8 or tensor.data_location != TensorProto.EXTERNAL:
            raise ValueError(f"{graph_path}: {name} is not a uint8 weight in the weights file")
        where = {e.key: e.value for e in tensor.external_data}
        if where.get("location") != weights_file:
            raise ValueError(f"{graph_path}: {name} lives in {where.get('location')!r}, not {weights_file!r}")
        ranges.append([int(where["offset"]), int(where["length"])])
        tensor.data_type = TensorProto.INT8
    for name in zero_points:
        if int(numpy_helper.to_array(inits[name])) != 128:
            raise ValueError(f"{graph_path}: weight zero point {name} is not 128")
        inits[name].CopyFrom(numpy_helper.from_array(np.array(0, np.int8), name))
    twin = twin_name(graph_path)
    (folder / twin).write_bytes(model.SerializeToString())
    return twin, ranges


def write_twins(folder: Path, graph_paths: list, weights_file: str) -> dict:
    """The manifest record: {"graphs": {graph: twin}, "weights": file, "flip": merged ranges}."""
    graphs, ranges = {}, set()
    for path in graph_paths:
        twin, found = write_twin(folder, path, weights_file)
        graphs[path] = twin
        ranges.update(map(tuple, found))
    return {"graphs": graphs, "weights": weights_file, "flip": _merged(sorted(ranges)),
            "method": "each listed byte XOR 0x80 (uint8 code - 128 as int8), weight zero point 0"}


def _merged(ranges: list) -> list:
    """Sorted distinct ranges (both graphs read the same weights: the caller drops repeats),
    adjacent ones joined; a partial overlap means two tensors share bytes, which is refused."""
    out = []
    for offset, length in ranges:
        end = out[-1][0] + out[-1][1] if out else -1
        if offset < end:
            raise ValueError(f"weight ranges overlap partly at byte {offset}")
        if offset == end:
            out[-1][1] += length
        else:
            out.append([offset, length])
    return out

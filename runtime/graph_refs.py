"""Which files an ONNX graph reads its weights from, read off the graph's bytes.

A graph keeps large tensors in an external file named inside the graph (a tensor's
``external_data`` entry ``location``). Handed a graph as bytes, ONNX Runtime resolves such a
name against the process's working directory unless the file was handed to it in memory,
and TensorRT's parser resolves it against the graph's folder: either way it would read bytes
nobody hashed. The runtime therefore lists every name the graph refers to before any backend
sees the graph, and refuses one the manifest does not name (:func:`check_external_files`).

The reader walks only the protobuf fields that can hold tensors (initializers, sparse
initializers, node attributes, subgraphs, functions) and skips everything else unread, so a
graph with inline weights costs a pass over its field headers, not a copy of its data. It
needs neither the ``onnx`` package nor protobuf.
"""
from __future__ import annotations

from typing import Iterator, Optional

from .errors import BundleError

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_MAX_DEPTH = 64
_EXTERNAL = 1                       # TensorProto.DataLocation.EXTERNAL

# message -> {field number: message it holds}; fields not listed are skipped
_MODEL = "model"
_GRAPH = "graph"
_FUNCTION = "function"
_NODE = "node"
_ATTRIBUTE = "attribute"
_SPARSE = "sparse"
_TENSOR = "tensor"
_CHILDREN = {
    _MODEL: {7: _GRAPH, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _FUNCTION: {7: _NODE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, at: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= end or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of one message."""
    at = start
    while at < end:
        key, at = _varint(buf, at, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, at = _varint(buf, at, end)
            yield number, wire, value, at
        elif wire == _BYTES:
            size, at = _varint(buf, at, end)
            if at + size > end:
                raise _Malformed("a field runs past its message")
            yield number, wire, at, at + size
            at += size
        elif wire == _FIXED64:
            at += 8
        elif wire == _FIXED32:
            at += 4
        else:
            raise _Malformed(f"wire type {wire}")
    if at != end:
        raise _Malformed("a field runs past its message")


def _tensor_location(buf: memoryview, start: int, end: int) -> tuple[Optional[str], Optional[str], bool]:
    """(tensor name, external location, stored externally) of one TensorProto."""
    name, location, external = None, None, False
    for number, wire, a, b in _fields(buf, start, end):
        if number == 8 and wire == _BYTES:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif number == 14 and wire == _VARINT:
            external = a == _EXTERNAL
        elif number == 13 and wire == _BYTES:
            key = value = None
            for n, w, c, d in _fields(buf, a, b):
                if w == _BYTES and n in (1, 2):
                    text = bytes(buf[c:d]).decode("utf-8", "replace")
                    key, value = (text, value) if n == 1 else (key, text)
            if key == "location":
                location = value
    return name, location, external or location is not None


def _walk(buf: memoryview, start: int, end: int, kind: str, depth: int, found: list) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed("graphs nested too deeply")
    if kind == _TENSOR:
        name, location, external = _tensor_location(buf, start, end)
        if external:
            found.append((name or "?", location))
        return
    children = _CHILDREN[kind]
    for number, wire, a, b in _fields(buf, start, end):
        child = children.get(number)
        if child is not None and wire == _BYTES:
            _walk(buf, a, b, child, depth + 1, found)


def external_files(graph) -> list[tuple[str, Optional[str]]]:
    """(tensor name, file name as the graph writes it; None if it names none) for every
    tensor of a serialized ONNX model stored outside it. ValueError: not an ONNX model."""
    buf = memoryview(graph).cast("B") if not isinstance(graph, (bytes, bytearray)) else memoryview(graph)
    found: list = []
    try:
        _walk(buf, 0, len(buf), _MODEL, 0, found)
    except _Malformed as e:
        raise ValueError(f"not a well-formed ONNX model ({e})") from None
    return found


def check_external_files(graph, graph_path: str, allowed: Optional[str], where: str, bundle_dir) -> None:
    """Refuse a graph that reads weights from any file but `allowed` (the name, relative to
    the graph's folder, of the file the manifest's `where`external_data lists)."""
    try:
        refs = external_files(graph)
    except ValueError as e:
        raise BundleError(f"{bundle_dir}: {graph_path} is {e}; the bundle was written wrong or replaced with "
                          "its checksums: re-export it") from None
    for tensor, location in refs:
        if location is None:
            raise BundleError(f"{bundle_dir}: {graph_path} stores tensor {tensor!r} externally without naming a "
                              "file; the graph is malformed (re-export the bundle)")
        if allowed is None:
            raise BundleError(f"{bundle_dir}: {graph_path} reads its weights from {location!r}, but the "
                              f"manifest's {where}external_data is missing: the manifest must name (and "
                              "checksum) every file a graph reads; the runtime reads no other file")
        if location != allowed:
            raise BundleError(f"{bundle_dir}: {graph_path} reads weights from {location!r}, which the manifest "
                              f"does not name ({where}external_data is {allowed!r}); the runtime reads only "
                              "files the manifest lists and checksums")


__all__ = ["external_files", "check_external_files"]

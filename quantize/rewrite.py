"""Rewriting one bundle graph: decoder MatMuls -> int8 nodes; every other tensor kept (and,
for an fp16/bf16 source, computed in fp32 again: ONNX Runtime's CPU has no bf16 kernels).

Weights are read one initializer at a time from the source weights file (plain reads) and
written one at a time to the new one, so memory stays near the largest single tensor. The
scoring and step graphs share the source file; a source tensor is converted and written once
and both graphs point at the same bytes of the new file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import schemes
from .float_types import HALF_TYPES, to_float32  # noqa: F401 (HALF_TYPES: the pipeline's too)
from .schemes import QuantizedWeight, quantize_embedding, scheme_of
from .smoothing import quantizable_matmuls

MS_DOMAIN = "com.microsoft"
_ALIGN = 64
BLOCKED_QUANTIZE_OPSET = 21      # QuantizeLinear with block_size (a scale per row)


class WeightsFile:
    """The new weights file, appended tensor by tensor (64-byte aligned)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self._file = open(self.path, "wb")
        self.offset = 0
        self.written: dict = {}          # source key -> {suffix: (offset, length, dtype, dims)}

    def append(self, array: np.ndarray) -> tuple[int, int]:
        pad = (-self.offset) % _ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        data = np.ascontiguousarray(array).tobytes()
        self._file.write(data)
        start, self.offset = self.offset, self.offset + len(data)
        return start, len(data)

    def close(self) -> None:
        self._file.close()

    def tensor(self, name: str, record: tuple) -> TensorProto:
        offset, length, data_type, dims = record
        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t


class SourceWeights:
    """The source bundle's external data, read one tensor at a time into memory that is freed
    with the tensor (not memory-mapped: mapped pages of an 8 GB file stay resident)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._files: dict = {}

    def _file(self, location: str):
        if location not in self._files:
            self._files[location] = open(self.directory / location, "rb", buffering=0)
        return self._files[location]

    def key(self, tensor: TensorProto) -> tuple:
        """(file, offset, length): the same bytes seen by both graphs have the same key."""
        info = {e.key: e.value for e in tensor.external_data}
        location, offset = info["location"], int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else self._file(location).seek(0, 2) - offset
        return location, offset, length

    def read(self, key: tuple) -> np.ndarray:
        location, offset, length = key
        f = self._file(location)
        raw = np.empty(length, dtype=np.uint8)
        f.seek(offset)
        if f.readinto(memoryview(raw)) != length:
            raise ValueError(f"{self.directory / location}: a tensor runs past the end of the file")
        return raw

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


@dataclass
class GraphReport:
    quantized: int = 0
    kept: int = 0
    weight_bytes_in: int = 0
    weight_bytes_out: int = 0
    names: list = field(default_factory=list)
    opset: int = 0
    split_channels: int = 0               # input channels computed in fp32, over all MatMuls
    embedding: Optional[str] = None       # the table stored as int8 rows


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _float_type(elem_type: int, to_fp32: bool) -> int:
    return TensorProto.FLOAT if (to_fp32 and elem_type in HALF_TYPES) else elem_type


def _fp32_tensor(t: TensorProto) -> TensorProto:
    """An inline (non-external) half tensor as fp32."""
    if t.data_type not in HALF_TYPES:
        return t
    if t.raw_data:
        raw = np.frombuffer(t.raw_data, dtype=np.uint16)
    else:                                   # int32_data holds the 16-bit patterns
        raw = np.asarray(t.int32_data, dtype=np.uint32).astype(np.uint16)
    values = to_float32(raw.copy(), t.data_type).reshape(tuple(t.dims))
    out = numpy_helper.from_array(values.astype(np.float32), t.name)
    return out


def _float_node(node: onnx.NodeProto, to_fp32: bool) -> onnx.NodeProto:
    """Cast-to-half becomes Cast-to-fp32; half constants become fp32 (fp32 compute)."""
    if not to_fp32:
        return node
    for attr in node.attribute:
        if attr.name == "to" and node.op_type in ("Cast",) and attr.i in HALF_TYPES:
            attr.i = TensorProto.FLOAT
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF_TYPES:
            attr.t.CopyFrom(_fp32_tensor(attr.t))
        elif attr.name == "dtype" and attr.type == onnx.AttributeProto.INT and attr.i in HALF_TYPES:
            attr.i = TensorProto.FLOAT
    return node


class GraphRewriter:
    def __init__(self, model: onnx.ModelProto, source: SourceWeights, out: WeightsFile, scheme: str,
                 block_size: int, to_fp32: bool, smoothing: Optional[dict] = None, outliers: Optional[dict] = None,
                 embedding_int8: bool = False, input_ids: str = "input_ids"):
        """`smoothing`: {source weight key: per-input-channel factor s} (siren_quantize.smoothing);
        `outliers`: {source weight key: input channels computed in fp32} (siren_quantize.outliers);
        `embedding_int8`: the token embedding table (the Gather reading `input_ids`) as int8 rows."""
        self.model, self.source, self.out = model, source, out
        self.smoothing = smoothing or {}
        self.outliers = outliers or {}
        self.embedding_int8, self.input_ids = embedding_int8, input_ids
        self._split: dict = {}             # activation name -> (masked, gathered, channels)
        self.scheme, self.block_size, self.to_fp32 = scheme, block_size, to_fp32
        self.report = GraphReport()
        self._added: dict = {}             # initializer name -> TensorProto
        self._act: dict = {}               # activation name -> (quantized, row scale)
        self._smoothed: dict = {}          # activation name -> (its x / s, s)
        self.min_opset = 0                 # the default-domain opset the new nodes need

    # -- weights --------------------------------------------------------------------
    def _kept(self, t: TensorProto) -> TensorProto:
        """An initializer left as it is (fp32 after conversion), moved into the new file."""
        if not _is_external(t):
            return _fp32_tensor(t) if self.to_fp32 else t
        key = self.source.key(t)
        record = self.out.written.get(key)
        if record is None:
            raw = self.source.read(key)
            array = to_float32(np.asarray(raw), t.data_type) if self.to_fp32 else np.asarray(raw)
            data_type = _float_type(t.data_type, self.to_fp32)
            offset, length = self.out.append(array)
            record = {"": (offset, length, data_type, tuple(t.dims))}
            self.out.written[key] = record
            self.report.weight_bytes_in += raw.size
            self.report.weight_bytes_out += length
        self.report.kept += 1
        return self.out.tensor(t.name, record[""])

    def _quantized(self, t: TensorProto) -> dict:
        key = self.source.key(t)
        record = self.out.written.get(key)
        if record is None:
            raw = self.source.read(key)
            weight = to_float32(np.asarray(raw), t.data_type)
            weight = weight.view(np.float32).reshape(tuple(t.dims)) if t.data_type == TensorProto.FLOAT \
                else weight.reshape(tuple(t.dims))
            if key in self.smoothing:
                weight = weight * self.smoothing[key][:, None]
            record = {}
            channels = self.outliers.get(key)
            if channels is not None:           # those rows go to the fp32 MatMul, not int8
                rows = np.ascontiguousarray(weight[channels], dtype=np.float32)
                offset, length = self.out.append(rows)
                record["outlier_rows"] = (offset, length, TensorProto.FLOAT, rows.shape)
                self.report.weight_bytes_out += length
                weight = weight.copy()
                weight[channels] = 0.0
            qw: QuantizedWeight = scheme_of(self.scheme).quantize(weight, self.block_size)
            for suffix, array in qw.arrays.items():
                offset, length = self.out.append(array)
                data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
                record[suffix] = (offset, length, data_type, array.shape)
                self.report.weight_bytes_out += length
            record["meta"] = (qw.k, qw.n, qw.block_size)
            self.out.written[key] = record
            self.report.weight_bytes_in += raw.size
        return record

    def _embedding(self, node: onnx.NodeProto, table: TensorProto, nodes: list) -> None:
        """Gather(table, ids) -> Gather(int8 rows, ids) * Gather(row scales, ids)."""
        key = self.source.key(table)
        record = self.out.written.get(key)
        if record is None:
            raw = self.source.read(key)
            values = to_float32(np.asarray(raw), table.data_type)
            values = values.view(np.float32) if table.data_type == TensorProto.FLOAT else values
            arrays = quantize_embedding(values.reshape(tuple(table.dims)))
            del values
            record = {}
            for suffix, array in arrays.items():
                offset, length = self.out.append(array)
                record[suffix] = (offset, length, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
                self.report.weight_bytes_out += length
            self.out.written[key] = record
            self.report.weight_bytes_in += raw.size
        q = self._add(table.name + "__q8", record["q"])
        scale = self._add(table.name + "__row_scale", record["scale"])
        y, ids = node.output[0], node.input[1]
        nodes += [helper.make_node("Gather", [q, ids], [y + "__q8"], axis=0),
                  helper.make_node("Cast", [y + "__q8"], [y + "__f"], to=TensorProto.FLOAT),
                  helper.make_node("Gather", [scale, ids], [y + "__scale"], axis=0),
                  helper.make_node("Mul", [y + "__f", y + "__scale"], [y])]
        self.report.embedding = table.name

    def _split_activation(self, activation: str, channels: np.ndarray, k: int, nodes: list) -> tuple[str, str]:
        """(x with the outlier channels zeroed, those channels gathered), once per activation."""
        if activation in self._split:
            masked, gathered, seen = self._split[activation]
            if not np.array_equal(seen, channels):
                raise ValueError(f"{activation}: the MatMuls reading it split different channels")
            return masked, gathered
        mask = np.ones(k, np.float32)
        mask[channels] = 0.0
        masked, gathered = f"{activation}__inliers", f"{activation}__outliers"
        nodes += [helper.make_node("Mul", [activation, self._constant(f"{activation}__inlier_mask", mask)], [masked]),
                  helper.make_node("Gather", [activation, self._constant(f"{activation}__outlier_index", channels)],
                                   [gathered], axis=-1)]
        self._split[activation] = (masked, gathered, channels)
        return masked, gathered

    def _add(self, name: str, record: tuple) -> str:
        if name not in self._added:
            self._added[name] = self.out.tensor(name, record)
        return name

    def _constant(self, name: str, value) -> str:
        if name not in self._added:
            self._added[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    # -- nodes ----------------------------------------------------------------------
    def dynamic_int8_matmul(self, name: str, a: str, q: str, scale: str, y: str, k: int, nodes: list) -> None:
        """y = a @ W for the dynamic scheme: `a` quantized per row, ONNX Runtime's
        MatMulIntegerToFloat on the stored uint8 codes, then the row scale."""
        a_q, a_scale = self._row_quantized(a, k, nodes)
        one = self._constant("siren_q8_one", np.array(1.0, np.float32))
        codes = schemes.DYNAMIC_CODES
        inputs = [a_q, q, one, scale, self._constant("siren_q8_zp", np.array(codes.activation_zero_point, np.uint8)),
                  self._constant("siren_q8_wzp", np.array(codes.weight_zero_point, np.uint8))]
        nodes += [helper.make_node("MatMulIntegerToFloat", inputs, [y + "__int"], domain=MS_DOMAIN, name=name + "_q8"),
                  helper.make_node("Mul", [y + "__int", a_scale], [y])]

    def _row_quantized(self, activation: str, k: int, nodes: list) -> tuple[str, str]:
        """Per-token symmetric int8 of `activation` (uint8 around 128), once per tensor: the
        row's largest magnitude from ReduceMax/ReduceMin (no full-size |x| tensor) and one
        blocked QuantizeLinear with a block per row (opset 21), which rounds half to even
        and saturates like Div+Round+Add+Cast did, at a sixth of their time."""
        if activation in self._act:
            return self._act[activation]
        p = f"{activation}__q8"
        axes = self._constant("siren_q8_axes", np.array([-1], np.int64))
        codes = schemes.DYNAMIC_CODES
        inv = self._constant("siren_q8_inv_levels", np.array(1.0 / codes.activation_levels, np.float32))
        tiny = self._constant("siren_q8_tiny", np.array(1e-30, np.float32))
        zero_point = self._constant("siren_q8_zp", np.array(codes.activation_zero_point, np.uint8))
        nodes += [
            helper.make_node("ReduceMax", [activation, axes], [p + "_max"], keepdims=1),
            helper.make_node("ReduceMin", [activation, axes], [p + "_min"], keepdims=1),
            helper.make_node("Neg", [p + "_min"], [p + "_negmin"]),
            helper.make_node("Max", [p + "_max", p + "_negmin"], [p + "_amax"]),
            helper.make_node("Mul", [p + "_amax", inv], [p + "_s0"]),
            helper.make_node("Max", [p + "_s0", tiny], [p + "_scale"]),
            helper.make_node("Shape", [p + "_scale"], [p + "_shape"]),
            helper.make_node("Expand", [zero_point, p + "_shape"], [p + "_zp"]),
            helper.make_node("QuantizeLinear", [activation, p + "_scale", p + "_zp"], [p + "_u8"],
                             axis=-1, block_size=k),
        ]
        self._act[activation] = (p + "_u8", p + "_scale")
        self.min_opset = max(self.min_opset, BLOCKED_QUANTIZE_OPSET)
        return self._act[activation]

    def _smooth(self, activation: str, factor: np.ndarray, nodes: list) -> str:
        """x / s, once per activation (every MatMul reading it must have the same s)."""
        if activation in self._smoothed:
            name, seen = self._smoothed[activation]
            if not np.array_equal(seen, factor):
                raise ValueError(f"{activation}: the MatMuls reading it have different smoothing factors")
            return name
        name = f"{activation}__smoothed"
        inverse = self._constant(f"{activation}__inv_smooth", (1.0 / factor).astype(np.float32))
        nodes.append(helper.make_node("Mul", [activation, inverse], [name]))
        self._smoothed[activation] = (name, factor)
        return name

    def _matmul(self, node: onnx.NodeProto, weight: TensorProto, nodes: list) -> None:
        record = self._quantized(weight)
        k, n, block_size = record["meta"]
        q = self._add(weight.name + "__q8", record["q"])
        scale = self._add(weight.name + "__scale", record["scale"])
        a, y = node.input[0], node.output[0]
        factor = self.smoothing.get(self.source.key(weight))
        if factor is not None:
            a = self._smooth(a, factor, nodes)
        if "outlier_rows" in record:           # y = int8(x without outliers) + x[:, outliers] @ W[outliers]
            a, gathered = self._split_activation(a, self.outliers[self.source.key(weight)], k, nodes)
            rows = self._add(weight.name + "__outlier_rows", record["outlier_rows"])
            nodes.append(helper.make_node("MatMul", [gathered, rows], [y + "__fp32_part"]))
            join = helper.make_node("Add", [y + "__int8_part", y + "__fp32_part"], [y])
            y = y + "__int8_part"
            self.report.split_channels += len(self.outliers[self.source.key(weight)])
        else:
            join = None
        scheme_of(self.scheme).multiply(self, node.name or y, a, q, scale, y, (k, n, block_size), nodes)
        if join is not None:
            nodes.append(join)
        self.report.quantized += 1
        self.report.names.append(weight.name)

    def _embedding_tables(self, graph: onnx.GraphProto, initializers: dict) -> set:
        """The external 2-D float initializers that only Gathers of the token ids read."""
        readers: dict = {}
        for node in graph.node:
            for position, name in enumerate(node.input):
                if name in initializers:
                    readers.setdefault(name, []).append((node, position))
        tables = set()
        for name, uses in readers.items():
            t = initializers[name]
            if (_is_external(t) and len(t.dims) == 2 and t.data_type in (TensorProto.FLOAT, *HALF_TYPES)
                    and all(n.op_type == "Gather" and pos == 0 and n.input[1] == self.input_ids
                            and not any(a.name == "axis" and a.i != 0 for a in n.attribute) for n, pos in uses)):
                tables.add(name)
        return tables

    def run(self) -> GraphReport:
        graph = self.model.graph
        initializers = {t.name: t for t in graph.initializer}
        quantizable = set(quantizable_matmuls(graph, HALF_TYPES))
        nodes: list = []
        tables = self._embedding_tables(graph, initializers) if self.embedding_int8 else set()
        for node in graph.node:
            if node.op_type == "MatMul" and node.input[1] in quantizable:
                self._matmul(node, initializers[node.input[1]], nodes)
            elif node.op_type == "Gather" and node.input[0] in tables:
                self._embedding(node, initializers[node.input[0]], nodes)
            else:
                nodes.append(_float_node(node, self.to_fp32))
        kept = [self._kept(t) for t in graph.initializer if t.name not in quantizable and t.name not in tables]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept + list(self._added.values()))
        if self.to_fp32:
            for value in list(graph.input) + list(graph.output) + list(graph.value_info):
                if value.type.HasField("tensor_type"):
                    value.type.tensor_type.elem_type = _float_type(value.type.tensor_type.elem_type, True)
        for entry in self.model.opset_import:
            # 18 -> 21 changes no op the exporter writes (only new types and attributes)
            if entry.domain in ("", "ai.onnx") and entry.version < self.min_opset:
                entry.version = self.min_opset
        self.report.opset = max(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return self.report

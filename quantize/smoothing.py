"""SmoothQuant-style smoothing: move a projection input's outlier channels into its weights.

For a MatMul input X (shared by q/k/v, or by gate/up) and its weights W_i, X @ W_i equals
(X / s) @ (diag(s) W_i) for any positive per-channel s. With s_j = max|X_j|^a / max_i max|W_i[j]|^(1-a)
(a = `alpha`, 0.5 in the paper) a channel whose activations are tens of times larger than
the rest is divided down before X is quantized per token, and its weight row is multiplied
up before W is quantized per output channel, where a large row costs less. Exact in real
arithmetic: the fp32 graph is unchanged except for one Mul by 1/s per smoothed input.

max|X_j| comes from running the fp32 source scoring graph on calibration texts (ONNX Runtime
CPU, one text at a time so no padding reaches the ranges); fp16/bf16 sources cannot be
calibrated on the CPU and are not smoothed. The factors are keyed by the weight's bytes in the
source file, so the step graph, which reads the same weights, gets the same factors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

MIN_FACTOR = 1e-5


def quantizable_matmuls(graph: onnx.GraphProto, half_types: tuple = ()) -> dict:
    """{weight name: MatMul node} for MatMuls whose B is an external 2-D float initializer used
    by that node alone (the decoder's projections; the head's Gemms are not MatMuls)."""
    initializers = {t.name: t for t in graph.initializer}
    uses: dict = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    found = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in initializers:
            continue
        w = initializers[node.input[1]]
        if (w.data_location == TensorProto.EXTERNAL and len(w.dims) == 2 and uses[w.name] == 1
                and w.data_type in (TensorProto.FLOAT, *half_types)):
            found[w.name] = node
    return found


def _activation_ranges(source_dir: Path, graph_path: str, weights_file: str, activations: list,
                       token_ids: list) -> dict:
    """Per-channel max |x| of each activation over every token of every text."""
    from siren_runtime.backends.onnxruntime_runner import open_session
    model = onnx.load(str(source_dir / graph_path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    for name in activations:
        if name not in known:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    data = np.fromfile(source_dir / weights_file, dtype=np.uint8)
    session = open_session(model.SerializeToString(), "cpu", external={Path(weights_file).name: data})
    ranges = {name: None for name in activations}
    for ids in token_ids:
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        for name, value in zip(activations, session.run(activations, feeds)):
            amax = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            ranges[name] = amax if ranges[name] is None else np.maximum(ranges[name], amax)
    del session, data
    return ranges


def smoothing_factors(source_dir: Path, graph_path: str, weights_file: str, source, token_ids: list,
                      alpha: float) -> dict:
    """{source weight key: s} for every quantizable MatMul of the fp32 scoring graph."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"smoothing alpha must be in (0, 1), got {alpha!r}")
    model = onnx.load(str(source_dir / graph_path), load_external_data=False)
    matmuls = quantizable_matmuls(model.graph)
    initializers = {t.name: t for t in model.graph.initializer}
    groups: dict = {}
    for weight, node in matmuls.items():
        groups.setdefault(node.input[0], []).append(initializers[weight])
    ranges = _activation_ranges(source_dir, graph_path, weights_file, list(groups), token_ids)
    factors = {}
    for activation, weights in groups.items():
        w_max = None
        for w in weights:
            key = source.key(w)
            rows = np.abs(source.read(key).view(np.float32).reshape(tuple(w.dims))).max(axis=1)
            w_max = rows if w_max is None else np.maximum(w_max, rows)
        a_max = ranges[activation].astype(np.float64)
        s = np.power(np.maximum(a_max, MIN_FACTOR), alpha) / np.power(np.maximum(w_max, MIN_FACTOR), 1.0 - alpha)
        s = np.clip(s, MIN_FACTOR, 1.0 / MIN_FACTOR).astype(np.float32)
        for w in weights:
            factors[source.key(w)] = s
    return factors

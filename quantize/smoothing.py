"""SmoothQuant-style smoothing: move a projection input's outlier channels into its weights.

For a MatMul input X (shared by q/k/v, or by gate/up) and its weights W_i, X @ W_i equals
(X / s) @ (diag(s) W_i) for any positive per-channel s. With s_j = max|X_j|^a / max_i max|W_i[j]|^(1-a)
(a = `alpha`, 0.5 in the paper) a channel whose activations are tens of times larger than
the rest is divided down before X is quantized per token, and its weight row is multiplied
up before W is quantized per output channel, where a large row costs less. Exact in real
arithmetic: the fp32 graph is unchanged except for one Mul by 1/s per smoothed input.

max|X_j| comes from the calibration ranges (siren_quantize.calibration). The factors are
keyed by the weight's bytes in the source file, so the step graph, which reads the same
weights, gets the same factors.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from .float_types import HALF_TYPES, to_float32

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


def matmul_groups(graph: onnx.GraphProto, half_types: tuple = ()) -> dict:
    """{activation: [weight initializers of the quantizable MatMuls reading it]}."""
    initializers = {t.name: t for t in graph.initializer}
    groups: dict = {}
    for weight, node in quantizable_matmuls(graph, half_types).items():
        groups.setdefault(node.input[0], []).append(initializers[weight])
    return groups


def smoothing_factors(graph: onnx.GraphProto, ranges: dict, source, alpha: float) -> dict:
    """{source weight key: s} for every quantizable MatMul of the scoring graph, from the
    calibration `ranges` of its inputs, keyed by the source weights that read them
    (siren_quantize.pipeline.Calibration)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"smoothing alpha must be in (0, 1), got {alpha!r}")
    groups = matmul_groups(graph, HALF_TYPES)
    factors = {}
    for weights in groups.values():
        w_max = None
        for w in weights:
            key = source.key(w)
            raw = source.read(key)
            values = to_float32(raw, w.data_type) if w.data_type in HALF_TYPES else raw.view(np.float32)
            rows = np.abs(values.reshape(tuple(w.dims))).max(axis=1)
            w_max = rows if w_max is None else np.maximum(w_max, rows)
        a_max = ranges[source.key(weights[0])].astype(np.float64)
        s = np.power(np.maximum(a_max, MIN_FACTOR), alpha) / np.power(np.maximum(w_max, MIN_FACTOR), 1.0 - alpha)
        s = np.clip(s, MIN_FACTOR, 1.0 / MIN_FACTOR).astype(np.float32)
        for w in weights:
            factors[source.key(w)] = s
    return factors

"""The half-precision ONNX element types a source bundle may store, and their fp32 values:
what both the rewriter and the calibration read (a module of its own, so neither imports the
other)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

HALF_TYPES = (TensorProto.BFLOAT16, TensorProto.FLOAT16)


def to_float32(raw: np.ndarray, data_type: int) -> np.ndarray:
    if data_type == TensorProto.BFLOAT16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if data_type == TensorProto.FLOAT16:
        return raw.view(np.float16).astype(np.float32)
    return raw


__all__ = ["HALF_TYPES", "to_float32"]

"""How one weight matrix becomes int8, and the nodes that multiply by it.

dynamic    per-output-channel symmetric int8 weights; activations quantized per token
           (one scale per row, symmetric) at run time, then ONNX Runtime's
           MatMulIntegerToFloat and the row scale. Both operands are stored as uint8
           around 128 (u8 x u8): MLAS's u8 x s8 kernel for CPUs without AVX-512 VNNI sums
           pairs of products in saturating int16 (vpmaddubsw), which was measured here to
           be wrong by up to 10 % of a product's range; u8 x u8 is exact on every CPU.
           Fastest; one scale per token means a few huge activation channels (real LLMs
           have them) cost every other channel its precision.
blockwise  ONNX Runtime's MatMulNBits, 8 bits, blocks of `block_size` along K, weights
           packed by ONNX Runtime's own quantize_matmul_8bits, accuracy level 4 (int8
           compute with a scale per activation block): robust to outlier channels, slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("dynamic", "blockwise")
WEIGHT_ZERO_POINT = 128          # dynamic: int8 weights stored as uint8 (see above)
ACTIVATION_ZERO_POINT = 128


@dataclass
class QuantizedWeight:
    """Arrays to store (name suffix -> array) and how to build the node that uses them."""
    arrays: dict
    scheme: str
    k: int
    n: int
    block_size: int = 0


def quantize_weight(weight: np.ndarray, scheme: str, block_size: int = 32) -> QuantizedWeight:
    """`weight` is MatMul's B, fp32 [K, N]."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    k, n = weight.shape
    if scheme == "dynamic":
        scale = np.abs(weight).max(axis=0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(weight / scale), -127, 127).astype(np.int16)
        return QuantizedWeight({"q": (q + WEIGHT_ZERO_POINT).astype(np.uint8), "scale": scale}, scheme, k, n)
    if scheme == "blockwise":
        from onnxruntime.capi._pybind_state import quantize_matmul_8bits
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
        blocks = -(-k // block_size)
        if blocks * block_size != k:
            weight = np.pad(weight, ((0, blocks * block_size - k), (0, 0)))
        packed = np.zeros((n, blocks, block_size), dtype=np.uint8)
        scales = np.zeros((n, blocks), dtype=np.float32)
        zero_points = np.zeros((n, blocks), dtype=np.uint8)          # unused: symmetric
        quantize_matmul_8bits(packed, weight, scales, zero_points, block_size, n, k, True)
        return QuantizedWeight({"q": packed, "scale": scales}, scheme, k, n, block_size)
    raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")

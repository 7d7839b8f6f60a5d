"""How one weight matrix becomes int8, and the nodes that multiply by it.

dynamic    per-output-channel symmetric int8 weights; activations quantized per token
           (one scale per row, symmetric) at run time, then ONNX Runtime's
           MatMulIntegerToFloat and the row scale. Both operands are stored as uint8
           around 128 (u8 x u8): MLAS's u8 x s8 kernel for CPUs without AVX-512 VNNI sums
           pairs of products in saturating int16 (vpmaddubsw), which was measured on an
           AVX2 machine to be off by up to 8 % of the output range; u8 x u8 is exact on
           every CPU.
           Fastest; one scale per token means a few huge activation channels (real LLMs
           have them) cost every other channel its precision.
blockwise  ONNX Runtime's MatMulNBits, 8 bits, blocks of `block_size` along K, weights
           packed by ONNX Runtime's own quantize_matmul_8bits, accuracy level 4 (int8
           compute with a scale per activation block): robust to outlier channels, slower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np



@dataclass(frozen=True)
class IntegerCodes:
    """The dynamic scheme's integer codes: symmetric levels each side, and the zero point each
    operand is stored around (both uint8)."""
    weight_levels: int
    activation_levels: int
    weight_zero_point: int
    activation_zero_point: int


# u8 x u8, both 8-bit. Measured on the 0.6B-dims gate (AVX2, no VNNI): mean |Δ| 0.0042. The
# exact u8 x s8 alternatives lose a bit: 7-bit weights (ONNX Runtime's reduce_range) 0.0127,
# refused; 7-bit activations are 5.9 % off on outlier rows (the integer-arithmetic test).
DYNAMIC_CODES = IntegerCodes(weight_levels=127, activation_levels=127, weight_zero_point=128,
                             activation_zero_point=128)


@dataclass
class QuantizedWeight:
    """Arrays to store (name suffix -> array) and how to build the node that uses them."""
    arrays: dict
    scheme: str
    k: int
    n: int
    block_size: int = 0


class Scheme:
    """How a MatMul's weight becomes int8 and the nodes that multiply by it, with what the
    bundle says of it. One subclass per scheme, registered by `@register`: a new scheme is its
    class here and nothing else (the CLI's choices, the plans, the rewriter, the manifest and
    the ONNX Runtime requirement all read the registry)."""

    name = ""
    #: the oldest ONNX Runtime that runs the scheme's graphs
    onnxruntime_min = ""
    #: whether `block_size` means anything to it (and is recorded)
    uses_block_size = False
    #: whether a u8 x s8 twin of its graphs is written for VNNI CPUs
    signed_twin = False

    def label(self, block_size: int) -> str:
        return self.name + (f"/{block_size}" if self.uses_block_size else "")

    def activations(self, block_size: int) -> str:
        """How activations are quantized, as the manifest says it."""
        raise NotImplementedError

    def quantize(self, weight: np.ndarray, block_size: int) -> QuantizedWeight:
        """`weight` is MatMul's B, fp32 [K, N]."""
        raise NotImplementedError

    def multiply(self, rewriter, name: str, a: str, q: str, scale: str, y: str, shape: tuple, nodes: list) -> None:
        """Append the nodes computing y = a @ W from the stored `q` and `scale` (shape: k, n, block size)."""
        raise NotImplementedError


SCHEMES: dict = {}


def register(cls):
    SCHEMES[cls.name] = cls()
    return cls


def scheme_of(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {name!r}") from None


def _matrix(weight: np.ndarray) -> np.ndarray:
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weight.shape}")
    return np.ascontiguousarray(weight, dtype=np.float32)


@register
class Dynamic(Scheme):
    name = "dynamic"
    onnxruntime_min = "1.19"        # blocked QuantizeLinear (a scale per row) fails at run time on 1.18
    signed_twin = True

    def activations(self, block_size: int) -> str:
        return "int8 per token (dynamic; u8 x u8, exact without VNNI)"

    def quantize(self, weight: np.ndarray, block_size: int) -> QuantizedWeight:
        weight = _matrix(weight)
        k, n = weight.shape
        levels, zero_point = DYNAMIC_CODES.weight_levels, DYNAMIC_CODES.weight_zero_point
        scale = np.abs(weight).max(axis=0) / float(levels)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(weight / scale), -levels, levels).astype(np.int16)
        return QuantizedWeight({"q": (q + zero_point).astype(np.uint8), "scale": scale}, self.name, k, n)

    def multiply(self, rewriter, name, a, q, scale, y, shape, nodes) -> None:
        rewriter.dynamic_int8_matmul(name, a, q, scale, y, shape[0], nodes)


@register
class Blockwise(Scheme):
    name = "blockwise"
    onnxruntime_min = "1.22"        # 8-bit MatMulNBits refuses to load before ("Only 4b quantization")
    uses_block_size = True

    def activations(self, block_size: int) -> str:
        return f"int8 per block of {block_size} (MatMulNBits accuracy level 4)"

    def quantize(self, weight: np.ndarray, block_size: int) -> QuantizedWeight:
        from onnxruntime.capi._pybind_state import quantize_matmul_8bits
        weight = _matrix(weight)
        k, n = weight.shape
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
        blocks = -(-k // block_size)
        if blocks * block_size != k:
            weight = np.pad(weight, ((0, blocks * block_size - k), (0, 0)))
        packed = np.zeros((n, blocks, block_size), dtype=np.uint8)
        scales = np.zeros((n, blocks), dtype=np.float32)
        zero_points = np.zeros((n, blocks), dtype=np.uint8)          # unused: symmetric
        quantize_matmul_8bits(packed, weight, scales, zero_points, block_size, n, k, True)
        return QuantizedWeight({"q": packed, "scale": scales}, self.name, k, n, block_size)

    def multiply(self, rewriter, name, a, q, scale, y, shape, nodes) -> None:
        from onnx import helper
        k, n, block_size = shape
        nodes.append(helper.make_node("MatMulNBits", [a, q, scale], [y], domain="com.microsoft", name=name + "_q8",
                                      K=k, N=n, bits=8, block_size=block_size, accuracy_level=4))


def quantize_weight(weight: np.ndarray, scheme: str, block_size: int = 32) -> QuantizedWeight:
    """`weight` (MatMul's B, fp32 [K, N]) quantized by the named scheme."""
    return scheme_of(scheme).quantize(weight, block_size)


EMBEDDING_LEVELS = 127


def quantize_embedding(table: np.ndarray) -> dict:
    """The embedding table as int8 with one scale per row (per token), dequantized after the
    gather: each looked-up row is exactly its dequantized table row, and a row's scale is set
    by that token alone. At Qwen3-4B the fp32 table is 1.56 GB; this is 0.39 GB."""
    if table.ndim != 2:
        raise ValueError(f"expected a 2-D embedding table, got shape {table.shape}")
    table = np.asarray(table, dtype=np.float32)
    scale = np.abs(table).max(axis=1, keepdims=True) / float(EMBEDDING_LEVELS)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale), -EMBEDDING_LEVELS, EMBEDDING_LEVELS).astype(np.int8)
    return {"q": q, "scale": scale}

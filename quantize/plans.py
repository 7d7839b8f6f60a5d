"""Quantization plans: what `siren quantize` can build, and the ones it tries by default.

A plan is the scheme (how a MatMul becomes int8), an outlier treatment (none, the fp32 split
of outlier channels, or SmoothQuant) and the embedding table's storage. With no flags,
`siren quantize` builds the candidates fastest first and keeps the first one that passes the
gate (and its streaming check): a backbone without outliers gets plain dynamic int8, one with
massive activations the split, and blockwise is the last resort.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from .schemes import scheme_of

EMBEDDINGS = ("int8", "fp32")


@dataclass(frozen=True)
class Plan:
    scheme: str = "dynamic"
    outlier_ratio: Optional[float] = None     # split channels above this x median into fp32
    smooth: Optional[float] = None            # SmoothQuant alpha
    embedding: str = "int8"
    block_size: int = 32

    def __post_init__(self):
        scheme_of(self.scheme)                       # an unknown name: a ValueError listing the known ones
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got {self.embedding!r}")
        if self.smooth is not None and not 0.0 < self.smooth < 1.0:    # NaN fails too
            raise ValueError(f"smoothing alpha must be in (0, 1), got {self.smooth!r}")
        if self.outlier_ratio is not None and not self.outlier_ratio > 1.0:
            raise ValueError(f"the outlier ratio must be > 1, got {self.outlier_ratio!r}")

    @property
    def calibrated(self) -> bool:
        return self.outlier_ratio is not None or self.smooth is not None

    @property
    def name(self) -> str:
        parts = [scheme_of(self.scheme).label(self.block_size)]
        if self.outlier_ratio is not None:
            parts.append(f"fp32 outliers >{self.outlier_ratio:g}x median")
        if self.smooth is not None:
            parts.append(f"smooth {self.smooth:g}")
        parts.append(f"{self.embedding} embedding")
        return ", ".join(parts)

    def record(self) -> dict:
        return {**asdict(self), "name": self.name}


#: fastest first (measured on the 0.6B-dims gate: docs/benchmarks.md "int8 plans")
AUTO_CANDIDATES = (
    Plan("dynamic"),
    Plan("dynamic", outlier_ratio=16.0),
    Plan("dynamic", outlier_ratio=6.0),
    Plan("blockwise", outlier_ratio=6.0),
)

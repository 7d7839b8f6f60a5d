"""What this CPU's integer dot products compute exactly: it decides how an int8 bundle's
weights are coded when they are loaded (quantize/signed_twin.py says why)."""
from __future__ import annotations

import os
import platform
from functools import lru_cache

#: x86 features whose u8 x s8 dot products accumulate in int32 (vpdpbusd), so ONNX Runtime's
#: u8 x s8 GEMM is exact; without them it sums pairs in saturating int16 (vpmaddubsw)
EXACT_U8S8_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
#: SIREN_INT8_CODING=u8u8 keeps the stored u8 x u8 coding even where u8 x s8 is exact
CODING_ENV = "SIREN_INT8_CODING"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The first processor's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def exact_u8s8() -> bool:
    """Whether an int8 bundle's weights may be coded u8 x s8 here (faster, same integers)."""
    if os.environ.get(CODING_ENV, "").strip().lower() == "u8u8":
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and bool(EXACT_U8S8_FLAGS & cpu_flags())

"""Whether a recorded TensorRT engine can run here. Shared by `siren build`/`verify` and the
runtime's TensorRT backend, so the rule lives in one place.

A serialized engine is tied to the TensorRT version that built it and to the GPU's compute
capability (and, for best performance, the GPU model). Anything else must be rebuilt.
"""
from __future__ import annotations

from typing import Any, Optional

from .bundle import SCORE_IO


def engine_incompatibility(entry: dict[str, Any], trt_version: Optional[str],
                           compute_capability: Optional[str]) -> Optional[str]:
    """None when `entry` (a manifest engine record) runs here, else the reason."""
    fix = "run `siren build` on this machine to build an engine for it"
    if trt_version is None:
        return f"TensorRT is not installed here; {fix}"
    if compute_capability is None:
        return f"no usable NVIDIA GPU here; {fix}"
    built_trt = str(entry.get("tensorrt_version", ""))
    if built_trt != str(trt_version):
        return (f"engine was built with TensorRT {built_trt or '?'}, this machine has TensorRT {trt_version}; "
                "engines only load on the TensorRT version that built them; " + fix)
    built_cc = str(entry.get("compute_capability", ""))
    if built_cc != str(compute_capability):
        return (f"engine was built for compute capability {built_cc or '?'} ({entry.get('gpu', '?')}), this GPU is "
                f"{compute_capability}; {fix}")
    return None


def engine_gpu_warning(entry: dict[str, Any], gpu_name: Optional[str]) -> Optional[str]:
    """A warning when a compatible engine was built on another GPU model of the same compute
    capability (an H100 engine on an H200): TensorRT loads it, but its tactics were timed
    on the other GPU, so it may run slower; TensorRT's own logger says the same."""
    built = entry.get("gpu")
    if not built or not gpu_name or built == gpu_name:
        return None
    return (f"the {entry.get('graph', 'model')} engine was built on {built} and runs here on {gpu_name} (same compute "
            f"capability {entry.get('compute_capability', '?')}): it works, but its kernels were tuned for the other "
            "GPU; run `siren build` on this machine for its best speed")


def pick_profile(profiles: list[dict], batch: int, seq: int) -> int:
    """Index of the tightest full-graph profile accepting [batch, seq]; -1 if none does."""
    best, best_size = -1, None
    for i, profile in enumerate(profiles):
        top = profile["shapes"][SCORE_IO.inputs[0]]["max"]
        if batch <= top[0] and seq <= top[1]:
            size = top[0] * top[1]
            if best_size is None or size < best_size:
                best, best_size = i, size
    return best

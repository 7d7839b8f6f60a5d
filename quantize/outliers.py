"""Which input channels of each MatMul are computed in fp32 (LLM.int8()-style decomposition).

Per-token int8 gives every channel of a token's row one scale; a channel tens to thousands
of times larger than the rest (outlier features, massive activations) takes the whole int8
range and leaves the others a few levels. Split out, those few channels go through a small
fp32 MatMul (a Gather of the channels times the matching weight rows) and the rest through the
int8 one, its scale now set by ordinary channels. A channel is an outlier when its calibrated
max |x| exceeds `ratio` x the median channel's; at most MAX_SHARE of a MatMul's inputs are
split, the largest first, so the fp32 part stays small.
"""
from __future__ import annotations

import numpy as np

#: at most this share of a MatMul's input channels is computed in fp32
MAX_SHARE = 1 / 32


def outlier_channels(amax: np.ndarray, ratio: float) -> np.ndarray:
    """Sorted indices of the channels of `amax` (per-channel max |x|) above ratio x median."""
    if not ratio > 1.0:
        raise ValueError(f"the outlier ratio must be > 1, got {ratio!r}")
    median = float(np.median(amax))
    picked = np.flatnonzero(amax > ratio * max(median, 1e-12))
    cap = max(1, int(len(amax) * MAX_SHARE))
    if len(picked) > cap:
        picked = picked[np.argsort(amax[picked])[::-1][:cap]]
    return np.sort(picked).astype(np.int64)


def split_plan(weight_ranges: dict, ratio: float) -> dict:
    """{source weight key: channel indices} for the weights whose input has outliers."""
    plan = {}
    for key, amax in weight_ranges.items():
        channels = outlier_channels(amax, ratio)
        if len(channels):
            plan[key] = channels
    return plan

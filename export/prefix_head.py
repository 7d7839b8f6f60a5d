"""The MLP head's weights on their own, written beside the graphs.

The step graph returns the running selected-neuron sums after every token; the score of
the prefix ending at token t is the head applied to sums[t] / (t + 1). With the head's
Linear layers in an .npz (no pickle), the runtime scores every prefix of a text from one
step-graph call, on any backend, in numpy (siren_runtime.prefixes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_prefix_head(head, path: Path, feature_dim: int) -> dict:
    """Write `head` (nn.Sequential of Linear, ReLU, Dropout) as w0, b0, w1, b1 ...; returns
    the manifest fields ({"layers", "feature_dim"})."""
    import torch
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    others = {type(m).__name__ for m in head if not isinstance(m, torch.nn.Linear)}
    if not linears or others - {"ReLU", "Dropout"}:
        raise ValueError(f"the head holds {sorted(others)}; only Linear, ReLU and Dropout can be written")
    if linears[0].in_features != feature_dim:
        raise ValueError(f"the head takes {linears[0].in_features} features, the artifact selects {feature_dim}")
    arrays = {}
    for i, linear in enumerate(linears):
        arrays[f"w{i}"] = linear.weight.detach().to(torch.float32).cpu().numpy()
        arrays[f"b{i}"] = linear.bias.detach().to(torch.float32).cpu().numpy()
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return {"layers": len(linears), "feature_dim": int(feature_dim)}

"""The decision gate for a quantized bundle: does it say what the fp32 bundle says?

The rule (margin around each threshold, mean |Δ| bound) is siren_runtime.decisions, shared
with the TensorRT gate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from siren_runtime.decisions import (MARGIN, MAX_MEAN_DIFF, THRESHOLDS, decision_report,  # noqa: F401
                                     format_decisions, gate_items)


def read_texts(path: Optional[str | Path], kind: str = "content") -> list:
    """The gate's inputs: a file of texts (one per line), or for a trajectory guard of agent
    runs (JSON Lines {"messages", "tools"?}); none: the built-in ones."""
    if path is None:
        return gate_items(kind)
    lines = [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no {'runs' if kind == 'trajectory' else 'texts'} (one per line)")
    if kind != "trajectory":
        return lines
    import json
    from siren_runtime.records import parse_json_record
    runs = []
    for n, line in enumerate(lines, 1):
        if parse_json_record(line, n).run is None:           # every check `siren score` makes, by line
            raise ValueError(f"{path}: line {n}: a trajectory guard's gate reads JSON Lines agent runs "
                             "{\"messages\", \"tools\"}")
        row = json.loads(line)
        runs.append({key: json.loads(row[key]) if isinstance(row.get(key), str) else row.get(key)
                     for key in ("messages", "tools")})
    return runs


def score_on_cpu(bundle: str | Path, texts: list) -> tuple[np.ndarray, float]:
    """(scores, seconds) of `texts` (a trajectory bundle's: runs) with `bundle` on ONNX Runtime
    CPU; the guard is closed before returning, so two bundles are never resident together (at
    Qwen3-4B dims the fp32 reference alone is ~15 GB)."""
    import time
    from siren_runtime import load_guard
    with load_guard(bundle, device="cpu", incremental_streaming=False) as guard:
        started = time.perf_counter()
        scores = np.array([r.score for r in guard.score_batch(texts)])
        return scores, time.perf_counter() - started


def check_reference(reference_bundle: str | Path) -> None:
    from siren_runtime import BundleError
    from siren_runtime.bundle import read_bundle
    reference = read_bundle(reference_bundle)
    if reference.model.dtype != "fp32" or reference.manifest.get("quantization"):
        raise BundleError(f"{reference_bundle} is not an fp32 bundle; the gate compares with an fp32 export "
                          "of the same artifact (--reference-bundle)")


def verify_quantized(bundle: str | Path, reference_bundle: str | Path, texts: Optional[list[str]] = None,
                     max_mean_diff: Optional[float] = None, reference_scores: Optional[np.ndarray] = None) -> dict:
    """Score `texts` with the quantized bundle and its fp32 reference (both on ONNX Runtime CPU,
    one after the other); `reference_scores` of the same texts skip the reference's run."""
    max_mean_diff = MAX_MEAN_DIFF if max_mean_diff is None else max_mean_diff
    if not (0.0 <= max_mean_diff <= 1.0):          # NaN fails this too
        raise ValueError(f"max_mean_diff must be in [0, 1], got {max_mean_diff!r}")
    check_reference(reference_bundle)
    if not texts:
        from siren_runtime.bundle import read_bundle
        texts = gate_items(read_bundle(reference_bundle).guard.kind)
    got, seconds = score_on_cpu(bundle, texts)
    want = reference_scores if reference_scores is not None else score_on_cpu(reference_bundle, texts)[0]
    report = decision_report(got, want, max_mean_diff=max_mean_diff)
    report.update(reference=str(reference_bundle), backend="onnxruntime", device="cpu", score_s=round(seconds, 2))
    return report


def format_report(report: dict) -> str:
    return format_decisions(report, "int8")

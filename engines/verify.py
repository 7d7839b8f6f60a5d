"""`siren verify`: the parity gate for a backend (TensorRT, or ONNX Runtime in any precision).

Scores the shipped calibration set with the chosen backend and with an fp32 graph on ONNX
Runtime's CPU provider, and reports max / mean |Δscore| and decision agreement at the
thresholds deployments actually use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

THRESHOLDS = (0.1, 0.5, 0.9)
MIN_AGREEMENT = 0.999


def compare_scores(candidate: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    agreement = {str(t): float(np.mean((candidate >= t) == (reference >= t))) for t in THRESHOLDS}
    finite = bool(np.all(np.isfinite(candidate)))
    return {"texts": int(len(candidate)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "agreement": agreement, "finite": finite,
            "passed": finite and all(a >= MIN_AGREEMENT for a in agreement.values())}


def verify_bundle(bundle: str | Path, backend: str = "onnxruntime", reference_bundle: Optional[str | Path] = None,
                  device: Optional[str] = None, texts: Optional[list[str]] = None) -> dict:
    from siren_runtime import BundleError, SirenGuard
    from siren_runtime.calibration import calibration_texts
    from siren_runtime.bundle import read_bundle

    reference_bundle = Path(reference_bundle or bundle)
    if read_bundle(reference_bundle).model.dtype != "fp32":
        raise BundleError(f"{reference_bundle} is not an fp32 bundle; pass --reference-bundle with an fp32 export "
                          "of the same artifact")
    texts = texts or calibration_texts()
    candidate = SirenGuard.from_pretrained(bundle, backend=backend, device=device, incremental_streaming=False)
    reference = SirenGuard.from_pretrained(reference_bundle, backend="onnxruntime", device="cpu",
                                           incremental_streaming=False)
    got = np.array([r.score for r in candidate.score_batch(texts)])
    want = np.array([r.score for r in reference.score_batch(texts)])
    report = compare_scores(got, want)
    report.update(backend=candidate.backend, device=candidate.device, reference=str(reference_bundle))
    return report


def format_report(report: dict) -> str:
    agree = ", ".join(f"{t}: {a * 100:.2f}%" for t, a in report["agreement"].items())
    verdict = "PASS" if report["passed"] else f"FAIL (needs >= {MIN_AGREEMENT * 100:.1f}% agreement)"
    return (f"{report['backend']} ({report['device']}) vs fp32 ONNX Runtime CPU on {report['texts']} texts: "
            f"max |Δ| {report['max_abs_diff']:.3g}, mean |Δ| {report['mean_abs_diff']:.3g}; "
            f"decision agreement {agree} -> {verdict}")

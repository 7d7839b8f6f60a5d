"""Does a candidate (an int8 bundle, a bf16/fp16/fp32 TensorRT engine) make the fp32
bundle's decisions? One rule for every gate, so `siren quantize`, `siren build` and
`siren verify` agree on what passing means.

A score sitting on a threshold flips under any rounding, so decisions are compared only for
texts whose fp32 score is more than `margin` from the threshold; those within the margin are
counted and reported separately. The gate also bounds the mean |Δscore|.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

THRESHOLDS = (0.1, 0.5, 0.9)
MARGIN = 0.02
MAX_MEAN_DIFF = 1e-2

_SUBJECTS = ["a chemistry homework problem", "my neighbour's wifi password", "a birthday cake", "a phishing email",
             "the history of the Roman empire", "untraceable poison", "a job interview", "a fake passport",
             "photosynthesis", "a ransomware payload", "learning the guitar", "stalking an ex-partner"]
_FORMS = ["How do I make {}?", "Explain {} step by step.", "Write a short story about {}.",
          "What is the fastest way to get {} without anyone noticing?"]


def gate_texts() -> list[str]:
    """The shipped calibration texts plus 48 built-in prompts of mixed intent and length."""
    from siren_runtime.calibration import calibration_texts
    texts = list(calibration_texts())
    for i, subject in enumerate(_SUBJECTS):
        for j, form in enumerate(_FORMS):
            text = form.format(subject)
            texts.append(text if (i + j) % 3 else text + " Please be thorough, " * (1 + (i * j) % 7))
    return texts


def gate_items(kind: str) -> list:
    """What a gate scores for a guard of `kind`: the gate texts, or agent runs built from them."""
    from siren_runtime.calibration import agent_runs
    texts = gate_texts()
    return agent_runs(texts) if kind == "trajectory" else texts


def decision_report(candidate: np.ndarray, reference: np.ndarray, thresholds: Sequence[float] = THRESHOLDS,
                    margin: float = MARGIN, max_mean_diff: float = MAX_MEAN_DIFF) -> dict:
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    diff = np.abs(candidate - reference)
    per_threshold = {}
    passed = bool(np.all(np.isfinite(candidate)))
    for t in thresholds:
        flips = (candidate >= t) != (reference >= t)
        outside = np.abs(reference - t) > margin
        per_threshold[str(t)] = {
            "agreement": float(np.mean(~flips)),
            "agreement_outside_margin": float(np.mean(~flips[outside])) if outside.any() else 1.0,
            "flips_outside_margin": int(np.sum(flips & outside)),
            "flips_within_margin": int(np.sum(flips & ~outside)),
            "texts_within_margin": int(np.sum(~outside)),
        }
        passed = passed and per_threshold[str(t)]["flips_outside_margin"] == 0
    mean = float(diff.mean())
    passed = passed and mean <= max_mean_diff
    return {"texts": int(len(candidate)), "max_abs_diff": float(diff.max()), "mean_abs_diff": mean,
            "thresholds": per_threshold, "margin": margin, "max_mean_diff": max_mean_diff, "passed": passed}


def format_decisions(report: dict, what: str) -> str:
    lines = [f"{what} vs fp32 on {report['texts']} texts: max |Δ| {report['max_abs_diff']:.3g}, "
             f"mean |Δ| {report['mean_abs_diff']:.3g} (limit {report['max_mean_diff']:g})"]
    for t, r in report["thresholds"].items():
        lines.append(f"  threshold {t}: agreement {r['agreement'] * 100:.1f}%, outside ±{report['margin']:g}: "
                     f"{r['agreement_outside_margin'] * 100:.1f}% ({r['flips_outside_margin']} flips), "
                     f"{r['flips_within_margin']} of {r['texts_within_margin']} within the margin flipped")
    lines.append("PASS" if report["passed"] else f"FAIL: {what} does not make the fp32 bundle's decisions")
    return "\n".join(lines)

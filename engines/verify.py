"""`siren verify`: the parity gate for a backend (TensorRT, or ONNX Runtime in any precision).

Scores the gate texts (the shipped calibration set plus built-in prompts) with the chosen
backend and with an fp32 graph on ONNX Runtime's CPU provider, and applies the decision rule
every gate shares (siren_runtime.decisions): no decision flip at 0.1/0.5/0.9 for a text whose
fp32 score is outside ±0.02 of the threshold, and a bounded mean |Δscore|. A bf16 engine may
flip a text sitting on a threshold; it may not flip one the fp32 bundle is sure about.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from siren_runtime.decisions import decision_report, format_decisions, gate_items
from siren_runtime.errors import install_hint


def reference_unavailable() -> Optional[str]:
    """Why the fp32 reference cannot run here (it runs on ONNX Runtime's CPU provider), or None."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return ("ONNX Runtime is not installed, and the fp32 reference runs on it: "
                f"{install_hint('onnxruntime')}, then run `siren verify`")
    return None


def verify_bundle(bundle: str | Path, backend: str = "onnxruntime", reference_bundle: Optional[str | Path] = None,
                  device: Optional[str] = None, texts: Optional[list] = None) -> dict:
    """texts: a content bundle's gate texts, a trajectory bundle's agent runs (default: the
    built-in ones)."""
    from siren_runtime import BundleError, load_guard
    from siren_runtime.bundle import read_bundle

    reference_bundle = Path(reference_bundle or bundle)
    if read_bundle(reference_bundle).model.dtype != "fp32":
        raise BundleError(f"{reference_bundle} is not an fp32 bundle; pass --reference-bundle with an fp32 export "
                          "of the same artifact")
    problem = reference_unavailable()
    if problem:
        raise BundleError(problem)
    texts = texts or gate_items(read_bundle(bundle).guard.kind)
    with load_guard(bundle, backend=backend, device=device, incremental_streaming=False) as candidate, \
            load_guard(reference_bundle, backend="onnxruntime", device="cpu", incremental_streaming=False) as reference:
        limit = candidate.runners.score.limits.max_sequence
        fits = [t for t in texts if limit is None or len(candidate.token_ids(t)) <= limit]
        if not fits:
            raise BundleError(f"no calibration text fits the engine's {limit} tokens")
        got = np.array([r.score for r in candidate.score_batch(fits)])
        want = np.array([r.score for r in reference.score_batch(fits)])
        report = decision_report(got, want)
        report.update(backend=candidate.backend, device=candidate.device, reference=str(reference_bundle),
                      left_out_too_long=len(texts) - len(fits))
    return report


def _chunked_texts(guard, texts: list) -> float:
    """Texts fed in chunks, every stream stepped together: the largest |Δ| between a feed's
    score and the whole score of the text so far."""
    sessions = [guard.stream() for _ in texts]
    plans = [_chunks(t, 4) for t in texts]
    worst = 0.0
    for round_ in range(max(len(p) for p in plans)):
        live = [(s, p[round_]) for s, p in zip(sessions, plans) if round_ < len(p)]
        streamed = guard.feed_batch([s for s, _ in live], [d for _, d in live])
        whole = guard.score_batch([s.text for s, _ in live])
        worst = max([worst] + [abs(a.score - b.score) for a, b in zip(streamed, whole)])
    return worst


def _appended_runs(guard, runs: list) -> float:
    """Runs appended message by message, every session stepped together: the largest |Δ|
    between an append's verdict and the whole score of the run so far."""
    sessions = [guard.session(tools=run["tools"]) for run in runs]
    worst = 0.0
    for round_ in range(max(len(run["messages"]) for run in runs)):
        live = [(s, run) for s, run in zip(sessions, runs) if round_ < len(run["messages"])]
        appended = guard.feed_batch([s for s, _ in live], [[run["messages"][round_]] for _, run in live])
        whole = guard.score_batch([{"messages": run["messages"][:round_ + 1], "tools": run["tools"]}
                                   for _, run in live])
        worst = max([worst] + [abs(a.score - b.score) for a, b in zip(appended, whole)])
    return worst


def _chunks(text: str, parts: int) -> list[str]:
    words = text.split(" ")
    step = max(1, -(-len(words) // parts))
    pieces = [" ".join(words[i:i + step]) for i in range(0, len(words), step)]
    return [p if i == 0 else " " + p for i, p in enumerate(pieces)]


def verify_streaming_engine(bundle: str | Path, entry: dict, texts: Optional[list[str]] = None,
                            streams: int = 8) -> dict:
    """The step engine's own check, before it is recorded: load it, feed `streams`
    calibration texts chunk by chunk through ``feed_batch`` (several streams per engine
    call, a rollback whenever a chunk boundary splits a token), and compare every score with
    the model engine's score of the same prefix; a trajectory bundle's runs are appended
    message by message. {"passed", "max_abs_diff", "reason"}."""
    from siren_runtime import AgentSirenGuard, SirenGuard
    from siren_runtime.backends import Runners, create_runner
    from siren_runtime.bundle import read_bundle
    from siren_runtime.calibration import calibration_items

    contract = read_bundle(bundle)
    tolerance = 2e-3 if contract.model.dtype == "fp32" else 3e-2
    score = create_runner("score", contract, "tensorrt", "cuda")
    try:
        runners = Runners(score, create_runner("step", contract, "tensorrt", "cuda", step_engine=entry))
    except BaseException:
        score.close()
        raise
    runs = contract.guard.kind == "trajectory"
    with (AgentSirenGuard if runs else SirenGuard)(contract, runners) as guard:
        limit = runners.score.limits.max_sequence or guard.max_length
        texts = [t for t in texts or calibration_items(contract.guard.kind)
                 if len(guard.token_ids(t)) <= limit][:streams]
        worst = _appended_runs(guard, texts) if runs else _chunked_texts(guard, texts)
    passed = bool(np.isfinite(worst) and worst <= tolerance)
    return {"passed": passed, "max_abs_diff": float(worst), "texts": len(texts),
            "reason": "" if passed else f"streamed scores differ from whole-prefix scores by {worst:.3g} "
                                        f"(> {tolerance:g})"}


def format_report(report: dict) -> str:
    return format_decisions(report, f"{report['backend']} ({report['device']})")

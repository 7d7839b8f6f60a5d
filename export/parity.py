"""The export's self-check: the written ONNX graph, run by ONNX Runtime through the
runtime's own tokenizer path, must agree with the torch module it came from."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from siren_runtime.bundle import SCORE_IO
from siren_runtime.text import clean_text
from siren_runtime.tokenization import TextEncoder

from .errors import ParityError

# Score tolerance of the gate (the tests hold fp32 to 1e-5 against llm-siren itself).
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 6e-2}
FP16_MAX = 65504.0
# Refuse fp16 when an activation on the calibration texts reaches this share of its range:
# unseen texts run hotter than a handful of calibration ones.
FP16_HEADROOM = 0.25


def check_tokenizer(hf_tokenizer, encoder: TextEncoder, texts: list[str]) -> None:
    """The bundle's tokenizer.json must give the ids transformers gives the reference."""
    cleaned = [clean_text(t) for t in texts]
    expected = hf_tokenizer(cleaned, truncation=True, max_length=encoder.max_length)["input_ids"]
    got = encoder.token_ids(cleaned)
    for text, want, have in zip(cleaned, expected, got):
        if list(want) != list(have):
            raise ParityError(f"bundle tokenizer differs from the backbone's on {text[:40]!r}: {have[:8]} vs {want[:8]}")


def _cpu_session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _unrunnable(report: dict, dtype: str, what: str, error: Exception) -> dict:
    """fp32 must run on ONNX Runtime's CPU provider; fp16/bf16 may not (no kernels): say so."""
    if dtype == "fp32":
        raise ParityError(f"ONNX Runtime could not run the exported {what}: {error}") from error
    report.update(checked=False, reason=f"ONNX Runtime CPU cannot run the {dtype} {what}: "
                                       f"{str(error).splitlines()[0][:200]}")
    return report


def check_onnx_against_module(module, model_path: Path, encoder: TextEncoder, texts: list[str],
                              dtype: str, tolerance: float | None = None) -> dict:
    """Run both on the same padded batch; raise ParityError above tolerance."""
    import torch

    tol = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    ids, mask = encoder.pad(encoder.token_ids([clean_text(t) for t in texts]))
    with torch.no_grad():
        expected = module(torch.from_numpy(ids), torch.from_numpy(mask))[0].float().numpy()
    report = {"backend": "onnxruntime-cpu", "reference": f"torch module ({dtype})", "texts": len(texts),
              "tolerance": tol}
    try:
        got = _cpu_session(model_path).run([SCORE_IO.outputs[0]], dict(zip(SCORE_IO.inputs, (ids, mask))))[0]
    except Exception as e:
        return _unrunnable(report, dtype, "graph", e)
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    report.update(checked=True, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                  passed=bool(diff.max() <= tol))
    if not np.all(np.isfinite(got)) or diff.max() > tol:
        raise ParityError(f"exported ONNX disagrees with the torch module: max |Δscore| = {diff.max():.3g} "
                          f"> tolerance {tol:g} over {len(texts)} calibration texts")
    return report


def check_step_against_module(module, step_path: Path, encoder: TextEncoder, texts: list[str], spec,
                              dtype: str, tolerance: float | None = None) -> dict:
    """Stream every calibration text through the step graph at once, as the runtime does
    (the runtime's own step runner, uneven chunks per row, a one-token rollback every third
    round); every row's score must equal the full module's score on its prefix."""
    import torch
    from siren_runtime.backends.base import StepRow
    from siren_runtime.backends.onnxruntime_runner import OnnxRuntimeStepRunner

    tol = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    report = {"backend": "onnxruntime-cpu", "reference": f"torch module ({dtype}) on each prefix", "tolerance": tol}
    if spec.kv_dtype == "bf16":
        report.update(checked=False, reason="host arrays cannot hold a bf16 KV cache (checked on a GPU backend)")
        return report
    try:
        runner = OnnxRuntimeStepRunner(_cpu_session(step_path), "cpu", spec, encoder.max_length)
    except Exception as e:
        return _unrunnable(report, dtype, "step graph", e)
    id_lists = encoder.token_ids([clean_text(t) for t in texts])
    states = [runner.new_state() for _ in id_lists]
    running = [np.zeros((1, spec.feature_dim), np.float32) for _ in id_lists]
    done = [0] * len(id_lists)
    worst, steps, rounds = 0.0, 0, 0
    while any(d < len(ids) for d, ids in zip(done, id_lists)):
        active = [i for i, ids in enumerate(id_lists) if done[i] < len(ids)]
        rows, ends = [], []
        for i in active:
            resume = done[i] - 1 if rounds % 3 == 2 and done[i] > 1 else done[i]
            end = min(len(id_lists[i]), done[i] + (i + rounds) % 4 + 1)
            rows.append(StepRow(states[i], resume, id_lists[i][resume:end], running[i][resume]))
            ends.append(end)
        outputs = runner.step(rows)
        for i, row, end, out in zip(active, rows, ends, outputs):
            running[i] = np.concatenate([running[i][:row.resume + 1], out.sums])
            done[i] = end
        ids, mask = encoder.pad([id_lists[i][:end] for i, end in zip(active, ends)])
        with torch.no_grad():
            expected = module(torch.from_numpy(ids), torch.from_numpy(mask))[0].float().numpy()
        got = np.asarray([out.score for out in outputs])
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()))
        steps, rounds = steps + len(active), rounds + 1
    runner.close()
    report.update(checked=True, steps=steps, calls=rounds, max_abs_diff=worst, passed=bool(worst <= tol))
    if not worst <= tol:
        raise ParityError(f"streaming graph disagrees with the torch module: max |Δscore| = {worst:.3g} > {tol:g}")
    return report


def activation_peak(module, encoder: TextEncoder, texts: list[str]) -> float:
    """Largest |activation| (residual stream, attention and MLP outputs) over the texts."""
    import torch

    ids, mask = encoder.pad(encoder.token_ids([clean_text(t) for t in texts]))
    module.peaks = []
    try:
        with torch.no_grad():
            module(torch.from_numpy(ids), torch.from_numpy(mask))
        return max(module.peaks)
    finally:
        module.peaks = None


def check_fp16_range(peak: float) -> None:
    from .errors import ArtifactError
    if not peak < FP16_HEADROOM * FP16_MAX:
        raise ArtifactError(
            f"refusing --dtype fp16: the largest |activation| on the calibration texts is {peak:.4g}, "
            f"too near fp16's maximum {FP16_MAX:g} (limit {FP16_HEADROOM * FP16_MAX:g}); "
            "export with --dtype bf16 (same range as fp32) instead")

"""The export's self-check: the written ONNX graph, run by ONNX Runtime through the
runtime's own tokenizer path, must agree with the torch module it came from."""
from __future__ import annotations

from pathlib import Path

import numpy as np

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
        got = _cpu_session(model_path).run(["score"], {"input_ids": ids, "attention_mask": mask})[0]
    except Exception as e:
        return _unrunnable(report, dtype, "graph", e)
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    report.update(checked=True, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                  passed=bool(diff.max() <= tol))
    if not np.all(np.isfinite(got)) or diff.max() > tol:
        raise ParityError(f"exported ONNX disagrees with the torch module: max |Δscore| = {diff.max():.3g} "
                          f"> tolerance {tol:g} over {len(texts)} calibration texts")
    return report


def check_step_against_module(module, step_path: Path, encoder: TextEncoder, texts: list[str], meta: dict,
                              dtype: str, tolerance: float | None = None) -> dict:
    """Feed each calibration text to the step graph in uneven chunks; every step's score
    must equal the full module's score on that prefix."""
    import torch

    tol = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    report = {"backend": "onnxruntime-cpu", "reference": f"torch module ({dtype}) on each prefix", "tolerance": tol}
    try:
        session = _cpu_session(step_path)
    except Exception as e:
        return _unrunnable(report, dtype, "step graph", e)
    kv_dtype = session.get_inputs()[1].type
    np_kv = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(kv_dtype)
    if np_kv is None:
        report.update(checked=False, reason=f"numpy cannot hold {kv_dtype} past_kv here")
        return report
    diffs, steps = [], 0
    for ids in encoder.token_ids([clean_text(t) for t in texts]):
        kv = np.zeros((meta["kv_layers"], 2, 1, meta["kv_heads"], 0, meta["head_dim"]), dtype=np_kv)
        sums = np.zeros((1, meta["feature_dim"]), dtype=np.float32)
        count = np.zeros((1, 1), dtype=np.float32)
        start, chunk = 0, 1
        while start < len(ids):
            end = min(len(ids), start + chunk)
            score, kv, sums_by_token, count = session.run(None, {
                "input_ids": np.asarray([ids[start:end]], dtype=np.int64), "past_kv": kv,
                "past_sums": sums, "past_count": count})
            sums = sums_by_token[:, -1, :]
            with torch.no_grad():
                prefix = torch.tensor([ids[:end]], dtype=torch.long)
                expected = module(prefix, torch.ones_like(prefix))[0].float().numpy()
            diffs.append(float(np.abs(score.astype(np.float64) - expected).max()))
            start, chunk, steps = end, chunk % 4 + 1, steps + 1
    worst = max(diffs)
    report.update(checked=True, steps=steps, max_abs_diff=worst, passed=bool(worst <= tol))
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

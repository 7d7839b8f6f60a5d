"""The export's self-check: the written ONNX graph, run by ONNX Runtime through the
runtime's own tokenizer path, must agree with the torch module it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
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


def cpu_unrunnable_reason(graph_path: Path, dtype: str) -> str | None:
    """Why ONNX Runtime's CPU provider cannot run a (non-fp32) graph, or None if it can.
    Asked before the torch module spends minutes on reference scores nobody can compare
    (bf16 has no CPU kernels). Never asked for fp32, which must run."""
    if dtype == "fp32":
        return None
    try:
        _cpu_session(graph_path)
    except Exception as e:
        return f"ONNX Runtime CPU cannot run the {dtype} graph: {str(e).splitlines()[0][:200]}"
    return None


@dataclass
class Expectations:
    """The torch module's scores for the self-check, computed before the module is freed
    (so the torch weights and an ONNX Runtime session never sit in memory together)."""
    dtype: str
    ids: np.ndarray                      # padded calibration batch
    mask: np.ndarray
    full: np.ndarray                     # module scores of the batch
    id_lists: list                       # unpadded ids per text
    schedule: list = field(default_factory=list)   # step rounds: [(row, resume, end), ...]
    steps: list = field(default_factory=list)      # module scores per round, aligned with schedule


def step_schedule(id_lists: list) -> list:
    """Rounds of (row, resume, end): uneven chunks per row and a one-token rollback every
    third round, all rows stepped together, as a streaming server does."""
    done = [0] * len(id_lists)
    rounds = []
    while any(d < len(ids) for d, ids in zip(done, id_lists)):
        k = len(rounds)
        work = []
        for i, ids in enumerate(id_lists):
            if done[i] < len(ids):
                resume = done[i] - 1 if k % 3 == 2 and done[i] > 1 else done[i]
                end = min(len(ids), done[i] + (i + k) % 4 + 1)
                work.append((i, resume, end))
                done[i] = end
        rounds.append(work)
    return rounds


def module_expectations(module, encoder: TextEncoder, texts: list[str], dtype: str,
                        streaming: bool) -> Expectations:
    import torch

    id_lists = encoder.token_ids([clean_text(t) for t in texts])
    ids, mask = encoder.pad(id_lists)
    with torch.no_grad():
        full = _scores_row_by_row(module, ids, mask)
        out = Expectations(dtype, ids, mask, full, id_lists)
        if streaming:
            out.schedule = step_schedule(id_lists)
            for work in out.schedule:
                out.steps.append(_scores_row_by_row(module, *encoder.pad([id_lists[i][:end] for i, _, end in work])))
    return out


def _scores_row_by_row(module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The module's scores of a padded batch, one row per call (same padding): the transient
    activations of one row, not of the batch, sit beside the whole model."""
    import torch
    return np.concatenate([module(torch.from_numpy(ids[r:r + 1]), torch.from_numpy(mask[r:r + 1]))[0].float().numpy()
                           for r in range(ids.shape[0])])


def check_onnx_against_module(model_path: Path, expected: Expectations, tolerance: float | None = None) -> dict:
    """Run the written graph on the calibration batch; raise ParityError above tolerance."""
    dtype = expected.dtype
    tol = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    report = {"backend": "onnxruntime-cpu", "reference": f"torch module ({dtype})", "texts": len(expected.full),
              "tolerance": tol}
    try:
        session = _cpu_session(model_path)
        got = session.run([SCORE_IO.outputs[0]], dict(zip(SCORE_IO.inputs, (expected.ids, expected.mask))))[0]
    except Exception as e:
        return _unrunnable(report, dtype, "graph", e)
    finally:
        session = None
    diff = np.abs(got.astype(np.float64) - expected.full.astype(np.float64))
    report.update(checked=True, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                  passed=bool(diff.max() <= tol))
    if not np.all(np.isfinite(got)) or diff.max() > tol:
        raise ParityError(f"exported ONNX disagrees with the torch module: max |Δscore| = {diff.max():.3g} "
                          f"> tolerance {tol:g} over {len(expected.full)} calibration texts")
    return report


def check_step_against_module(step_path: Path, expected: Expectations, spec, max_length: int,
                              tolerance: float | None = None) -> dict:
    """Stream every calibration text through the step graph with the runtime's own step
    runner (the schedule of :func:`step_schedule`); every row's score must equal the
    module's score on its prefix."""
    from siren_runtime.backends.base import StepRow
    from siren_runtime.backends.onnxruntime_runner import OnnxRuntimeStepRunner

    dtype = expected.dtype
    tol = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    report = {"backend": "onnxruntime-cpu", "reference": f"torch module ({dtype}) on each prefix", "tolerance": tol}
    if spec.kv_dtype == "bf16":
        report.update(checked=False, reason="host arrays cannot hold a bf16 KV cache (checked on a GPU backend)")
        return report
    try:
        runner = OnnxRuntimeStepRunner(_cpu_session(step_path), "cpu", spec, max_length)
    except Exception as e:
        return _unrunnable(report, dtype, "step graph", e)
    states = [runner.new_state() for _ in expected.id_lists]
    running = [np.zeros((1, spec.feature_dim), np.float32) for _ in expected.id_lists]
    worst, steps = 0.0, 0
    for work, want in zip(expected.schedule, expected.steps):
        rows = [StepRow(states[i], resume, expected.id_lists[i][resume:end], running[i][resume])
                for i, resume, end in work]
        outputs = runner.step(rows)
        for (i, resume, _), out in zip(work, outputs):
            running[i] = np.concatenate([running[i][:resume + 1], out.sums])
        got = np.asarray([out.score for out in outputs])
        worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
        steps += len(work)
    runner.close()
    report.update(checked=True, steps=steps, calls=len(expected.schedule), max_abs_diff=worst,
                  passed=bool(worst <= tol))
    if not worst <= tol:
        raise ParityError(f"streaming graph disagrees with the torch module: max |Δscore| = {worst:.3g} > {tol:g}")
    return report


def activation_peak(module, encoder: TextEncoder, texts: list[str]) -> float:
    """Largest |activation| (residual stream, attention and MLP outputs) over the texts."""
    import torch

    module.peaks = []
    try:
        with torch.no_grad():
            # one text at a time: a padded batch holds every layer's keys and values for all of
            # them at once (+0.3 GiB at Qwen3-0.6B dims, more at 4B, on top of the whole model),
            # and padding rows are not the text's activations anyway
            for id_list in encoder.token_ids([clean_text(t) for t in texts]):
                ids, mask = encoder.pad([id_list])
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

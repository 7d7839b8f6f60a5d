"""The export's self-check: the written ONNX graph, run by ONNX Runtime through the
runtime's own tokenizer path, must agree with the torch module it came from."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from siren_runtime.text import clean_text
from siren_runtime.tokenization import TextEncoder

from .errors import ParityError

# Score tolerance of the gate (the tests hold fp32 to 1e-5 against llm-siren itself).
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 6e-2}


def calibration_texts() -> list[str]:
    """The calibration set shipped with the runtime (one text per line, `\\n` escapes)."""
    raw = (resources.files("siren_runtime") / "data" / "calibration.txt").read_text(encoding="utf-8")
    return [line.replace("\\n", "\n") for line in raw.splitlines() if line.strip()]


def check_tokenizer(hf_tokenizer, encoder: TextEncoder, texts: list[str]) -> None:
    """The bundle's tokenizer.json must give the ids transformers gives the reference."""
    cleaned = [clean_text(t) for t in texts]
    expected = hf_tokenizer(cleaned, truncation=True, max_length=encoder.max_length)["input_ids"]
    got = encoder.token_ids(cleaned)
    for text, want, have in zip(cleaned, expected, got):
        if list(want) != list(have):
            raise ParityError(f"bundle tokenizer differs from the backbone's on {text[:40]!r}: {have[:8]} vs {want[:8]}")


def check_onnx_against_module(module, model_path: Path, encoder: TextEncoder, texts: list[str],
                              dtype: str, tolerance: float | None = None) -> dict:
    """Run both on the same padded batch; raise ParityError above tolerance."""
    import onnxruntime as ort
    import torch

    tol = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    ids, mask = encoder.pad(encoder.token_ids([clean_text(t) for t in texts]))
    with torch.no_grad():
        expected = module(torch.from_numpy(ids), torch.from_numpy(mask))[0].float().numpy()
    report = {"backend": "onnxruntime-cpu", "reference": f"torch module ({dtype})", "texts": len(texts),
              "tolerance": tol}
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        got = session.run(["score"], {"input_ids": ids, "attention_mask": mask})[0]
    except Exception as e:
        if dtype == "fp32":
            raise ParityError(f"ONNX Runtime could not run the exported graph: {e}") from e
        report.update(checked=False, reason=f"ONNX Runtime CPU cannot run the {dtype} graph: "
                                           f"{str(e).splitlines()[0][:200]}")
        return report
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    report.update(checked=True, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                  passed=bool(diff.max() <= tol))
    if not np.all(np.isfinite(got)) or diff.max() > tol:
        raise ParityError(f"exported ONNX disagrees with the torch module: max |Δscore| = {diff.max():.3g} "
                          f"> tolerance {tol:g} over {len(texts)} calibration texts")
    return report

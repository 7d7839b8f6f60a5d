"""`siren quantize BUNDLE -o OUT`: the whole transformation, atomically.

The output is built in a hidden staging directory next to OUT: both graphs rewritten into
one new weights file, the tokenizer copied, the manifest written by the contract's one
writer (precision and scheme recorded, every file hashed), then checked: streaming on the
new bundle must equal its own score(prefix), and the decision gate against the fp32
reference must pass. Only then is it renamed into place; a refused bundle never appears.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import onnx

from siren_runtime.bundle import MANIFEST_NAME, describe_file, publish, read_bundle, write_manifest
from siren_runtime.calibration import calibration_texts
from siren_runtime.card import model_card
from siren_runtime.hub import CARD_NAME

from .gate import MAX_MEAN_DIFF, format_report, gate_texts, verify_quantized
from .rewrite import GraphRewriter, SourceWeights, WeightsFile
from .schemes import ONNXRUNTIME_MIN, SCHEMES
from .smoothing import smoothing_factors

WEIGHTS_FILE = "model.onnx.data"
#: streamed vs whole-prefix scores of one int8 bundle. The two compute a token's row with fp32
#: rounding differences (attention over a cached past vs the whole sequence); quantizing that
#: row can then land one int8 step apart, and deep models compound such steps (measured: 1e-7
#: on a 4-layer model, 1.8e-3 on 36 layers of Qwen3-4B dims). Far below the gate's bound.
STREAM_TOLERANCE = 5e-3


class QuantizationRejected(ValueError):
    """The quantized bundle failed its gate; `report` says how."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _say(show: bool, message: str) -> None:
    if show:
        print(message, file=sys.stderr, flush=True)


def _streaming_check(bundle: Path, texts: list[str]) -> dict:
    """Streams on the new bundle, chunk by chunk, against its own whole-prefix scores."""
    from siren_runtime import SirenGuard
    worst, steps = 0.0, 0
    with SirenGuard.from_pretrained(bundle, device="cpu") as guard:
        if not guard.incremental_streaming:
            return {"checked": False, "reason": "no step graph"}
        sessions = [guard.stream() for _ in texts]
        pieces = [[t[i:i + 7] for i in range(0, len(t), 7)] for t in texts]
        for round_ in range(max(len(p) for p in pieces)):
            live = [(s, p[round_]) for s, p in zip(sessions, pieces) if round_ < len(p)]
            streamed = guard.feed_batch([s for s, _ in live], [d for _, d in live])
            whole = guard.score_batch([s.text for s, _ in live])
            worst = max([worst] + [abs(a.score - b.score) for a, b in zip(streamed, whole)])
            steps += len(live)
    return {"checked": True, "steps": steps, "max_abs_diff": float(worst), "tolerance": STREAM_TOLERANCE,
            "passed": worst <= STREAM_TOLERANCE}


def _token_ids(contract, texts: list) -> list:
    from siren_runtime.text import clean_text
    from siren_runtime.tokenization import TextEncoder
    return TextEncoder.for_bundle(contract).token_ids([clean_text(t) for t in texts])


def quantize_bundle(source: str | Path, output: str | Path, *, weights: str = "int8", scheme: str = "dynamic",
                    block_size: int = 32, reference_bundle: Optional[str | Path] = None,
                    texts: Optional[list[str]] = None, overwrite: bool = False, show_progress: bool = True,
                    gate: bool = True, max_mean_diff: Optional[float] = None,
                    smooth: Optional[float] = None) -> tuple[Path, dict]:
    """Quantize `source` into `output`; returns (output, gate report). Raises
    QuantizationRejected (nothing written) when the gate fails (`max_mean_diff`: its bound on
    the mean |Δscore|; decisions outside the margin must agree whatever it is). `smooth`: the
    SmoothQuant alpha (siren_quantize.smoothing), calibrated on the fp32 source; None: off."""
    max_mean_diff = MAX_MEAN_DIFF if max_mean_diff is None else max_mean_diff
    if not (0.0 <= max_mean_diff <= 1.0):
        raise ValueError(f"max_mean_diff must be in [0, 1], got {max_mean_diff!r}")
    if weights != "int8":
        raise ValueError(f"weights must be int8 (int4 is not built), got {weights!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if smooth is not None and not 0.0 < smooth < 1.0:    # NaN fails too
        raise ValueError(f"smoothing alpha must be in (0, 1), got {smooth!r}")
    source, output = Path(source), Path(output).expanduser().resolve()
    contract = read_bundle(source)
    if contract.manifest.get("quantization"):
        raise ValueError(f"{source} is already quantized; quantize its fp32/fp16/bf16 source bundle")
    reference = Path(reference_bundle) if reference_bundle else source
    if gate and read_bundle(reference).model.dtype != "fp32":
        raise ValueError(f"the gate compares with an fp32 bundle and {reference} is {read_bundle(reference).model.dtype}: "
                         "pass --reference-bundle with an fp32 export of the same artifact (or --no-gate)")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    started = time.perf_counter()
    _say(show_progress, f"checking {source} against its manifest ...")
    contract.verify()
    to_fp32 = contract.model.dtype != "fp32"
    if smooth is not None and to_fp32:
        raise ValueError(f"smoothing calibrates on the fp32 source graph and {source} is {contract.model.dtype}: "
                         "quantize the fp32 export, or leave --smooth out")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        writer = WeightsFile(staging / WEIGHTS_FILE)
        weights_source = SourceWeights(source)
        graphs = [("model", contract.model)] + ([("streaming", contract.streaming.graph)] if contract.streaming else [])
        factors, calibration = None, []
        if smooth is not None:
            t0 = time.perf_counter()
            calibration = calibration_texts()
            _say(show_progress, f"smoothing (alpha {smooth:g}): activation ranges of {len(calibration)} calibration texts ...")
            factors = smoothing_factors(source, contract.model.path, contract.model.external_data, weights_source,
                                        _token_ids(contract, calibration), smooth)
            _say(show_progress, f"      {len(factors)} weights smoothed, {time.perf_counter() - t0:.1f}s")
        reports = {}
        for section, spec in graphs:
            t0 = time.perf_counter()
            _say(show_progress, f"quantizing {spec.path} ({scheme}, int8 weights"
                                f"{', fp32 compute from ' + contract.model.dtype if to_fp32 else ''}) ...")
            model = onnx.load(str(source / spec.path), load_external_data=False)
            reports[section] = GraphRewriter(model, weights_source, writer, scheme, block_size, to_fp32,
                                            factors).run()
            (staging / spec.path).write_bytes(model.SerializeToString())
            del model
            _say(show_progress, f"      {reports[section].quantized} MatMuls quantized, {reports[section].kept} tensors "
                                f"kept, {time.perf_counter() - t0:.1f}s")
        writer.close()
        weights_source.close()
        shutil.copy2(source / contract.tokenizer_path, staging / contract.tokenizer_path)
        if contract.prefix_head is not None:     # the head stays fp32: the same file
            shutil.copy2(source / contract.prefix_head.path, staging / contract.prefix_head.path)

        manifest = contract.raw()
        manifest["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest["model"]["dtype"] = "fp32"
        manifest["model"]["external_data"] = WEIGHTS_FILE
        manifest["model"]["opset"] = reports["model"].opset
        files = [contract.model.path, WEIGHTS_FILE, contract.tokenizer_path]
        if contract.prefix_head is not None:
            files.append(contract.prefix_head.path)
        if contract.streaming is not None:
            manifest["streaming"]["kv_dtype"] = "fp32"
            manifest["streaming"]["external_data"] = WEIGHTS_FILE
            if "opset" in manifest["streaming"]:
                manifest["streaming"]["opset"] = reports["streaming"].opset
            for entry in manifest["streaming"].get("inputs", []) + manifest["streaming"].get("outputs", []):
                if entry.get("dtype") in ("bfloat16", "float16"):
                    entry["dtype"] = "float32"
            files.append(contract.streaming.graph.path)
        manifest["engines"] = []       # engines of the source do not run these graphs
        manifest["requires"] = {**(manifest.get("requires") or {}), "onnxruntime": ONNXRUNTIME_MIN[scheme]}
        manifest["quantization"] = {
            "weights": weights, "scheme": scheme, "block_size": block_size if scheme == "blockwise" else None,
            "activations": "int8 per token (dynamic; u8 x u8, exact without VNNI)" if scheme == "dynamic" else
                           f"int8 per block of {block_size} (MatMulNBits accuracy level 4)",
            "source": {"bundle": str(source), "dtype": contract.model.dtype,
                       "manifest": describe_file(source, MANIFEST_NAME)["sha256"]},
            "quantized_matmuls": {k: r.quantized for k, r in reports.items()},
            "smoothing": None if smooth is None else {"method": "SmoothQuant per input channel", "alpha": smooth,
                                                      "calibration_texts": len(calibration)},
            "kept_fp32": "embedding gather, norms, RoPE, attention, selected-neuron gather, pooling, MLP head, softmax",
        }
        tools = manifest.setdefault("tools", {})
        for dist in ("siren-deploy", "onnx", "onnxruntime"):
            try:
                tools[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        manifest["files"] = {name: describe_file(staging, name) for name in files}
        # until the gate has passed, the staging manifest must not carry the source's verdict
        manifest["parity"] = {"passed": False, "checked": False, "pending": "the quantize gate has not run"}
        if contract.streaming is not None:
            manifest["streaming"].pop("parity", None)
        write_manifest(staging, manifest)
        read_bundle(staging).verify()

        texts = texts or gate_texts()
        report = {"passed": True, "checked": False}
        if gate:
            _say(show_progress, f"gate: {len(texts)} texts, int8 vs {reference} ...")
            report = verify_quantized(staging, reference, texts, max_mean_diff)
            report["checked"] = True
            _say(show_progress, format_report(report))
        streaming = _streaming_check(staging, texts[:8]) if contract.streaming is not None else None
        if streaming is not None:
            _say(show_progress, f"streaming on the int8 bundle vs its own score(prefix): max |Δ| "
                                f"{streaming.get('max_abs_diff', float('nan')):.2e} over {streaming.get('steps')} feeds")
        if not report["passed"] or (streaming is not None and not streaming.get("passed", True)):
            why = "the decision gate failed" if not report["passed"] else "streaming differs from score(prefix)"
            raise QuantizationRejected(f"quantized bundle refused ({scheme}): {why}; see the report above", report)
        manifest = read_bundle(staging).raw()
        manifest["parity"] = {**report, "reference": str(reference)}
        if streaming is not None:
            manifest["streaming"]["parity"] = streaming
        write_manifest(staging, manifest)
        (staging / CARD_NAME).write_text(model_card(read_bundle(staging).raw()), encoding="utf-8")
        for name in files + [CARD_NAME]:
            os.chmod(staging / name, 0o644)
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(show_progress, f"wrote {output} in {time.perf_counter() - started:.1f}s")
    return output, report

"""`siren quantize BUNDLE -o OUT`: the whole transformation, atomically.

Each candidate plan (siren_quantize.plans; one when the flags name it) is built in a hidden
staging directory next to OUT: both graphs rewritten into one new weights file, the tokenizer
copied, the manifest written by the contract's one writer (plan recorded, every file hashed),
then checked: the decision gate against the fp32 reference must pass and streaming on the new
bundle must equal its own score(prefix). The first candidate that passes is renamed into
place, with what every candidate tried measured in its manifest; a refused bundle never
appears.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import onnx

from siren_runtime.bundle import MANIFEST_NAME, read_bundle, set_model, set_streaming, write_manifest
from siren_runtime.bundle_files import Staging, describe_file
from siren_runtime.calibration import calibration_items
from siren_runtime.card import model_card
from siren_runtime.hub import CARD_NAME

from .calibration import activation_ranges
from .gate import MAX_MEAN_DIFF, check_reference, format_report, gate_items, score_on_cpu, verify_quantized
from .outliers import split_plan
from .plans import AUTO_CANDIDATES, Plan
from .signed_twin import write_twins
from .rewrite import HALF_TYPES, GraphRewriter, SourceWeights, WeightsFile
from .schemes import scheme_of
from .smoothing import matmul_groups, smoothing_factors

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


def _streaming_check(bundle: Path, texts: list) -> dict:
    """Streams on the new bundle, chunk by chunk (a trajectory guard's runs: message by
    message), against its own whole-prefix scores."""
    from siren_runtime import load_guard
    worst, steps = 0.0, 0
    with load_guard(bundle, device="cpu") as guard:
        if not guard.incremental_streaming:
            return {"checked": False, "reason": "no step graph"}
        if guard.bundle.guard.kind == "trajectory":
            for run in texts:
                session = guard.session(tools=run["tools"])
                for end, message in enumerate(run["messages"], 1):
                    streamed = session.append(message).score
                    whole = guard.score_trajectory(messages=run["messages"][:end], tools=run["tools"]).score
                    worst, steps = max(worst, abs(streamed - whole)), steps + 1
            return {"checked": True, "steps": steps, "max_abs_diff": float(worst), "tolerance": STREAM_TOLERANCE,
                    "passed": worst <= STREAM_TOLERANCE}
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
    """The ids the scoring graph reads for `texts` (a trajectory bundle's: agent runs)."""
    if contract.guard.kind == "trajectory":
        from siren_runtime.agent_guard import TrajectoryEncoder
        from siren_runtime.trajectory import as_trajectory
        encoder = TrajectoryEncoder(contract)
        return [encoder.ids(encoder.render(as_trajectory(run))) for run in texts]
    from siren_runtime.text import clean_text
    from siren_runtime.tokenization import TextEncoder
    return TextEncoder.for_bundle(contract).token_ids([clean_text(t) for t in texts])


class Calibration:
    """Activation ranges of the fp32 scoring graph (the source's, or the reference's for a
    bf16/fp16 source), keyed by the source's weights, computed once for every plan."""

    def __init__(self, source: Path, contract, reference: Path, weights: SourceWeights, show: bool):
        self.source, self.contract, self.reference, self.weights, self.show = source, contract, reference, weights, show
        self._ranges = None
        self.texts = 0

    def available(self) -> Optional[str]:
        """None, or why nothing can be calibrated."""
        if self.contract.model.dtype == "fp32" or read_bundle(self.reference).model.dtype == "fp32":
            return None
        return (f"calibration runs an fp32 graph and {self.source} is {self.contract.model.dtype}: "
                "pass --reference-bundle with an fp32 export of the same artifact")

    def weight_ranges(self) -> dict:
        """{source weight key: per-input-channel max |x|}."""
        if self._ranges is None:
            t0 = time.perf_counter()
            texts = calibration_items(self.contract.guard.kind)
            bundle = self.source if self.contract.model.dtype == "fp32" else self.reference
            spec = read_bundle(bundle).model
            _say(self.show, f"calibrating: activation ranges of {len(texts)} texts on {bundle} ...")
            calibration_graph = onnx.load(str(bundle / spec.path), load_external_data=False).graph
            groups = matmul_groups(calibration_graph)
            ranges = activation_ranges(bundle, spec.path, spec.external_data, list(groups),
                                       _token_ids(self.contract, texts))
            ours = onnx.load(str(self.source / self.contract.model.path), load_external_data=False).graph
            theirs = [(a, w) for a, ws in groups.items() for w in ws]
            mine = [w for ws in matmul_groups(ours, HALF_TYPES).values() for w in ws]
            if len(mine) != len(theirs) or any(tuple(m.dims) != tuple(w.dims) for m, (_, w) in zip(mine, theirs)):
                raise ValueError(f"{self.reference} does not have {self.source}'s MatMuls; calibrate with an fp32 "
                                 "export of the same artifact")
            self._ranges = {self.weights.key(m): ranges[a] for m, (a, _) in zip(mine, theirs)}
            self.texts = len(texts)
            _say(self.show, f"      {len(groups)} MatMul inputs, {time.perf_counter() - t0:.1f}s")
        return self._ranges


def _rewrite(staging: Path, source: Path, contract, plan: Plan, weights_source: SourceWeights,
             calibration: Calibration, show: bool) -> tuple[dict, dict]:
    """Both graphs rewritten into one new weights file under `staging`: (reports, treatment)."""
    to_fp32 = contract.model.dtype != "fp32"
    factors = outliers = None
    if plan.smooth is not None:
        graph = onnx.load(str(source / contract.model.path), load_external_data=False).graph
        factors = smoothing_factors(graph, calibration.weight_ranges(), weights_source, plan.smooth)
    if plan.outlier_ratio is not None:
        outliers = split_plan(calibration.weight_ranges(), plan.outlier_ratio)
    writer = WeightsFile(staging / WEIGHTS_FILE)
    graphs = [("model", contract.model)] + ([("streaming", contract.streaming.graph)] if contract.streaming else [])
    reports = {}
    for section, spec in graphs:
        t0 = time.perf_counter()
        model = onnx.load(str(source / spec.path), load_external_data=False)
        reports[section] = GraphRewriter(model, weights_source, writer, plan.scheme, plan.block_size, to_fp32,
                                         factors, outliers, embedding_int8=plan.embedding == "int8").run()
        (staging / spec.path).write_bytes(model.SerializeToString())
        del model
        r = reports[section]
        _say(show, f"      {spec.path}: {r.quantized} MatMuls int8"
                   f"{f', {r.split_channels} input channels in fp32' if outliers is not None else ''}"
                   f"{', int8 embedding' if r.embedding else ''}, {r.kept} tensors kept"
                   f"{' (fp32 from ' + contract.model.dtype + ')' if to_fp32 else ''}, {time.perf_counter() - t0:.1f}s")
    writer.close()
    treatment = {"signed_twin": write_twins(staging, [spec.path for _, spec in graphs], WEIGHTS_FILE)
                 if scheme_of(plan.scheme).signed_twin else None,
                 "smoothing": None if factors is None else {"method": "SmoothQuant per input channel",
                                                              "alpha": plan.smooth},
                 "outliers": None if outliers is None else {
                     "method": "input channels above the ratio x median max |x| computed in fp32 (LLM.int8()-style)",
                     "ratio": plan.outlier_ratio, "matmuls": len(outliers),
                     "channels": int(sum(len(c) for c in outliers.values()))}}
    return reports, treatment


def _carried(contract) -> list:
    """Files the quantized bundle carries unchanged besides the tokenizer (a trajectory
    guard's chat template)."""
    return [contract.guard.chat_template] if contract.guard.chat_template else []


def _manifest(staging: Path, source: Path, contract, plan: Plan, reports: dict, treatment: dict,
              calibration: Calibration, weights: str) -> tuple[dict, list]:
    manifest = contract.raw()
    manifest["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    # int8 activations are quantized with a scale taken over the whole batch: not invariant
    model = dataclasses.replace(contract.model, dtype="fp32", batch_invariant=False, external_data=WEIGHTS_FILE)
    set_model(manifest, model, opset=reports["model"].opset)
    files = [contract.model.path, WEIGHTS_FILE, contract.tokenizer_path, *_carried(contract)]
    if contract.prefix_head is not None:
        files.append(contract.prefix_head.path)
    if contract.streaming is not None:
        step = contract.streaming.graph
        widened = {name: "float32" if dtype in ("bfloat16", "float16") else dtype
                   for name, dtype in step.tensor_dtypes.items()}
        graph = dataclasses.replace(step, external_data=WEIGHTS_FILE, tensor_dtypes=widened)
        opset = {"opset": reports["streaming"].opset} if "opset" in manifest["streaming"] else {}
        set_streaming(manifest, dataclasses.replace(contract.streaming, kv_dtype="fp32", graph=graph), **opset)
        files.append(contract.streaming.graph.path)
    manifest["engines"] = []       # engines of the source do not run these graphs
    scheme = scheme_of(plan.scheme)
    manifest["requires"] = {**(manifest.get("requires") or {}), "onnxruntime": scheme.onnxruntime_min}
    twin = treatment["signed_twin"]
    if twin is not None:
        files += list(twin["graphs"].values())
    manifest["quantization"] = {
        "weights": weights, "scheme": plan.scheme, "block_size": plan.block_size if scheme.uses_block_size else None,
        "plan": plan.record(),
        "activations": scheme.activations(plan.block_size),
        "source": {"bundle": str(source), "dtype": contract.model.dtype,
                   "manifest": describe_file(source, MANIFEST_NAME)["sha256"]},
        "quantized_matmuls": {k: r.quantized for k, r in reports.items()},
        "signed_twin": twin,
        "smoothing": None if treatment["smoothing"] is None else {**treatment["smoothing"],
                                                                  "calibration_texts": calibration.texts},
        "outliers": None if treatment["outliers"] is None else {**treatment["outliers"],
                                                                "calibration_texts": calibration.texts},
        "embedding": "int8 per row (dequantized after the gather)" if plan.embedding == "int8" else "fp32",
        "kept_fp32": "norms, RoPE, attention, selected-neuron gather, pooling, MLP head, softmax"
                     + ("" if plan.embedding == "int8" else ", embedding gather"),
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
    return manifest, files


def _summary(plan: Plan, report: dict, streaming: Optional[dict], weights_bytes: int, built_s: float) -> dict:
    """One candidate's line in the manifest and the refusal."""
    flips = sum(t["flips_outside_margin"] for t in report.get("thresholds", {}).values())
    return {"plan": plan.name, "passed": bool(report["passed"] and (streaming is None or streaming.get("passed", True))),
            "mean_abs_diff": report.get("mean_abs_diff"), "max_abs_diff": report.get("max_abs_diff"),
            "flips_outside_margin": flips if report.get("checked") else None,
            "streaming_max_abs_diff": None if streaming is None else streaming.get("max_abs_diff"),
            "gate_score_s": report.get("score_s"), "weights_mb": round(weights_bytes / 1e6, 1),
            "build_s": round(built_s, 1)}


def format_candidates(rows: list) -> str:
    lines = [f"{'plan':<58} {'mean|Δ|':>8} {'max|Δ|':>8} {'flips':>5} {'stream':>8} {'score s':>7} {'MB':>7}  result"]
    for r in rows:
        def num(v, f):
            return format(v, f) if isinstance(v, (int, float)) else "-"
        lines.append(f"{r['plan']:<58} {num(r['mean_abs_diff'], '8.4f')} {num(r['max_abs_diff'], '8.4f')} "
                     f"{num(r['flips_outside_margin'], '5d')} {num(r['streaming_max_abs_diff'], '8.1e')} "
                     f"{num(r['gate_score_s'], '7.1f')} {num(r['weights_mb'], '7.1f')}  "
                     f"{r.get('why') or ('PASS' if r['passed'] else 'FAIL')}")
    return "\n".join(lines)


def quantize_bundle(source: str | Path, output: str | Path, *, weights: str = "int8", scheme: Optional[str] = None,
                    block_size: int = 32, reference_bundle: Optional[str | Path] = None,
                    texts: Optional[list[str]] = None, overwrite: bool = False, show_progress: bool = True,
                    gate: bool = True, max_mean_diff: Optional[float] = None,
                    smooth: Optional[float] = None, outlier_ratio: Optional[float] = None,
                    embedding: str = "int8") -> tuple[Path, dict]:
    """Quantize `source` into `output`; returns (output, gate report of the plan kept). With no
    `scheme` (or "auto"), no `smooth` and no `outlier_ratio`, the candidates of
    siren_quantize.plans are tried fastest first and the first that passes is kept; otherwise
    the one plan those name. Raises QuantizationRejected (nothing written) when no candidate
    passes (`max_mean_diff`: the gate's bound on the mean |Δscore|; decisions outside the
    margin must agree whatever it is). `smooth`: the SmoothQuant alpha; `outlier_ratio`:
    input channels above that x the median channel's range are computed in fp32."""
    max_mean_diff = MAX_MEAN_DIFF if max_mean_diff is None else max_mean_diff
    if not (0.0 <= max_mean_diff <= 1.0):
        raise ValueError(f"max_mean_diff must be in [0, 1], got {max_mean_diff!r}")
    if weights != "int8":
        raise ValueError(f"weights must be int8 (int4 is not built), got {weights!r}")
    auto = scheme in (None, "auto") and smooth is None and outlier_ratio is None
    if auto:
        plans = [dataclasses.replace(p, embedding=embedding, block_size=block_size) for p in AUTO_CANDIDATES]
        Plan(embedding=embedding, block_size=block_size)           # checks both
        if not gate:
            raise ValueError("choosing a plan needs the gate: with --no-gate name one (--scheme, --outliers, --smooth)")
    else:
        plans = [Plan(scheme if scheme not in (None, "auto") else "dynamic", outlier_ratio, smooth, embedding,
                      block_size)]
    source, output = Path(source), Path(output).expanduser().resolve()
    contract = read_bundle(source)
    if contract.manifest.get("quantization"):
        raise ValueError(f"{source} is already quantized; quantize its fp32/fp16/bf16 source bundle")
    reference = Path(reference_bundle) if reference_bundle else source
    if gate and read_bundle(reference).model.dtype != "fp32":
        raise ValueError(f"the gate compares with an fp32 bundle and {reference} is {read_bundle(reference).model.dtype}: "
                         "pass --reference-bundle with an fp32 export of the same artifact (or --no-gate)")
    if any(p.smooth is not None for p in plans) and contract.model.dtype != "fp32":
        raise ValueError(f"smoothing calibrates on the fp32 source graph and {source} is {contract.model.dtype}: "
                         "quantize the fp32 export, or leave --smooth out")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    started = time.perf_counter()
    _say(show_progress, f"checking {source} against its manifest ...")
    contract.verify()
    if gate:
        check_reference(reference)
    weights_source = SourceWeights(source)
    calibration = Calibration(source, contract, reference, weights_source, show_progress)
    if not auto and plans[0].calibrated and calibration.available():
        raise ValueError(calibration.available())
    texts = texts or gate_items(contract.guard.kind)
    reference_scores = None
    output.parent.mkdir(parents=True, exist_ok=True)
    rows, last_report = [], {"passed": False, "checked": False}
    try:
        for n, plan in enumerate(plans, 1):
            _say(show_progress, f"plan {n}/{len(plans)}: {plan.name}")
            if plan.calibrated and calibration.available():
                rows.append({**_summary(plan, {"passed": False}, None, 0, 0.0), "why": "skipped: no fp32 graph"})
                continue
            t0 = time.perf_counter()
            with Staging(output) as stage:
                staging = stage.path
                reports, treatment = _rewrite(staging, source, contract, plan, weights_source, calibration,
                                              show_progress)
                for rel in (contract.tokenizer_path, *_carried(contract)):
                    shutil.copy2(source / rel, staging / rel)
                if contract.prefix_head is not None:     # the head stays fp32: the same file
                    shutil.copy2(source / contract.prefix_head.path, staging / contract.prefix_head.path)
                manifest, files = _manifest(staging, source, contract, plan, reports, treatment, calibration, weights)
                write_manifest(staging, manifest)
                read_bundle(staging).verify()
                built_s = time.perf_counter() - t0
                report = {"passed": True, "checked": False}
                if gate:
                    if reference_scores is None:
                        _say(show_progress, f"gate: scoring {len(texts)} texts with the fp32 reference {reference} ...")
                        reference_scores, _ = score_on_cpu(reference, texts)
                    report = verify_quantized(staging, reference, texts, max_mean_diff, reference_scores=reference_scores)
                    report["checked"] = True
                    _say(show_progress, format_report(report))
                streaming = None
                if contract.streaming is not None and report["passed"]:
                    streaming = _streaming_check(staging, texts[:8])
                    _say(show_progress, f"streaming on the int8 bundle vs its own score(prefix): max |Δ| "
                                        f"{streaming.get('max_abs_diff', float('nan')):.2e} over {streaming.get('steps')} feeds")
                rows.append(_summary(plan, report, streaming, (staging / WEIGHTS_FILE).stat().st_size, built_s))
                last_report = report
                if not rows[-1]["passed"]:
                    if report["passed"]:
                        rows[-1]["why"] = "FAIL (streaming differs from score(prefix))"
                    stage.discard()
                    continue
                manifest = read_bundle(staging).raw()
                manifest["parity"] = {**report, "reference": str(reference)}
                manifest["quantization"]["candidates"] = rows
                manifest["quantization"]["chosen_by"] = "first of the candidates (fastest first) to pass the gate" \
                    if auto else "named by the caller"
                if streaming is not None:
                    manifest["streaming"]["parity"] = streaming
                write_manifest(staging, manifest)
                (staging / CARD_NAME).write_text(model_card(read_bundle(staging).raw()), encoding="utf-8")
                for name in files + [CARD_NAME]:
                    os.chmod(staging / name, 0o644)
                stage.publish(overwrite=overwrite)
                break
        else:
            _say(show_progress and len(plans) > 1, format_candidates(rows))
            report = {**last_report, "candidates": rows}
            raise QuantizationRejected(
                f"quantized bundle refused: {'no candidate plan' if auto else plans[0].name + ':'} "
                f"{'passed the gate' if auto else 'the decision gate or its streaming check failed'}; "
                "see the report above", report)
    finally:
        weights_source.close()
    if len(plans) > 1:
        _say(show_progress, format_candidates(rows))
    kept = plans[len(rows) - 1]
    twins = " (with u8 x s8 twins, loaded on VNNI CPUs)" if scheme_of(kept.scheme).signed_twin else ""
    _say(show_progress, f"kept: {kept.name}; wrote {output}{twins} in {time.perf_counter() - started:.1f}s")
    return output, {**report, "candidates": rows, "plan": plans[len(rows) - 1].record()}

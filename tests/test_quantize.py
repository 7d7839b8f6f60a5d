"""`siren quantize`: int8 bundles that every runtime path loads, a decision gate that refuses
what changes decisions (nothing written), fp16/bf16 sources, and streaming that stays exact
with respect to the int8 bundle's own score(prefix)."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from corpus import CORPUS
from helpers import random_chunks

#: int8 streaming vs the same bundle's whole-prefix score: the activations of a row are
#: quantized per token (dynamic) or per block (blockwise); a streamed row can differ from the
#: whole-prefix row by fp32 rounding, which may move one int8 step
STREAM_TOL = 1e-4


@pytest.fixture(scope="module")
def blockwise(all_layers, tmp_path_factory):
    from siren_quantize.pipeline import quantize_bundle
    out, report = quantize_bundle(all_layers.bundle, tmp_path_factory.mktemp("q") / "int8", scheme="blockwise",
                                  show_progress=False)
    return out, report


def test_int8_bundle_contract_and_gate(blockwise, all_layers):
    from siren_runtime.bundle import read_bundle
    out, report = blockwise
    bundle = read_bundle(out)
    bundle.verify()                                          # every file listed and hashed
    quant = bundle.manifest["quantization"]
    assert quant["weights"] == "int8" and quant["scheme"] == "blockwise" and quant["block_size"] == 32
    # 4 layers x (q, k, v, o, gate, up, down) in each graph; the head's Gemms stay fp32
    assert quant["quantized_matmuls"] == {"model": 28, "streaming": 28}
    assert bundle.manifest["parity"]["passed"] and report["passed"] and report["texts"] == 56
    assert report["mean_abs_diff"] <= 1e-2 and bundle.manifest["streaming"]["parity"]["passed"]
    assert bundle.engines == () and (out / "README.md").read_text().count("int8") >= 2
    import onnx
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 28 and ops.count("Gemm") == 3 and "Gather" in ops
    embedding = next(t for t in graph.initializer if t.name == "embed_tokens.weight")
    assert embedding.data_type == onnx.TensorProto.FLOAT                 # the embedding gather stays fp32


def test_int8_bundle_scores_and_streams_torch_free(blockwise, all_layers):
    from test_torch_free import BLOCKER
    out, _ = blockwise
    rng = random.Random(11)
    texts = [CORPUS[i] + " " + CORPUS[i + 3] for i in range(5)]
    plans = [random_chunks(t, rng, 1, 9) for t in texts]
    script = BLOCKER + r"""
import json
from siren_runtime import SirenGuard
plans = json.loads(sys.stdin.read())
guard = SirenGuard.from_pretrained(sys.argv[1], device="cpu")
sessions = [guard.stream() for _ in plans]
worst, feeds = 0.0, 0
for step in range(max(len(p) for p in plans)):
    live = [(s, p[step]) for s, p in zip(sessions, plans) if step < len(p)]
    for result, (session, _) in zip(guard.feed_batch([s for s, _ in live], [d for _, d in live]), live):
        worst = max(worst, abs(result.score - guard.score(session.text).score)); feeds += 1
implicit, prefix = 0.0, ""
for piece in plans[0]:
    prefix += piece
    implicit = max(implicit, abs(guard.score_streaming(prefix).score - guard.score(prefix).score))
texts = ["".join(p) for p in plans]
print(json.dumps({"worst": worst, "feeds": feeds, "implicit": implicit,
                  "batch": [r.score for r in guard.score_batch(texts)],
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(out)], input=json.dumps(plans), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["modules"] == [] and result["feeds"] == sum(len(p) for p in plans)
    assert result["worst"] <= STREAM_TOL and result["implicit"] <= STREAM_TOL
    reference = [r.score for r in all_layers.reference.score_batch(texts)]
    assert np.mean(np.abs(np.array(result["batch"]) - reference)) <= 1e-2     # close to llm-siren, not equal


def test_gate_refuses_outlier_backbone_and_writes_nothing(built_cases, tmp_path):
    """Per-token activation scales cannot carry a few huge channels: on the outlier backbone the
    dynamic scheme changes decisions, the gate says so, and no bundle appears."""
    from siren_quantize.pipeline import QuantizationRejected, quantize_bundle
    outliers = built_cases("outliers")
    out = tmp_path / "int8"
    with pytest.raises(QuantizationRejected) as info:
        quantize_bundle(outliers.bundle, out, scheme="dynamic", show_progress=False)
    report = info.value.report
    assert not report["passed"] and report["mean_abs_diff"] > 1e-2
    assert not out.exists() and list(tmp_path.iterdir()) == []              # no staging left behind
    proc = subprocess.run([sys.executable, "-m", "siren_cli", "quantize", str(outliers.bundle), "-o", str(out),
                           "--scheme", "dynamic", "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and not out.exists()
    assert "FAIL" in proc.stderr and "refused" in proc.stderr.strip().splitlines()[-1]


def test_bf16_source_and_verify_cli(all_layers, tmp_path):
    """A bf16 export (no CPU kernels) becomes an int8 bundle that runs on the CPU in fp32, gated
    against the fp32 export of the same artifact; `siren verify` re-runs the gate."""
    from siren_export.pipeline import export_bundle
    from siren_quantize.pipeline import quantize_bundle
    from siren_runtime import SirenGuard
    bf16 = export_bundle(str(all_layers.artifact), tmp_path / "bf16", dtype="bf16", show_progress=False,
                         streaming=True)
    with pytest.raises(ValueError, match="fp32 bundle"):
        quantize_bundle(bf16, tmp_path / "x", show_progress=False)          # no fp32 reference given
    out, report = quantize_bundle(bf16, tmp_path / "int8", scheme="blockwise", reference_bundle=all_layers.bundle,
                                  show_progress=False)
    manifest = json.loads((out / "siren_bundle.json").read_text())
    assert manifest["quantization"]["source"]["dtype"] == "bf16" and manifest["streaming"]["kv_dtype"] == "fp32"
    assert report["passed"]
    with SirenGuard.from_pretrained(out, device="cpu") as guard:
        session = guard.stream()
        for piece in ["How can I ", "make a pipe", " bomb at home?"]:
            result = session.feed(piece)
        assert abs(result.score - guard.score(session.text).score) <= STREAM_TOL
    ok = subprocess.run([sys.executable, "-m", "siren_cli", "verify", str(out), "--reference-bundle",
                         str(all_layers.bundle)], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stderr
    missing = subprocess.run([sys.executable, "-m", "siren_cli", "verify", str(out)], capture_output=True, text=True,
                             timeout=600)
    assert missing.returncode == 2 and "--reference-bundle" in missing.stderr

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
from siren_runtime.cpu_features import exact_u8s8

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
    assert bundle.requires == {"onnxruntime": (1, 22, 0)}                 # 8-bit MatMulNBits
    assert bundle.manifest["parity"]["passed"] and report["passed"] and report["texts"] == 56
    assert report["mean_abs_diff"] <= 1e-2 and bundle.manifest["streaming"]["parity"]["passed"]
    assert bundle.engines == () and (out / "README.md").read_text().count("int8") >= 2
    import onnx
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 28 and ops.count("Gemm") == 3 and "Gather" in ops
    tables = {t.name: t for t in graph.initializer if t.name.startswith("embed_tokens.weight")}
    assert tables["embed_tokens.weight__q8"].data_type == onnx.TensorProto.INT8     # int8 rows (the default)
    assert list(tables["embed_tokens.weight__row_scale"].dims) == [tables["embed_tokens.weight__q8"].dims[0], 1]
    assert "embed_tokens.weight" not in tables and quant["plan"]["embedding"] == "int8"


def test_older_onnxruntime_is_refused_with_the_version(blockwise, monkeypatch, tmp_path):
    """An int8 bundle names the oldest ONNX Runtime that runs it; an older one is refused at
    load, before a session that would load and then fail on its first run."""
    import shutil
    import onnxruntime
    from siren_runtime import BackendUnavailableError, BundleError, SirenGuard
    from siren_runtime.bundle import read_bundle
    out, _ = blockwise
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.1")
    with pytest.raises(BackendUnavailableError, match=r"needs onnxruntime >= 1\.22\.0 \(installed: 1\.21\.1\)"):
        SirenGuard.from_pretrained(out, device="cpu")
    monkeypatch.setattr(onnxruntime, "__version__", "1.22.0")
    with SirenGuard.from_pretrained(out, device="cpu", incremental_streaming=False) as guard:
        assert 0.0 <= guard.score("hello").score <= 1.0
    copy = tmp_path / "bad"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "siren_bundle.json").read_text())
    manifest["requires"] = {"onnxruntime": "new"}
    (copy / "siren_bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="requires.onnxruntime"):
        read_bundle(copy)


def test_int8_bundle_scores_and_streams_torch_free(blockwise, all_layers):
    from helpers import BLOCKER
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


def test_gate_refusal_writes_nothing(built_cases, tmp_path):
    """A bundle the gate refuses never appears, through the API and the CLI (exit 1). With exact
    u8 x u8 products the tiny outlier backbone passes the default bound (mean |Δ| ~0.004; the
    0.6B-dims outlier backbone does not: docs/benchmarks.md), so the bound is tightened here
    below what int8 can reach."""
    from siren_quantize.pipeline import QuantizationRejected, quantize_bundle
    outliers = built_cases("outliers")
    out = tmp_path / "int8"
    with pytest.raises(QuantizationRejected) as info:
        quantize_bundle(outliers.bundle, out, scheme="dynamic", show_progress=False, max_mean_diff=1e-4)
    report = info.value.report
    assert not report["passed"] and report["max_mean_diff"] == 1e-4 and 1e-4 < report["mean_abs_diff"] <= 1e-2
    assert not out.exists() and list(tmp_path.iterdir()) == []              # no staging left behind
    with pytest.raises(ValueError, match="max_mean_diff"):
        quantize_bundle(outliers.bundle, out, max_mean_diff=float("nan"), show_progress=False)
    proc = subprocess.run([sys.executable, "-m", "siren_cli", "quantize", str(outliers.bundle), "-o", str(out),
                           "--scheme", "dynamic", "--max-mean-diff", "0.0001", "-q"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and not out.exists()
    last = proc.stderr.strip().splitlines()
    assert "FAIL" in proc.stderr and "refused" in last[-2]
    assert "no --scheme/--outliers/--smooth" in last[-1]                       # what to try next: auto


def test_bf16_source_and_verify_cli(all_layers, reduced, tmp_path):
    """A bf16 export (no CPU kernels) becomes an int8 bundle that runs on the CPU in fp32, gated
    against the fp32 export of the same artifact; `siren verify` re-runs the gate."""
    from siren_quantize.pipeline import quantize_bundle
    from siren_runtime import SirenGuard
    bf16 = reduced["bf16"]
    with pytest.raises(ValueError, match="fp32 bundle"):
        quantize_bundle(bf16, tmp_path / "x", show_progress=False)          # no fp32 reference given
    with pytest.raises(ValueError, match="smoothing calibrates on the fp32 source"):
        quantize_bundle(bf16, tmp_path / "x", reference_bundle=all_layers.bundle, smooth=0.5, show_progress=False)
    assert not (tmp_path / "x").exists()
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


@pytest.mark.parametrize("scheme", ["dynamic", "blockwise"])
def test_int8_matmul_matches_integer_arithmetic(tmp_path, scheme):
    """One rewritten MatMul on ONNX Runtime against the same quantization done in numpy with
    exact integer products. Rows with a few huge channels put activation codes near 0 and 255
    and weights near ±127: where a kernel sums pairs of u8 x s8 products in saturating int16
    (MLAS without AVX-512 VNNI) the result is off by up to a tenth of its range; this
    catches it on any CPU that has that kernel."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from siren_quantize.rewrite import GraphRewriter, SourceWeights, WeightsFile
    from siren_quantize.schemes import DYNAMIC_CODES
    rng = np.random.default_rng(3)
    k, n = 256, 96
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weight[:, :8] *= 6.0                                   # a few columns with a wide range
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    x[..., [3, 77]] *= 40.0                                # outlier channels
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(model, str(src / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = onnx.load(str(src / "m.onnx"), load_external_data=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    writer, source = WeightsFile(out_dir / "m.onnx.data"), SourceWeights(src)
    report = GraphRewriter(model, source, writer, scheme, 32, to_fp32=False).run()
    writer.close(), source.close()
    assert report.quantized == 1 and "MatMul" not in [nd.op_type for nd in model.graph.node]
    (out_dir / "m.onnx").write_bytes(model.SerializeToString())
    got = ort.InferenceSession(str(out_dir / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = x @ weight
    if scheme == "dynamic":
        codes = DYNAMIC_CODES
        w_scale = np.abs(weight).max(axis=0) / float(codes.weight_levels)
        w_codes = np.clip(np.rint(weight / w_scale), -codes.weight_levels, codes.weight_levels).astype(np.int64)
        rows = x.reshape(-1, k)
        a_scale = (np.maximum(rows.max(axis=1), -rows.min(axis=1)) * np.float32(1 / codes.activation_levels)).astype(np.float32)
        a_codes = np.clip(np.rint(rows / a_scale[:, None]), -codes.activation_levels, codes.activation_levels).astype(np.int64)
        emulated = ((a_codes @ w_codes) * w_scale * a_scale[:, None]).reshape(got.shape)
        scale = np.abs(emulated).max()
        assert np.abs(got - emulated).max() <= 1e-5 * scale        # integer-exact, up to fp32 scaling
        assert np.abs(got - exact).max() <= 0.05 * scale           # and an int8 approximation of x @ w
    else:                                                          # MatMulNBits: int8 blocks, no emulation
        assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()


def test_smoothing_is_exact_and_tames_outlier_channels(tmp_path):
    """SmoothQuant factors s on one MatMul: the rewritten graph computes quantize(x / s) @
    quantize(diag(s) w) exactly (integer emulation), and on rows with outlier channels that is
    closer to x @ w than the unsmoothed int8 product."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from siren_quantize.rewrite import GraphRewriter, SourceWeights, WeightsFile
    rng = np.random.default_rng(5)
    k, n = 256, 64
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((3, 7, k)).astype(np.float32)
    x[..., [5, 100, 200]] *= 60.0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])],
                              [numpy_helper.from_array(weight, "w")])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src / "m.onnx"),
              save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    a_max, w_max = np.abs(x.reshape(-1, k)).max(axis=0), np.abs(weight).max(axis=1)
    factor = (np.sqrt(a_max) / np.sqrt(w_max)).astype(np.float32)              # alpha 0.5

    def run(smoothing: bool):
        out = tmp_path / f"out{int(smoothing)}"
        out.mkdir()
        model = onnx.load(str(src / "m.onnx"), load_external_data=False)
        source, writer = SourceWeights(src), WeightsFile(out / "m.onnx.data")
        key = source.key(next(t for t in model.graph.initializer if t.name == "w"))
        GraphRewriter(model, source, writer, "dynamic", 32, False, {key: factor} if smoothing else None).run()
        writer.close(), source.close()
        (out / "m.onnx").write_bytes(model.SerializeToString())
        return ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def emulate(xs, ws):
        w_scale = np.abs(ws).max(axis=0) / 127.0
        w_codes = np.clip(np.rint(ws / w_scale), -127, 127).astype(np.int64)
        rows = xs.reshape(-1, k)
        a_scale = (np.maximum(rows.max(axis=1), -rows.min(axis=1)) * np.float32(1 / 127)).astype(np.float32)
        a_codes = np.clip(np.rint(rows / a_scale[:, None]), -127, 127).astype(np.int64)
        return ((a_codes @ w_codes) * w_scale * a_scale[:, None]).reshape(x.shape[:-1] + (n,))

    exact = x @ weight
    smoothed, plain = run(True), run(False)
    emulated = emulate(x * (1.0 / factor).astype(np.float32), weight * factor[:, None])
    assert np.abs(smoothed - emulated).max() <= 1e-5 * np.abs(emulated).max()
    err_smoothed, err_plain = np.abs(smoothed - exact).mean(), np.abs(plain - exact).mean()
    assert err_smoothed < 0.5 * err_plain, (err_smoothed, err_plain)


def test_smoothed_bundle_records_and_streams(built_cases, tmp_path):
    """`smooth=0.5` end to end on the tiny outlier backbone: calibrated on the fp32 source,
    recorded in the manifest, gated, and streaming checked (both graphs got the same factors,
    or the step graph would disagree with the scoring graph)."""
    from siren_quantize.pipeline import quantize_bundle
    outliers = built_cases("outliers")
    out, report = quantize_bundle(outliers.bundle, tmp_path / "int8", scheme="dynamic", smooth=0.5,
                                  show_progress=False)
    manifest = json.loads((out / "siren_bundle.json").read_text())
    assert manifest["quantization"]["smoothing"]["alpha"] == 0.5 and report["passed"]
    assert manifest["streaming"]["parity"]["passed"] and manifest["streaming"]["parity"]["max_abs_diff"] <= STREAM_TOL
    with pytest.raises(ValueError, match="alpha"):
        quantize_bundle(outliers.bundle, tmp_path / "bad", smooth=1.5, show_progress=False)
    assert not (tmp_path / "bad").exists()


def test_massive_backbone_has_published_outliers(built_cases):
    """The realistic outlier backbone: from layer 1 on, two fixed residual channels hold about
    1000 on delimiter and frequent-word tokens only (Sun et al. 2024), and the projections'
    inputs carry ~20x outlier features on every token (Dettmers et al. 2022)."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from siren_export.massive_activations import TRIGGER_TOKENS
    massive = built_cases("massive")
    model = AutoModel.from_pretrained(str(massive.backbone), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(massive.backbone))
    text = "The cat sat on the mat. Then it slept, and the dog barked at the door of the house!"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    triggers = set(tokenizer.convert_tokens_to_ids(list(TRIGGER_TOKENS)))
    is_trigger = torch.tensor([int(i) in triggers for i in ids[0]])
    assert 3 <= int(is_trigger.sum()) < len(is_trigger) - 3
    after = out.hidden_states[2][0].abs()                       # the output of layer 1
    channels = after[is_trigger].mean(dim=0).topk(2).indices
    for layer in (2, 3):                                        # carried by the residual stream
        later = out.hidden_states[layer][0].abs()
        assert float(later[is_trigger][:, channels].min()) > 300
        assert float(later[~is_trigger][:, channels].max()) < 30
    median = float(after.median())
    assert float(after[is_trigger][:, channels].min()) > 100 * median
    before = out.hidden_states[1][0].abs()                      # layer 0 writes none
    assert float(before[:, channels].max()) < 30
    norm = model.layers[2].input_layernorm.weight.detach().abs()
    assert float(norm.max()) > 10 * float(norm.median())        # outlier features, folded out of the weights


def test_default_quantize_keeps_the_outlier_split_on_massive_activations(built_cases, tmp_path):
    """With no options, plain dynamic int8 is refused on massive activations (mean |Δ| over
    the limit) and the next candidate, the fp32 split of outlier channels, passes, streaming
    included; the CLI says what each candidate measured and the manifest records the plan."""
    massive = built_cases("massive")
    out = tmp_path / "int8"
    proc = subprocess.run([sys.executable, "-m", "siren_cli", "quantize", str(massive.bundle), "-o", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "plan 1/" in said and "plan 2/" in said and "kept: dynamic, fp32 outliers >16x median" in said
    quant = json.loads((out / "siren_bundle.json").read_text())["quantization"]
    assert quant["plan"]["outlier_ratio"] == 16.0 and quant["plan"]["scheme"] == "dynamic"
    assert quant["chosen_by"].startswith("first of the candidates")
    first, kept = quant["candidates"][0], quant["candidates"][-1]
    assert first["plan"] == "dynamic, int8 embedding" and not first["passed"] and first["mean_abs_diff"] > 1e-2
    assert kept["passed"] and kept["mean_abs_diff"] <= 1e-2 and len(quant["candidates"]) == 2
    assert quant["outliers"]["channels"] > 0 and quant["outliers"]["calibration_texts"] == 8
    manifest = json.loads((out / "siren_bundle.json").read_text())
    assert manifest["streaming"]["parity"]["passed"] and manifest["streaming"]["parity"]["max_abs_diff"] <= STREAM_TOL
    _check_int8_embedding_rows(out, massive.bundle)
    _check_signed_twin(out)


def _check_int8_embedding_rows(int8_bundle, fp32_bundle):
    """The gathered rows of the int8 table are exactly q * row scale, and within half a step
    of the fp32 row (a row's scale is set by that token alone)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_model
    from siren_runtime.backends.onnxruntime_loader import open_session
    model = onnx.load(str(int8_bundle / "model.onnx"), load_external_data=False)
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and any(i.endswith("__scale") for i in n.input))
    model.graph.output.append(helper.make_tensor_value_info(mul.output[0], onnx.TensorProto.FLOAT, None))
    load_external_data_for_model(model, str(int8_bundle))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, scale = inits["embed_tokens.weight__q8"], inits["embed_tokens.weight__row_scale"]
    session = open_session(model.SerializeToString(), "cpu")
    ids = np.array([[0, 13, 279, 151643, 90000, 11]], np.int64)
    rows = session.run([mul.output[0]], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
    assert np.array_equal(rows, q[ids[0]].astype(np.float32) * scale[ids[0]])
    source = onnx.load(str(fp32_bundle / "model.onnx"))
    table = next(numpy_helper.to_array(t) for t in source.graph.initializer if t.name == "embed_tokens.weight")
    assert np.all(np.abs(rows - table[ids[0]]) <= scale[ids[0]] / 2 + 1e-7)


def _check_signed_twin(int8_bundle):
    """A dynamic bundle ships, per graph, the u8 x s8 twin of its u8 x u8 graph: the manifest's
    flip ranges are exactly the bytes of the MatMulIntegerToFloat weights of both graphs, and
    those bytes with their top bit flipped are the same integers as int8 (code - 128)."""
    import onnx
    from onnx import numpy_helper
    from siren_runtime.bundle import read_bundle
    bundle = read_bundle(int8_bundle)
    twin = bundle.signed_twin
    step = bundle.streaming.graph.path
    assert twin.graphs == {"model.onnx": "model.s8.onnx", step: step[:-len(".onnx")] + ".s8.onnx"}
    assert set(twin.graphs.values()) <= set(bundle.files) and twin.weights == "model.onnx.data"
    weights = np.fromfile(int8_bundle / twin.weights, np.uint8)
    flipped = weights.copy()
    for offset, length in twin.flip:
        flipped[offset:offset + length] ^= 0x80
    spans = set()
    for graph, twin_graph in twin.graphs.items():
        plain = onnx.load(str(int8_bundle / graph), load_external_data=False).graph
        signed = onnx.load(str(int8_bundle / twin_graph), load_external_data=False).graph
        assert [n.op_type for n in plain.node] == [n.op_type for n in signed.node]
        inits = {t.name: t for t in signed.initializer}
        for node in (n for n in plain.node if n.op_type == "MatMulIntegerToFloat"):
            where = {e.key: e.value for e in inits[node.input[1]].external_data}
            offset, length = int(where["offset"]), int(where["length"])
            spans.add((offset, length))
            assert inits[node.input[1]].data_type == onnx.TensorProto.INT8
            assert int(numpy_helper.to_array(inits[node.input[5]])) == 0
            codes = weights[offset:offset + length].astype(np.int16)
            assert np.array_equal(flipped[offset:offset + length].view(np.int8).astype(np.int16), codes - 128)
    covered = np.zeros(len(weights), bool)
    for offset, length in twin.flip:
        covered[offset:offset + length] = True
    expected = np.zeros(len(weights), bool)
    for offset, length in spans:
        expected[offset:offset + length] = True
    assert len(spans) > 0 and np.array_equal(covered, expected)     # every weight code, nothing else


@pytest.fixture(scope="module")
def dynamic_bundle(built_cases, tmp_path_factory):
    """Plain dynamic int8 of the tiny outlier backbone (passes the default gate here)."""
    from siren_quantize.pipeline import quantize_bundle
    out, _ = quantize_bundle(built_cases("outliers").bundle, tmp_path_factory.mktemp("dyn") / "int8",
                             scheme="dynamic", show_progress=False)
    return out


def _scores_and_feeds(guard, texts):
    scores = [r.score for r in guard.score_batch(texts)]
    session, fed = guard.stream(), []
    for cut in range(7, len(texts[0]) + 1, 23):
        fed.append(session.feed(texts[0][len(session.text):cut]).score)
    return scores, fed


def test_signed_twin_is_loaded_only_where_u8s8_is_exact(dynamic_bundle, monkeypatch):
    """Without VNNI (or with SIREN_INT8_CODING=u8u8) the stored u8 x u8 graphs load; the
    twin's weights are then never flipped, and a stream runs on the same coding."""
    from siren_runtime import SirenGuard, cpu_features
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    _check_signed_twin(dynamic_bundle)
    with SirenGuard.from_pretrained(dynamic_bundle, device="cpu") as guard:
        assert guard.runners.score.int8_coding is None and guard.runners.step.int8_coding is None
        assert 0.0 <= guard.score(CORPUS[0]).score <= 1.0
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    monkeypatch.setenv(cpu_features.CODING_ENV, "u8u8")
    assert not cpu_features.exact_u8s8()
    monkeypatch.delenv(cpu_features.CODING_ENV)
    assert cpu_features.exact_u8s8() == (cpu_features.platform.machine().lower() in ("x86_64", "amd64"))


def test_signed_twin_bytes_on_both_read_paths(dynamic_bundle, monkeypatch, tmp_path):
    """The recoded weights are the file's bytes with the listed ranges' top bit flipped, on the
    in-memory path (flipped after the hash check) and on the mapped private copy (flipped as
    copied, after hashing: the mapping stays read-only); a changed byte is still refused."""
    import shutil
    from siren_runtime import BundleError, private_copy
    from siren_runtime.bundle import read_bundle
    twin = read_bundle(dynamic_bundle).signed_twin
    expected = np.fromfile(dynamic_bundle / twin.weights, np.uint8)
    stored = expected.copy()
    for offset, length in twin.flip:
        expected[offset:offset + length] ^= 0x80
    in_memory = read_bundle(dynamic_bundle).read_verified(twin.weights, flip=twin.flip)
    assert np.array_equal(in_memory, expected) and not in_memory.flags.writeable
    monkeypatch.setattr(private_copy, "MAP_MIN_BYTES", 0)
    monkeypatch.setattr(private_copy, "_CHUNK", 4099)          # ranges straddle the copy's chunks
    monkeypatch.setenv("SIREN_WEIGHTS_DIR", str(tmp_path))
    bundle = read_bundle(dynamic_bundle)
    mapped = bundle.read_verified(twin.weights, flip=twin.flip)
    assert np.array_equal(mapped, expected) and not mapped.flags.writeable
    assert "mmap" in type(mapped.base.obj if hasattr(mapped.base, "obj") else mapped.base).__name__
    assert np.array_equal(bundle.read_verified(twin.weights), stored)      # the stored coding beside it
    copy = tmp_path / "tampered"
    shutil.copytree(dynamic_bundle, copy)
    with open(copy / twin.weights, "r+b") as f:
        f.seek(twin.flip[0][0])
        f.write(bytes([stored[twin.flip[0][0]] ^ 0x80]))                # what a recoding would look like
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(copy).read_verified(twin.weights, flip=twin.flip)


@pytest.mark.skipif(not exact_u8s8(),
                    reason="needs a CPU with AVX-512 VNNI or AVX-VNNI (exact u8 x s8 dot products)")
def test_signed_twin_scores_equal_the_stored_coding_on_vnni(dynamic_bundle, all_layers, monkeypatch):
    """On a VNNI CPU the guard loads both twins (u8 x s8, faster) and every score and streamed
    feed equals the stored u8 x u8 coding's: the same integers, summed exactly by both."""
    from siren_runtime import SirenGuard, cpu_features
    texts = [CORPUS[i] + " " + CORPUS[i + 1] for i in range(6)]
    with SirenGuard.from_pretrained(dynamic_bundle, device="cpu") as guard:
        assert guard.runners.score.int8_coding == "u8 x s8" and guard.runners.step.int8_coding == "u8 x s8"
        signed = _scores_and_feeds(guard, texts)
    monkeypatch.setenv(cpu_features.CODING_ENV, "u8u8")
    with SirenGuard.from_pretrained(dynamic_bundle, device="cpu") as guard:
        assert guard.runners.score.int8_coding is None
        stored = _scores_and_feeds(guard, texts)
    assert len(signed[1]) >= 3
    for a, b in zip(signed, stored):
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-6, (a, b)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update(flip=[[0, 4], [2, 4]]), "sorted, disjoint"),
    (lambda t: t.update(flip=[[1 << 40, 4]]), "inside"),
    (lambda t: t.update(flip=[[True, 4]]), "flip"),
    (lambda t: t.update(flip="all"), "flip"),
    (lambda t: t.update(graphs={"other.onnx": "model.s8.onnx"}), "not a graph of this bundle"),
    (lambda t: t.update(graphs={"model.onnx": "missing.s8.onnx"}), "missing.s8.onnx"),
])
def test_signed_twin_manifest_refusals(dynamic_bundle, tmp_path, edit, match):
    import shutil
    from siren_runtime import BundleError
    from siren_runtime.bundle import read_bundle
    copy = tmp_path / "bad"
    shutil.copytree(dynamic_bundle, copy)
    manifest = json.loads((copy / "siren_bundle.json").read_text())
    edit(manifest["quantization"]["signed_twin"])
    (copy / "siren_bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=match):
        read_bundle(copy)


def test_bench_table_compares_fp32_and_both_int8_codings(built_cases, dynamic_bundle, tmp_path):
    """`siren bench` side by side in one run: llm-siren, the fp32 bundle (equal to it at fp32)
    and the int8 bundle, in both codings where this CPU loads the u8 x s8 twin (equal scores)."""
    from siren_export.bench import format_table, run_bench
    outliers = built_cases("outliers")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CORPUS[:4]) + "\n")
    rows, used, tokens = run_bench(str(outliers.bundle), reference=str(outliers.artifact), texts_file=str(texts),
                                   repeat=1, also=[str(dynamic_bundle)])
    names = [r["implementation"] for r in rows]
    int8 = [r for r in rows if "int8" in r["implementation"]]
    assert names[0].startswith("llm-siren") and "fp32" in names[1] and rows[1]["max_dscore"] <= 1e-5
    assert [r["implementation"].split(" (")[0] for r in int8] == (
        ["siren_runtime int8-dynamic u8 x s8", "siren_runtime int8-dynamic u8 x u8"] if exact_u8s8()
        else ["siren_runtime int8-dynamic u8 x u8"])
    assert len({r["max_dscore"] for r in int8}) == 1 and all(r["peak_rss_mb"] > 0 for r in rows)
    table = format_table(rows, used, tokens)
    assert "CPU (" in table and all(name in table for name in names)

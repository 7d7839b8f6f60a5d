"""TensorRT stage without a GPU: profiles, engine compatibility, backend fallback, CLI errors,
the fp16/bf16 graphs (dtypes, fp32 islands, numerics on the CPU), the fp16 range check and
the parity gate. Building and running engines needs a GPU: see benchmarks/gpu_check.sh."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from corpus import CORPUS
from siren_runtime.engine_compat import engine_incompatibility, pick_profile

ENTRY = {"graph": "model", "path": "engines/model.plan", "precision": "bf16", "tensorrt_version": "10.13.0",
         "gpu": "NVIDIA H200", "compute_capability": "9.0",
         "profiles": [{"shapes": {"input_ids": {"min": [1, 1], "opt": [8, 64], "max": [32, 128]}}},
                      {"shapes": {"input_ids": {"min": [1, 1], "opt": [8, 256], "max": [32, 2048]}}}]}


def test_profiles():
    from siren_engines.profiles import scorer_profiles, step_profiles
    profiles = [p.to_dict() for p in scorer_profiles(2048, max_batch=32)]
    assert len(profiles) == 2
    assert profiles[-1]["shapes"]["input_ids"] == {"min": [1, 1], "opt": [8, 256], "max": [32, 2048]}
    assert profiles[-1]["shapes"]["attention_mask"] == profiles[-1]["shapes"]["input_ids"]
    assert len(scorer_profiles(64, max_batch=4)) == 1
    with pytest.raises(ValueError, match="max_seq"):
        scorer_profiles(64, max_seq=65)
    with pytest.raises(ValueError, match="opt_batch"):
        scorer_profiles(64, max_batch=4, opt_batch=5)
    step = step_profiles(512, kv_layers=36, kv_heads=8, head_dim=128, features=100)[0].to_dict()["shapes"]
    assert step["past_kv"]["min"][4] == 1 and step["past_kv"]["max"][4] == 512     # never an empty past


def test_pick_profile_takes_the_tightest():
    assert pick_profile(ENTRY["profiles"], 4, 100) == 0
    assert pick_profile(ENTRY["profiles"], 4, 129) == 1
    assert pick_profile(ENTRY["profiles"], 33, 10) == -1


@pytest.mark.parametrize("trt,cc,match", [
    (None, "9.0", "TensorRT is not installed"),
    ("10.13.0", None, "no usable NVIDIA GPU"),
    ("11.4.0", "9.0", "built with TensorRT 10.13.0.*this machine has TensorRT 11.4.0"),
    ("10.13.0", "8.7", "compute capability 9.0.*this GPU is 8.7"),
])
def test_incompatible_engines_are_refused(trt, cc, match):
    reason = engine_incompatibility(ENTRY, trt, cc)
    assert reason is not None and __import__("re").search(match, reason)
    assert "run `siren build` on this machine" in reason
    assert engine_incompatibility(ENTRY, "10.13.0", "9.0") is None


@pytest.fixture()
def bundle_with_engine(all_layers, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(all_layers.bundle, bundle)
    path = bundle / "siren_bundle.json"
    manifest = json.loads(path.read_text())
    manifest["engines"] = [ENTRY]
    from siren_runtime.bundle import describe_file
    (bundle / ENTRY["path"]).parent.mkdir(exist_ok=True)
    (bundle / ENTRY["path"]).write_bytes(b"a plan built elsewhere")
    manifest["files"][ENTRY["path"]] = describe_file(bundle, ENTRY["path"])
    path.write_text(json.dumps(manifest))
    return bundle


@pytest.fixture()
def no_tensorrt(monkeypatch):
    """These tests are about a machine without TensorRT: make that true on a GPU box too."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_runtime_falls_back_to_onnxruntime_and_says_so(bundle_with_engine, all_layers, no_tensorrt):
    from siren_runtime import BackendUnavailableError, SirenGuard
    from siren_runtime.backends import forget_warnings
    forget_warnings()
    with pytest.warns(RuntimeWarning, match="tensorrt.*falling back to onnxruntime"):
        guard = SirenGuard.from_pretrained(bundle_with_engine)
    assert guard.backend == "onnxruntime"
    assert abs(guard.score("hello").score - all_layers.reference.score("hello").score) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        SirenGuard.from_pretrained(bundle_with_engine)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        SirenGuard.from_pretrained(bundle_with_engine, backend="tensorrt")


def _siren(*args, hide_tensorrt: bool = False):
    prefix = "import sys; sys.modules['tensorrt'] = None; " if hide_tensorrt else "import sys; "
    code = prefix + "from siren_cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_build_and_verify_without_tensorrt_fail_with_one_line(all_layers, tmp_path):
    bundle = tmp_path / "bundle"          # a copy: on a GPU box a build must not touch the shared bundle
    shutil.copytree(all_layers.bundle, bundle)
    for args in (["build", str(bundle)], ["verify", str(bundle), "--backend", "tensorrt"]):
        proc = _siren(*args, hide_tensorrt=True)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "Traceback" not in proc.stderr
    proc = _siren("build", str(bundle), "--precision", "bf16")
    assert proc.returncode == 2 and "precision lives in the graph" in proc.stderr
    assert json.loads((bundle / "siren_bundle.json").read_text()).get("engines") in (None, [])


@pytest.mark.parametrize("dtype,elem", [("fp16", 10), ("bf16", 16)])
def test_reduced_graph_dtypes_and_fp32_islands(reduced, dtype, elem):
    import onnx
    model = onnx.load(str(reduced[dtype] / "model.onnx"), load_external_data=False)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    matrices = [i.data_type for i in model.graph.initializer if len(i.dims) == 2 and not i.name.startswith("head.")]
    assert len(matrices) >= 1 + 7 * 4 and all(t == elem for t in matrices)  # embedding + projections carry it
    assert inits["rotary_emb.inv_freq"] == onnx.TensorProto.FLOAT
    head = [t for n, t in inits.items() if n.startswith("head.")]
    assert head and all(t == onnx.TensorProto.FLOAT for t in head)  # the MLP head stays fp32
    assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output}["score"] == onnx.TensorProto.FLOAT
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert any(a.i == onnx.TensorProto.FLOAT for n in casts for a in n.attribute if a.name == "to")
    assert json.loads((reduced[dtype] / "siren_bundle.json").read_text())["model"]["dtype"] == dtype


def test_fp16_numerics_on_onnxruntime_cpu(reduced, all_layers):
    from siren_runtime import SirenGuard
    manifest = json.loads((reduced["fp16"] / "siren_bundle.json").read_text())
    assert manifest["parity"]["checked"] and manifest["parity"]["max_abs_diff"] < 0.03
    guard = SirenGuard.from_pretrained(reduced["fp16"], device="cpu")
    ours = np.array([r.score for r in guard.score_batch(CORPUS)])
    ref = np.array([r.score for r in all_layers.reference.score_batch(CORPUS)])
    assert np.all(np.isfinite(ours)) and np.max(np.abs(ours - ref)) < 0.02


def test_bf16_bundle_on_a_cpu_says_what_to_export(reduced, no_tensorrt):
    from siren_runtime import BackendUnavailableError, SirenGuard
    for device in (None, "cpu"):
        with pytest.raises(BackendUnavailableError, match="^a bf16 bundle runs on TensorRT or ONNX Runtime CUDA "
                                                          "only.*siren export --dtype fp32.*no bf16 kernels"):
            SirenGuard.from_pretrained(reduced["bf16"], device=device)


def test_bf16_numerics_with_the_torch_module(reduced, all_layers):
    """ONNX Runtime's CPU provider has no bf16 kernels: check the module that was exported."""
    import torch
    from siren_export.artifact import load_artifact
    from siren_export.backbone import load_backbone
    from siren_export.scorer import SirenScorer
    manifest = json.loads((reduced["bf16"] / "siren_bundle.json").read_text())
    assert manifest["parity"]["checked"] is False and "bf16" in manifest["parity"]["reason"]
    art = load_artifact(str(all_layers.artifact))
    loaded = load_backbone(art.base_model_id, None, art.deepest_layer + 1, dtype="bf16")
    module = SirenScorer(loaded.model, loaded.num_layers, art).eval()
    from siren_runtime.text import clean_text
    enc = all_layers.reference._tokenizer([clean_text(t) for t in CORPUS[:6]], return_tensors="pt", padding=True,
                                          truncation=True, max_length=64)
    with torch.no_grad():
        ours = module(enc["input_ids"], enc["attention_mask"])[0].numpy()
    ref = np.array([r.score for r in all_layers.reference.score_batch(CORPUS[:6])])
    assert np.max(np.abs(ours - ref)) < 0.05


def test_fp16_refused_when_activations_run_hot(all_layers, tmp_path):
    from safetensors.torch import load_file, save_file
    from siren_export.errors import ArtifactError
    from siren_export.pipeline import export_bundle
    hot = tmp_path / "hot-backbone"
    shutil.copytree(all_layers.backbone, hot)
    weights = load_file(str(hot / "model.safetensors"))
    key = next(k for k in weights if "embed_tokens" in k)
    weights[key] = weights[key] * 4.0e5
    save_file(weights, str(hot / "model.safetensors"))
    with pytest.raises(ArtifactError, match=r"refusing --dtype fp16: the largest \|activation\|.* is [0-9.e+]+"):
        export_bundle(str(all_layers.artifact), tmp_path / "b", backbone=str(hot), dtype="fp16", show_progress=False)
    assert not (tmp_path / "b").exists()


def test_parity_gate_is_margin_aware():
    """The engine gate applies the int8 gate's rule: a text sitting on a threshold may flip
    (bf16 rounding), a text the fp32 bundle is sure about may not; the mean |Δ| is bounded."""
    from siren_engines.verify import decision_report
    ref = np.linspace(0.0, 1.0, 8)
    assert decision_report(ref + 1e-4, ref)["passed"]
    on_edge = np.array([0.05, 0.3, 0.505, 0.7, 0.95])          # 0.505: within ±0.02 of 0.5
    flipped = on_edge.copy()
    flipped[2] = 0.495                                         # the one flip of 8 texts that failed `siren build`
    report = decision_report(flipped, on_edge)
    assert report["passed"] and report["thresholds"]["0.5"]["flips_within_margin"] == 1
    sure = on_edge.copy()
    sure[3] = 0.45                                             # 0.7 -> 0.45: a sure decision flips
    report = decision_report(sure, on_edge)
    assert not report["passed"] and report["thresholds"]["0.5"]["flips_outside_margin"] == 1
    assert not decision_report(on_edge + 0.015, on_edge)["passed"]      # no flip, mean |Δ| over 0.01
    assert not decision_report(np.full(3, np.nan), np.zeros(3))["passed"]


def test_verify_cli_gates_fp16_against_fp32(reduced, all_layers):
    proc = _siren("verify", str(reduced["fp16"]), "--reference-bundle", str(all_layers.bundle), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["max_abs_diff"] < 0.03 and report["backend"] == "onnxruntime"

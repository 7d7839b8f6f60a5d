"""Bundle format, integrity checks and atomic export."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import TAMPER_AFTER_LOAD

from siren_runtime import BundleError, SirenGuard
from siren_runtime.bundle import FORMAT_VERSION, MANIFEST_NAME, read_bundle


@pytest.fixture()
def bundle_copy(all_layers, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(all_layers.bundle, dst)
    return dst


def test_manifest_contents(all_layers):
    bundle = read_bundle(all_layers.bundle)
    m = bundle.manifest
    assert m["format"] == "siren-bundle" and m["format_version"] == FORMAT_VERSION == 2
    assert bundle.streaming is not None and bundle.streaming.graph.path == "step.onnx"
    assert [i["name"] for i in m["streaming"]["inputs"]] == list(bundle.streaming.graph.io.inputs)
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "step.onnx"} <= set(m["files"])
    assert m["streaming"]["parity"]["checked"] and m["streaming"]["parity"]["max_abs_diff"] <= 1e-5
    assert m["streaming"]["parity"]["calls"] < m["streaming"]["parity"]["steps"]   # rows were batched
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in m["files"].values())
    assert m["source"]["files"]["siren_config.json"] and m["source"]["files"]["siren.safetensors"]
    assert m["backbone"]["model_id"] == str(all_layers.backbone)
    assert m["siren"]["pooling_type"] == "residual_mean" and m["siren"]["readout"] == "runtime"
    assert m["siren"]["selected_layers"] == [0, 1, 2, 3]
    assert m["inference"] == {"max_length": 64, "default_threshold": 0.5, "pad_token_id": 151643,
                              "pad_token": "<|endoftext|>", "padding_side": "right"}
    io = {v["name"]: v for v in m["model"]["inputs"] + m["model"]["outputs"]}
    assert io["input_ids"]["dtype"] == "int64" and io["input_ids"]["shape"] == ["batch", "sequence"]
    assert io["score"]["dtype"] == "float32" and io["score"]["shape"] == ["batch"]
    assert m["parity"]["checked"] and m["parity"]["passed"] and m["parity"]["max_abs_diff"] <= 1e-5
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(m["tools"])


def test_altered_file_is_refused(bundle_copy):
    data = bundle_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="model.onnx.data.*sha256"):
        SirenGuard.from_pretrained(bundle_copy)
    # explicit opt-out for trusted paths still loads
    SirenGuard.from_pretrained(bundle_copy, verify=False)


def test_truncated_file_is_refused(bundle_copy):
    tok = bundle_copy / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:1000])
    with pytest.raises(BundleError, match="tokenizer.json.*size"):
        SirenGuard.from_pretrained(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "model.onnx.data").unlink()
    with pytest.raises(FileNotFoundError, match="model.onnx.data is missing"):
        SirenGuard.from_pretrained(bundle_copy)


def _edit_manifest(bundle, edit):
    path = bundle / MANIFEST_NAME
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("bad_path", ["../outside.onnx", "/etc/passwd", "a/../../b"])
def test_manifest_paths_cannot_escape(bundle_copy, bad_path):
    _edit_manifest(bundle_copy, lambda m: m["files"].__setitem__(bad_path, {"sha256": "0" * 64}))
    with pytest.raises(BundleError, match="escapes"):
        SirenGuard.from_pretrained(bundle_copy)


def test_unsupported_format_version(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(BundleError, match="format version 99"):
        SirenGuard.from_pretrained(bundle_copy)


def test_corrupted_manifest(bundle_copy):
    (bundle_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        SirenGuard.from_pretrained(bundle_copy)


def test_export_refuses_existing_output(all_layers):
    from siren_export.pipeline import export_bundle
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle(str(all_layers.artifact), all_layers.bundle, show_progress=False)


def test_failed_export_leaves_nothing(all_layers, tmp_path, monkeypatch):
    """An export interrupted mid-way (the scoring graph, tokenizer and prefix head written, the
    step graph not yet) leaves no bundle and no staging directory."""
    from siren_export import pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "export_shared_step", boom)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_bundle(str(all_layers.artifact), target, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_lets_go_of_the_traced_weights(all_layers, tmp_path):
    """After a graph is written nothing pins the torch weights (onnxscript's rewrite matchers
    used to), so the export can free them before ONNX Runtime loads the graph: at Qwen3-4B
    fp32 two copies would not fit a 24 GB machine."""
    import gc
    import weakref

    from siren_export.artifact import load_artifact
    from siren_export.backbone import load_backbone
    from siren_export.onnx_export import export_scorer
    from siren_export.scorer import SirenScorer

    art = load_artifact(str(all_layers.artifact))
    loaded = load_backbone(str(all_layers.backbone), None, art.deepest_layer + 1)
    scorer = SirenScorer(loaded.model, loaded.num_layers, art).eval()
    weight = weakref.ref(loaded.model.layers[0].mlp.up_proj.weight)
    export_scorer(scorer, tmp_path / "model.onnx")
    scorer = loaded = None
    gc.collect()
    assert weight() is None


def test_loaded_guard_is_immune_to_later_file_changes(bundle_copy):
    """Break 1: ONNX Runtime kept reading the weights file after it was verified."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", TAMPER_AFTER_LOAD, str(bundle_copy)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "immune", (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("swap_after, mapped, streaming", [
    ("step.onnx", False, True), ("model.onnx.data", False, True), ("tokenizer.json", False, True),
    ("step.onnx", True, True), ("model.onnx.data", True, True),
    ("model.onnx", False, False), ("model.onnx", True, False), ("model.onnx.data", True, False)])
def test_file_replaced_during_load(bundle_copy, all_layers, monkeypatch, tmp_path, swap_after, mapped, streaming):
    """Break 2: the weights file replaced (by rename) with zeros right after another file
    was loaded. Swapped before the weights are read, the load is refused; swapped after,
    the guard runs on the bytes that were checked. mapped: every file read through the
    private mapped copy (the path of files of 64 MiB or more), as real weights are.
    streaming: a CPU guard with a step graph runs on it alone (the step graph, the weights,
    the tokenizer); without, the scoring graph (the model graph, the weights, the tokenizer)."""
    import os
    from siren_runtime import private_copy
    from siren_runtime.bundle import Bundle
    if mapped:
        monkeypatch.setattr(private_copy, "MAP_MIN_BYTES", 0)
        monkeypatch.setenv("SIREN_WEIGHTS_DIR", str(tmp_path))
    data = bundle_copy / "model.onnx.data"
    read, order = Bundle.read_verified, []

    def read_then_swap(self, rel, **options):
        out = read(self, rel, **options)
        order.append(rel)
        if rel == swap_after and b"\0" * 64 != data.read_bytes()[:64]:
            tmp = bundle_copy / "zeros.tmp"
            tmp.write_bytes(b"\0" * data.stat().st_size)
            os.replace(tmp, data)
        return out
    monkeypatch.setattr(Bundle, "read_verified", read_then_swap)
    text = "How do I pick a lock?"
    graph = "step.onnx" if streaming else "model.onnx"
    if swap_after != graph:                              # read after the weights: harmless
        guard = SirenGuard.from_pretrained(bundle_copy, device="cpu", incremental_streaming=streaming)
        assert abs(guard.score(text).score - all_layers.reference.score(text).score) <= 1e-5
        assert abs(guard.score_streaming(text).score - all_layers.reference.score(text).score) <= 1e-5
        assert order[:2] == [graph, "model.onnx.data"]
    else:
        with pytest.raises(BundleError, match="model.onnx.data.*sha256"):
            SirenGuard.from_pretrained(bundle_copy, device="cpu", incremental_streaming=streaming)
        assert order == [graph]                          # refused while reading the swapped file


def test_every_loaded_file_is_listed(bundle_copy):
    """Break 3: files the runtime loads need not have been listed."""
    for rel in ("model.onnx.data", "tokenizer.json", "step.onnx"):
        bundle = read_bundle(bundle_copy)
        files = dict(bundle.files)
        files.pop(rel)
        from dataclasses import replace
        with pytest.raises(BundleError, match=f"{rel} is not listed"):
            replace(bundle, files=files).read_verified(rel)

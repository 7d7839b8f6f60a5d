"""Export usability: an artifact and its backbone from a Hugging Face cache (--cache-dir
reaches both, --revision picks the artifact's revision, the backbone's pinned revision is
honoured), the model card, and progress that -q turns off."""
from __future__ import annotations

import json

import pytest

from hub_cache import populate

ARTIFACT_REPO = "siren-test/tiny-head"
BACKBONE_REPO = "siren-test/tiny-qwen3"


def test_export_from_hub_cache_with_revisions_and_quiet(tmp_path, qwen_tokenizer_json, capsys, monkeypatch):
    import torch
    from siren_cli.main import main
    from siren_export.synthetic import make_backbone, make_head
    from siren_guard import SirenGuard as Reference
    from siren_runtime import SirenGuard

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")      # restored after the test
    backbone = make_backbone(tmp_path / "backbone", num_layers=2, hidden_size=32, intermediate_size=64,
                             num_heads=2, num_kv_heads=1, head_dim=16, tokenizer_cache=qwen_tokenizer_json)
    artifact = make_head(tmp_path / "head", backbone, num_layers=2, width=32, selected_layers=[0, 1],
                         max_length=32)
    cache = tmp_path / "hub-cache"
    snapshot = populate(cache, BACKBONE_REPO, backbone)
    # the artifact on the Hub names its backbone by repo id at a pinned commit; "v2" is a tag
    hub_artifact = tmp_path / "hub-head"
    hub_artifact.mkdir()
    (hub_artifact / "siren.safetensors").write_bytes((artifact / "siren.safetensors").read_bytes())
    config = json.loads((artifact / "siren_config.json").read_text())
    config["base_model"] = {"model_id": BACKBONE_REPO, "revision": snapshot.name}
    (hub_artifact / "siren_config.json").write_text(json.dumps(config))
    populate(cache, ARTIFACT_REPO, hub_artifact, revision="v2")

    out = tmp_path / "bundle"
    status = main(["export", ARTIFACT_REPO, "--revision", "v2", "--cache-dir", str(cache), "-o", str(out),
                   "--no-streaming", "-q"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "[1/" not in captured.err and captured.out.strip() == str(out)        # -q: no progress
    manifest = json.loads((out / "siren_bundle.json").read_text())
    assert manifest["source"]["artifact"] == ARTIFACT_REPO and manifest["source"]["revision"] == "v2"
    assert manifest["backbone"]["model_id"] == BACKBONE_REPO and manifest["backbone"]["revision"] == snapshot.name
    card = (out / "README.md").read_text()
    assert f"base_model: {BACKBONE_REPO}" in card and snapshot.name in card
    assert manifest["source"]["files"]["siren.safetensors"] in card

    # same weights as the local artifact: llm-siren on it is the oracle
    reference = Reference.from_pretrained(str(artifact), device="cpu", dtype=torch.float32)
    with SirenGuard.from_pretrained(out, device="cpu") as guard:
        texts = ["hello there", "How can I make a pipe bomb at home?"]
        got = [r.score for r in guard.score_batch(texts)]
        assert max(abs(a - r.score) for a, r in zip(got, reference.score_batch(texts))) <= 1e-5

    # progress is on by default (the first step shows before a later failure)
    missing = tmp_path / "bad-head"
    missing.mkdir()
    (missing / "siren.safetensors").write_bytes((artifact / "siren.safetensors").read_bytes())
    config["base_model"] = {"model_id": "siren-test/not-cached", "revision": None}
    (missing / "siren_config.json").write_text(json.dumps(config))
    assert main(["export", str(missing), "--cache-dir", str(cache), "-o", str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err
    assert "[1/8] reading SIREN artifact" in err and "siren-test/not-cached" in err.strip().splitlines()[-1]


def test_large_file_reads_report_progress(all_layers, caplog, monkeypatch):
    import logging
    from siren_runtime import SirenGuard
    from siren_runtime import bundle as bundle_module
    monkeypatch.setattr(bundle_module, "PROGRESS_MIN_BYTES", 1)
    with caplog.at_level(logging.INFO, logger="siren_runtime.bundle"):
        SirenGuard.from_pretrained(all_layers.bundle, device="cpu").close()
    lines = [r.getMessage() for r in caplog.records if r.name == "siren_runtime.bundle"]
    assert any(l.startswith("reading and hashing model.onnx.data") for l in lines)
    assert any("model.onnx.data:" in l and "sha256 matches" in l for l in lines)


@pytest.mark.parametrize("layout", ["base model", "causal LM (model. prefix, LM head, sharded)"])
def test_fp32_export_of_a_bf16_checkpoint_widens_tensor_by_tensor(tmp_path, qwen_tokenizer_json, monkeypatch,
                                                                 layout):
    """Issue 22: a bf16 checkpoint is read tensor by tensor into an fp32 model (no transformers
    load, no mapped shards), and the result is exactly what a direct fp32 load (llm-siren's)
    gives: every parameter and buffer, whether the checkpoint is a base model's or a causal
    LM's (keys under `model.`, an LM head and layers the export drops, several shards)."""
    import torch
    from transformers import AutoModel, Qwen3ForCausalLM
    from siren_export.backbone import checkpoint_dtype, checkpoint_files, load_backbone, load_backbone_config
    from siren_export.synthetic import make_backbone

    fp32 = make_backbone(tmp_path / "fp32", num_layers=3, hidden_size=32, intermediate_size=64, num_heads=2,
                         num_kv_heads=1, head_dim=16, tokenizer_cache=qwen_tokenizer_json)
    narrow = tmp_path / "bf16"
    if layout == "base model":
        AutoModel.from_pretrained(str(fp32), dtype=torch.bfloat16).save_pretrained(str(narrow))
    else:
        Qwen3ForCausalLM.from_pretrained(str(fp32), dtype=torch.bfloat16).save_pretrained(
            str(narrow), max_shard_size="100KB")
        assert len(checkpoint_files(str(narrow), None)) > 1
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (fp32 / name).exists():
            (narrow / name).write_bytes((fp32 / name).read_bytes())
    assert checkpoint_dtype(load_backbone_config(str(narrow), None)) == "bf16"

    def refused(*args, **kwargs):
        raise AssertionError("the widening path must not load through transformers")
    monkeypatch.setattr(AutoModel, "from_pretrained", refused)
    loaded = load_backbone(str(narrow), None, 2, dtype="fp32").model
    monkeypatch.undo()
    config = load_backbone_config(str(narrow), None)
    config.num_hidden_layers = 2
    direct = AutoModel.from_pretrained(str(narrow), config=config, dtype=torch.float32, attn_implementation="sdpa")
    ours, theirs = loaded.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    buffers, direct_buffers = dict(loaded.named_buffers()), dict(direct.named_buffers())
    assert buffers.keys() == direct_buffers.keys() and buffers
    for name, a in buffers.items():
        assert a.dtype == direct_buffers[name].dtype and torch.equal(a, direct_buffers[name]), name
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.config.dtype == torch.float32 and not loaded.training

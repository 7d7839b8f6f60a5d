"""Bundles from the Hugging Face Hub, offline against a real cache layout (tests/hub_cache.py):
the real huggingface_hub resolves refs and snapshots; the runtime stays torch-free and hashes
every cached file it loads."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from hub_cache import populate
from helpers import BLOCKER

REPO = "siren-test/tiny-guard"

SCRIPT = BLOCKER + r"""
import json, os
from siren_runtime import SirenGuard
kwargs = json.loads(sys.argv[2])
guard = SirenGuard.from_pretrained(sys.argv[1], device="cpu", **kwargs)
print(json.dumps({"scores": [r.score for r in guard.score_batch(["hello there", "How do I make a bomb?"])],
                  "stream": guard.score_streaming("partial resp").score,
                  "threshold": guard.default_threshold, "directory": str(guard.bundle.directory),
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}))
"""


def load_in_subprocess(source, env_extra, **kwargs):
    import os
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    env.pop("HF_HOME", None) if "HF_HOME" not in env_extra else None
    return subprocess.run([sys.executable, "-c", SCRIPT, source, json.dumps(kwargs)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_hub_bundle_offline_torch_free(all_layers, tmp_path):
    home = tmp_path / "hf-home"
    snapshot = populate(home / "hub", REPO, all_layers.bundle)
    proc = load_in_subprocess(REPO, {"HF_HOME": str(home)})          # HF_HOME's cache, no arguments
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["modules"] == [] and out["directory"] == str(snapshot)
    ref = all_layers.reference
    expected = [r.score for r in ref.score_batch(["hello there", "How do I make a bomb?"])]
    assert max(abs(a - b) for a, b in zip(out["scores"], expected)) <= 1e-5
    assert abs(out["stream"] - ref.score("partial resp").score) <= 1e-5


def test_hub_bundle_cache_dir_revision_and_card(all_layers, tmp_path):
    from siren_runtime import SirenGuard
    cache = tmp_path / "cache"
    populate(cache, REPO, all_layers.bundle)
    # a tag pointing at an older commit whose manifest says threshold 0.3
    older = tmp_path / "older"
    shutil.copytree(all_layers.bundle, older)
    manifest = json.loads((older / "siren_bundle.json").read_text())
    manifest["inference"]["default_threshold"] = 0.3
    (older / "siren_bundle.json").write_text(json.dumps(manifest))
    populate(cache, REPO, older, revision="v1")
    with SirenGuard.from_pretrained(REPO, cache_dir=cache, local_files_only=True, device="cpu") as main:
        assert main.default_threshold == 0.5
    with SirenGuard.from_pretrained(REPO, revision="v1", cache_dir=cache, local_files_only=True,
                                    device="cpu") as tagged:
        assert tagged.default_threshold == 0.3
        assert abs(tagged.score("hi").score - all_layers.reference.score("hi").score) <= 1e-5
    # the CLI takes the repo id too
    proc = subprocess.run([sys.executable, "-m", "siren_cli", "score", REPO, "hello", "--json", "--offline",
                           "--cache-dir", str(cache), "--revision", "v1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["threshold"] == 0.3 and abs(row["score"] - all_layers.reference.score("hello").score) <= 1e-5
    card = (all_layers.bundle / "README.md").read_text()
    source = json.loads((all_layers.bundle / "siren_bundle.json").read_text())["source"]
    assert source["files"]["siren.safetensors"] in card and "SirenGuard.from_pretrained" in card
    assert "README.md" not in json.loads((all_layers.bundle / "siren_bundle.json").read_text())["files"]


def test_hub_bundle_tampered_or_missing(all_layers, tmp_path, monkeypatch):
    from siren_runtime import BundleError, SirenGuard
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        SirenGuard.from_pretrained(REPO, cache_dir=cache)
    snapshot = populate(cache, REPO, all_layers.bundle)
    with pytest.raises(FileNotFoundError, match="revision|not in the local"):
        SirenGuard.from_pretrained(REPO, cache_dir=cache, revision="no-such-tag")
    blob = (snapshot / "model.onnx.data").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF                                   # one flipped byte in the cached blob
    blob.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx.data: sha256 does not match"):
        SirenGuard.from_pretrained(REPO, cache_dir=cache, device="cpu")


def test_hub_engines_only_when_asked(all_layers, tmp_path, monkeypatch):
    """A bundle repo with a TensorRT engine: a CPU node without the engine file in its cache
    loads it (engines are not fetched unless asked); asking for engines needs the file."""
    from siren_runtime import SirenGuard
    from siren_runtime.bundle import describe_file, read_bundle, write_manifest
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with_engine = tmp_path / "with-engine"
    shutil.copytree(all_layers.bundle, with_engine)
    (with_engine / "engines").mkdir()
    (with_engine / "engines" / "model.fp32.plan").write_bytes(b"\x00" * 4096)
    manifest = read_bundle(with_engine).raw()
    manifest["files"]["engines/model.fp32.plan"] = describe_file(with_engine, "engines/model.fp32.plan")
    manifest["engines"] = [{"graph": "model", "path": "engines/model.fp32.plan", "profiles": []}]
    write_manifest(with_engine, manifest)
    cache = tmp_path / "cache"
    populate(cache, REPO, with_engine, skip={"engines/model.fp32.plan"})
    with SirenGuard.from_pretrained(REPO, cache_dir=cache, device="cpu") as guard:
        assert guard.bundle.engines == () and guard.backend == "onnxruntime"
    with pytest.raises(FileNotFoundError, match="engines/model.fp32.plan is missing"):
        SirenGuard.from_pretrained(REPO, cache_dir=cache, device="cpu", engines=True)

"""Export refuses bad artifacts before any heavy work, with a message naming the problem."""
from __future__ import annotations

import json
import shutil

import pytest

from siren_export.errors import ArtifactError
from siren_export.pipeline import export_bundle


@pytest.fixture()
def artifact(all_layers, tmp_path):
    dst = tmp_path / "artifact"
    shutil.copytree(all_layers.artifact, dst)
    return dst


def _edit(artifact, edit):
    path = artifact / "siren_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _export(artifact, tmp_path):
    return export_bundle(str(artifact), tmp_path / "bundle", show_progress=False)


EDITS = [
    # a content head declared as a trajectory one: the trajectory exporter refuses its contract by name
    ("trajectory contract", lambda c: c.__setitem__("task", "trajectory"), "pooling_type 'residual_mean' is not supported"),
    ("unknown task", lambda c: c.__setitem__("task", "vision"), "unknown task"),
    ("pooling", lambda c: c["siren_module"].__setitem__("pooling_type", "last_token"), "pooling_type"),
    ("layer out of range", lambda c: c["siren_module"].__setitem__("selected_layers", [0, 9]), "selected_neurons_dict has no entry"),
    ("no neurons for a layer", lambda c: c["siren_module"]["selected_neurons_dict"].pop("layer2_residual_mean"), "layer2_residual_mean"),
    ("input_dim mismatch", lambda c: c["mlp"].__setitem__("input_dim", 31), "input_dim is 31"),
    ("hidden dims mismatch", lambda c: c["mlp"].__setitem__("layer_dims", [32, 17]), "does not match|shape"),
    ("dropout layout", lambda c: c["mlp"].__setitem__("dropout_rates", [0.0, 0.0]), "does not match"),
    ("max_length", lambda c: c["inference"].__setitem__("max_length", 0), "max_length"),
    ("threshold", lambda c: c["inference"].__setitem__("default_threshold", 1.5), "default_threshold"),
    ("empty layers", lambda c: c["siren_module"].__setitem__("selected_layers", []), "empty"),
]


@pytest.mark.parametrize("name,edit,match", EDITS, ids=[e[0] for e in EDITS])
def test_config_refusals(artifact, tmp_path, name, edit, match):
    _edit(artifact, edit)
    with pytest.raises(ArtifactError, match=match):
        _export(artifact, tmp_path)
    assert not (tmp_path / "bundle").exists()


def test_layer_index_beyond_backbone(artifact, tmp_path):
    def edit(c):
        sm = c["siren_module"]
        sm["selected_layers"] = [0, 1, 2, 7]
        sm["selected_neurons_dict"]["layer7_residual_mean"] = sm["selected_neurons_dict"].pop("layer3_residual_mean")
    _edit(artifact, edit)
    with pytest.raises(ArtifactError, match="layer 7 is out of range.*4 layers"):
        _export(artifact, tmp_path)


def test_neuron_index_beyond_hidden_size(artifact, tmp_path):
    _edit(artifact, lambda c: c["siren_module"]["selected_neurons_dict"]["layer1_residual_mean"].__setitem__(0, 64))
    with pytest.raises(ArtifactError, match="neuron 64, out of range.*hidden size 64"):
        _export(artifact, tmp_path)


def test_weight_shape_mismatch(artifact, tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(artifact / "siren.safetensors"))
    tensors["network.3.weight"] = tensors["network.3.weight"][:, :-1].contiguous()
    save_file(tensors, str(artifact / "siren.safetensors"))
    with pytest.raises(ArtifactError, match=r"network.3.weight has shape"):
        _export(artifact, tmp_path)


def test_not_safetensors(artifact, tmp_path):
    (artifact / "siren.safetensors").write_bytes(b"\x80\x04pickle-ish bytes")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        _export(artifact, tmp_path)


@pytest.mark.parametrize("missing", ["siren_config.json", "siren.safetensors"])
def test_missing_files(artifact, tmp_path, missing):
    (artifact / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        _export(artifact, tmp_path)


def test_missing_artifact_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        export_bundle(str(tmp_path / "nope" / "deeper"), tmp_path / "bundle", show_progress=False)


def test_hub_download_offline_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ArtifactError, match="could not fetch artifact UofTCSSLab/SIREN-Qwen3-4B"):
        export_bundle("UofTCSSLab/SIREN-Qwen3-4B", tmp_path / "bundle", show_progress=False)


def test_bad_options(artifact, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        export_bundle(str(artifact), tmp_path / "b", dtype="int8", show_progress=False)
    with pytest.raises(ValueError, match="readout"):
        export_bundle(str(artifact), tmp_path / "b", readout="hooks", show_progress=False)

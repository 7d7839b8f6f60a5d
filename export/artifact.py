"""Loading and validating a SIREN artifact (`siren_config.json` + `siren.safetensors`).

Everything checkable without the backbone is checked here, before any heavy download;
the checks that need the backbone's dimensions are in :func:`check_against_backbone`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from siren_runtime.bundle_files import sha256_file

from .errors import ArtifactError

CONFIG_NAME = "siren_config.json"
WEIGHTS_NAME = "siren.safetensors"
POOLING_TYPES = ("residual_mean", "mlp_mean")


@dataclass
class HeadLayer:
    """One Linear of the MLP head, with the ReLU that follows it (all but the last)."""
    weight: Any  # torch.Tensor [out, in]
    bias: Any    # torch.Tensor [out]
    relu: bool


@dataclass
class SirenArtifact:
    source: str
    config_path: Path
    weights_path: Path
    config: dict
    pooling_type: str
    selected_layers: list[int]
    layer_weights: dict[int, float]
    neurons: dict[int, list[int]]
    head: list[HeadLayer]
    max_length: int
    default_threshold: float
    base_model_id: str
    base_model_revision: Optional[str]
    file_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def deepest_layer(self) -> int:
        return max(self.selected_layers)

    @property
    def feature_dim(self) -> int:
        return sum(len(self.neurons[l]) for l in self.selected_layers)


def resolve_artifact(source: str, cache_dir: Optional[str] = None, revision: Optional[str] = None) -> tuple[Path, Path]:
    """A local folder, or a Hugging Face repo id (downloaded with huggingface_hub,
    which honours HF_HOME and HF_HUB_OFFLINE)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(f"{source}: expected an artifact folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{source}: artifact file {name} is missing")
        return path / CONFIG_NAME, path / WEIGHTS_NAME
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"artifact not found: {source} is neither a folder nor a Hub repo id (owner/name)")
    from huggingface_hub import hf_hub_download
    try:
        config_path = hf_hub_download(repo_id=source, filename=CONFIG_NAME, cache_dir=cache_dir, revision=revision)
        # the weights from the commit the config came from (a push between the two cannot mix them)
        commit = Path(config_path).parent.name
        weights_path = hf_hub_download(repo_id=source, filename=WEIGHTS_NAME, cache_dir=cache_dir, revision=commit)
    except Exception as e:  # network, auth, offline mode: one clear line for the CLI
        raise ArtifactError(f"could not fetch artifact {source} from the Hugging Face Hub: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return Path(config_path), Path(weights_path)


def _require(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise ArtifactError(f"{source}: {message}")


def _int_list(value, source: str, what: str) -> list[int]:
    _require(isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
             source, f"{what} must be a list of integers")
    return list(value)


def _parse_structure(config: dict, source: str) -> dict:
    _require(isinstance(config, dict), source, f"{CONFIG_NAME} must hold a JSON object")
    task = config.get("task", "content")
    if task == "trajectory":
        raise ArtifactError(
            f"{source} is a 'trajectory' artifact (Agent-SIREN): read it with "
            "siren_export.trajectory.load_trajectory_artifact (`siren export` does)")
    _require(task == "content", source, f"unknown task {task!r} (expected 'content')")
    base = config.get("base_model")
    _require(isinstance(base, dict) and isinstance(base.get("model_id"), str) and base["model_id"],
             source, "base_model.model_id is missing")
    module = config.get("siren_module")
    _require(isinstance(module, dict), source, "siren_module section is missing")
    pooling = module.get("pooling_type")
    _require(pooling in POOLING_TYPES, source,
             f"pooling_type {pooling!r} is not supported (supported: {', '.join(POOLING_TYPES)})")
    layers = _int_list(module.get("selected_layers"), source, "selected_layers")
    _require(len(layers) > 0, source, "selected_layers is empty")
    _require(len(set(layers)) == len(layers), source, "selected_layers has duplicates")
    _require(min(layers) >= 0, source, "selected_layers has a negative layer index")
    layers = sorted(layers)

    raw_weights = module.get("layer_weights", {})
    _require(isinstance(raw_weights, dict), source, "layer_weights must be an object")
    weights: dict[int, float] = {}
    for key, value in raw_weights.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ArtifactError(f"{source}: layer_weights key {key!r} is not a layer number") from None
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                 source, f"layer_weights[{key!r}] must be a finite number")
        weights[layer] = float(value)
    # llm-siren weighs a selected layer missing from layer_weights by 1.0.
    layer_weights = {l: weights.get(l, 1.0) for l in layers}

    neuron_dict = module.get("selected_neurons_dict")
    _require(isinstance(neuron_dict, dict), source, "selected_neurons_dict is missing")
    neurons: dict[int, list[int]] = {}
    for layer in layers:
        key = f"layer{layer}_{pooling}"
        _require(key in neuron_dict, source, f"selected_neurons_dict has no entry {key!r} for selected layer {layer}")
        idx = _int_list(neuron_dict[key], source, f"selected_neurons_dict[{key!r}]")
        _require(len(idx) > 0, source, f"selected_neurons_dict[{key!r}] is empty")
        _require(min(idx) >= 0, source, f"selected_neurons_dict[{key!r}] has a negative neuron index")
        neurons[layer] = idx
    for key in neuron_dict:
        prefix = key.split("_")[0]
        if prefix.startswith("layer") and prefix[5:].isdigit() and int(prefix[5:]) in layers \
                and key != f"layer{int(prefix[5:])}_{pooling}":
            raise ArtifactError(f"{source}: selected_neurons_dict holds {key!r} beside the "
                                f"{pooling} entry for the same layer; ambiguous artifact")

    mlp = config.get("mlp")
    _require(isinstance(mlp, dict), source, "mlp section is missing")
    dims = _int_list(mlp.get("layer_dims"), source, "mlp.layer_dims")
    rates = mlp.get("dropout_rates", [0.0] * len(dims))
    _require(isinstance(rates, list) and len(rates) == len(dims), source,
             "mlp.dropout_rates must list one rate per hidden layer")
    _require(mlp.get("num_classes", 2) == 2, source, "mlp.num_classes must be 2 (safe, harmful)")
    input_dim = mlp.get("input_dim")
    feature_dim = sum(len(v) for v in neurons.values())
    _require(input_dim == feature_dim, source,
             f"mlp.input_dim is {input_dim} but the selected neurons add up to {feature_dim}")

    inference = config.get("inference", {})
    max_length = inference.get("max_length")
    _require(isinstance(max_length, int) and max_length > 0, source, "inference.max_length must be a positive int")
    threshold = inference.get("default_threshold", 0.5)
    _require(isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0, source,
             "inference.default_threshold must be in [0, 1]")
    return dict(pooling=pooling, layers=layers, layer_weights=layer_weights, neurons=neurons,
                dims=dims, rates=[float(r) for r in rates], input_dim=input_dim,
                max_length=max_length, threshold=float(threshold),
                model_id=base["model_id"], revision=base.get("revision") or None)


def _load_head(weights_path: Path, parsed: dict, source: str) -> list[HeadLayer]:
    """Read `network.{i}` Linear weights; i counts ReLU and (rate > 0) Dropout modules."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{source}: {WEIGHTS_NAME} is not a readable safetensors file ({e})") from None
    expected: list[tuple[int, int, int, bool]] = []  # (module index, in, out, relu)
    index, prev = 0, parsed["input_dim"]
    for dim, rate in zip(parsed["dims"], parsed["rates"]):
        expected.append((index, prev, dim, True))
        index += 3 if rate > 0 else 2
        prev = dim
    expected.append((index, prev, 2, False))
    wanted = {f"network.{i}.{p}" for i, *_ in expected for p in ("weight", "bias")}
    missing = sorted(wanted - set(tensors))
    extra = sorted(set(tensors) - wanted)
    _require(not missing and not extra, source,
             f"{WEIGHTS_NAME} does not match mlp config: missing {missing or 'none'}, unexpected {extra or 'none'}")
    head = []
    for i, fan_in, fan_out, relu in expected:
        w, b = tensors[f"network.{i}.weight"], tensors[f"network.{i}.bias"]
        _require(tuple(w.shape) == (fan_out, fan_in), source,
                 f"network.{i}.weight has shape {tuple(w.shape)}, config implies {(fan_out, fan_in)}")
        _require(tuple(b.shape) == (fan_out,), source,
                 f"network.{i}.bias has shape {tuple(b.shape)}, config implies {(fan_out,)}")
        head.append(HeadLayer(weight=w.float(), bias=b.float(), relu=relu))
    return head


def load_artifact(source: str, cache_dir: Optional[str] = None, revision: Optional[str] = None) -> SirenArtifact:
    config_path, weights_path = resolve_artifact(str(source), cache_dir, revision)
    label = str(source)
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{label}: {CONFIG_NAME} is not valid JSON ({e})") from None
    parsed = _parse_structure(config, label)
    head = _load_head(Path(weights_path), parsed, label)
    return SirenArtifact(
        source=label, config_path=Path(config_path), weights_path=Path(weights_path), config=config,
        pooling_type=parsed["pooling"], selected_layers=parsed["layers"],
        layer_weights=parsed["layer_weights"], neurons=parsed["neurons"], head=head,
        max_length=parsed["max_length"], default_threshold=parsed["threshold"],
        base_model_id=parsed["model_id"], base_model_revision=parsed["revision"],
        file_sha256={CONFIG_NAME: sha256_file(Path(config_path)), WEIGHTS_NAME: sha256_file(Path(weights_path))},
    )


def check_against_backbone(artifact: SirenArtifact, num_layers: int, hidden_size: int) -> None:
    """Layer and neuron indices must exist in the backbone they will be read from."""
    src = artifact.source
    _require(artifact.deepest_layer < num_layers, src,
             f"selected layer {artifact.deepest_layer} is out of range for a backbone with {num_layers} layers")
    # Both readouts are hidden-size vectors: the residual stream, or the MLP's output
    # (after down_proj, before the residual add).
    width, what = hidden_size, "hidden size"
    for layer, idx in artifact.neurons.items():
        _require(max(idx) < width, src,
                 f"layer {layer} selects neuron {max(idx)}, out of range for the backbone's {what} {width}")

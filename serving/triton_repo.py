"""`siren triton`: a bundle -> a Triton Inference Server model repository.

    REPO/siren_tokenizer/   Python backend: clean + join + tokenize (siren_runtime's code)
    REPO/siren_scorer/      python (siren_runtime on ONNX Runtime; runs on CPU-only servers),
                            onnxruntime (onnxruntime_onnx) or tensorrt (tensorrt_plan)
    REPO/siren_guard/       ensemble: TEXT (or PROMPT/RESPONSE) -> SCORE
    REPO/siren_stream/      (--streaming) sequence-batched Python model: DELTA per request of a
                            sequence -> SCORE of the whole text so far, incremental (KV cache)

A trajectory (Agent-SIREN) bundle takes agent runs instead: MESSAGES (the OpenAI chat rows as
one JSON string) and TOOLS (optional, JSON) -> SCORE; the tokenizer renders the backbone's chat
template exactly as siren_runtime does. Its stream model takes the new MESSAGES of a run per
request of a sequence (TOOLS with the first) -> SCORE of the run so far.

Thresholds stay with the client: one deployment serves many policies (a strict child-safety
threshold and a permissive red-team one read the same SCORE).
"""
from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from siren_runtime.bundle import MANIFEST_NAME, read_bundle
from siren_runtime.validation import check_int

SCORERS = ("python", "onnxruntime", "tensorrt")
INSTANCE_KINDS = {"auto": None, "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
TOKENIZER_MODEL = "siren_tokenizer"
SCORER_MODEL = "siren_scorer"
STREAM_MODEL = "siren_stream"


def scorer_kind(flavor: str, instance_kind: str = "auto") -> str:
    """Where scorer instances run. auto: a TensorRT plan needs its GPU; the onnxruntime
    flavour lets Triton choose (GPU when the server has one, else CPU); the Python scorer
    runs on the CPU (on a GPU ask for it: it then uses ONNX Runtime CUDA)."""
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    if flavor == "tensorrt" and instance_kind == "cpu":
        raise ValueError("a TensorRT plan runs on a GPU: --instance-kind cpu cannot serve --scorer tensorrt")
    return INSTANCE_KINDS[instance_kind] or {"tensorrt": "KIND_GPU", "onnxruntime": "KIND_AUTO",
                                             "python": "KIND_CPU"}[flavor]


def _preferred_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (4, 8, 16, 32, 64) if s <= max_batch]
    return sizes or [max_batch]


def _batching(max_batch: int, queue_delay_us: int) -> str:
    sizes = ", ".join(str(s) for s in _preferred_sizes(max_batch))
    return (f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
            f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n")


def _instances(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"


#: the string inputs of the guard's ensemble (and its tokenizer), by guard kind
TEXT_INPUTS = {"content": (("TEXT", True), ("PROMPT", True), ("RESPONSE", True)),
               "trajectory": (("MESSAGES", False), ("TOOLS", True))}


def _string_inputs(kind: str) -> str:
    rows = [f'  {{ name: "{name}" data_type: TYPE_STRING dims: [ 1 ]{" optional: true" if optional else ""} }}'
            for name, optional in TEXT_INPUTS[kind]]
    return "input [\n" + ",\n".join(rows) + "\n]\n"


def tokenizer_config(max_batch: int, instances: int, queue_delay_us: int = 500, kind: str = "content") -> str:
    return (f'name: "{TOKENIZER_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            + _string_inputs(kind) +
            'output [\n'
            '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },\n'
            '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
            + _batching(max_batch, queue_delay_us) + _instances(instances, "KIND_CPU"))


def scorer_config(flavor: str, max_batch: int, instances: int, queue_delay_us: int = 1000,
                  instance_kind: str = "auto") -> str:
    if flavor not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {flavor!r}")
    head = {"python": 'backend: "python"\n', "onnxruntime": 'platform: "onnxruntime_onnx"\n',
            "tensorrt": 'platform: "tensorrt_plan"\n'}[flavor]
    inputs = ('input [\n  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },\n'
              '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n')
    if flavor == "python":
        output = 'output [\n  { name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }\n]\n'
    else:  # the graph's `score` is [batch]: seen by Triton as dims [1] per request
        output = ('output [\n  { name: "score" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }\n]\n')
    kind = scorer_kind(flavor, instance_kind)
    return (f'name: "{SCORER_MODEL}"\n{head}max_batch_size: {max_batch}\n{inputs}{output}'
            + _batching(max_batch, queue_delay_us) + _instances(instances, kind))


def stream_config(max_batch: int, instances: int, max_sequences: int = 64, idle_seconds: float = 300.0,
                  queue_delay_us: int = 1000, instance_kind: str = "cpu", kind: str = "content") -> str:
    """The sequence-batched streaming model. The oldest strategy batches one request from
    each of up to `max_sequences` live sequences per instance into one execute call, which the
    model steps together with feed_batch; START/END/CORRID arrive as control inputs."""
    placement = INSTANCE_KINDS.get(instance_kind) or "KIND_CPU"
    sizes = ", ".join(str(s) for s in _preferred_sizes(max_batch))
    idle_us = int(idle_seconds * 1e6)
    return (f'name: "{STREAM_MODEL}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            + ('input [\n  { name: "DELTA" data_type: TYPE_STRING dims: [ 1 ] }\n]\n' if kind == "content" else
               _string_inputs("trajectory")) +
            'output [\n  { name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }\n]\n'
            'sequence_batching {\n'
            f'  max_sequence_idle_microseconds: {idle_us}\n'
            f'  oldest {{\n    max_candidate_sequences: {max_sequences}\n'
            f'    preferred_batch_size: [ {sizes} ]\n    max_queue_delay_microseconds: {queue_delay_us}\n  }}\n'
            '  control_input [\n'
            '    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },\n'
            '    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },\n'
            '    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }\n'
            '  ]\n}\n'
            'parameters [\n'
            f'  {{ key: "max_sessions" value: {{ string_value: "{max_sequences}" }} }},\n'
            f'  {{ key: "idle_seconds" value: {{ string_value: "{idle_seconds:g}" }} }}\n]\n'
            + _instances(instances, placement))


def ensemble_config(name: str, flavor: str, max_batch: int, kind: str = "content") -> str:
    score_name = "SCORE" if flavor == "python" else "score"
    maps = "".join(f'      input_map {{ key: "{n}" value: "{n}" }}\n' for n, _ in TEXT_INPUTS[kind])
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
            + _string_inputs(kind) +
            'output [\n  { name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }\n]\n'
            'ensemble_scheduling {\n  step [\n'
            f'    {{\n      model_name: "{TOKENIZER_MODEL}"\n      model_version: -1\n'
            + maps +
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
                     instances: int = 1, name: str = "siren_guard", overwrite: bool = False,
                     instance_kind: str = "auto", streaming: bool = False, max_sequences: int = 64,
                     idle_seconds: float = 300.0) -> Path:
    """Write the model repository; `streaming` adds the sequence-batched `siren_stream`."""
    bundle, output = Path(bundle), Path(output)
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    check_int(max_batch, "max_batch")
    check_int(instances, "instances")
    scorer_kind(scorer, instance_kind)           # refuses a TensorRT scorer on CPU instances up front
    check_int(max_sequences, "max_sequences")
    if not name.replace("_", "").replace("-", "").isalnum() or name in (TOKENIZER_MODEL, SCORER_MODEL, STREAM_MODEL):
        raise ValueError(f"invalid ensemble name {name!r}")
    contract = read_bundle(bundle)
    contract.verify()
    kind = contract.guard.kind
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
    (tok_dir / "config.pbtxt").write_text(tokenizer_config(max_batch, instances, kind=kind))
    template = resources.files("siren_serving") / "triton_models"
    (tok_dir / "1" / "model.py").write_text((template / "tokenizer_model.py").read_text(encoding="utf-8"))
    renders = [contract.guard.chat_template] if kind == "trajectory" else []
    for rel in (MANIFEST_NAME, contract.tokenizer_path, *renders):
        _copy(bundle / rel, tok_dir / "1" / "bundle" / rel)

    sc_dir = output / SCORER_MODEL
    (sc_dir / "1").mkdir(parents=True)
    (sc_dir / "config.pbtxt").write_text(scorer_config(scorer, max_batch, instances, instance_kind=instance_kind))
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

    if streaming:
        st_dir = output / STREAM_MODEL
        (st_dir / "1").mkdir(parents=True)
        where = "gpu" if instance_kind == "gpu" else "cpu"
        (st_dir / "config.pbtxt").write_text(stream_config(max_batch, instances, max_sequences, idle_seconds,
                                                           instance_kind=where, kind=kind))
        (st_dir / "1" / "model.py").write_text((template / "stream_model.py").read_text(encoding="utf-8"))
        for rel in [MANIFEST_NAME] + list(contract.files):
            _copy(bundle / rel, st_dir / "1" / "bundle" / rel)

    ens_dir = output / name
    (ens_dir / "1").mkdir(parents=True)
    (ens_dir / "config.pbtxt").write_text(ensemble_config(name, scorer, max_batch, kind=kind))
    readme = _REPO_README.format(name=name, scorer=scorer, bundle=bundle)
    (output / "README.md").write_text(readme + (_RUNS_README if kind == "trajectory" else "")
                                      + (_STREAM_README if streaming else ""))
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

_RUNS_README = """
## An agent-run guard (Agent-SIREN)

This bundle scores agent runs: send `MESSAGES` (TYPE_STRING, dims [1]: the run's OpenAI chat
rows as one JSON string) and optionally `TOOLS` (the tool schemas, JSON) instead of `TEXT`.
`siren_tokenizer` renders the backbone's chat template and tokenizes exactly as
`siren_runtime.AgentSirenGuard` does. With `siren_stream`, each request of a sequence carries
the run's new messages (`MESSAGES`, a JSON list; `TOOLS` with the first) and `SCORE` is the
verdict of the whole run so far, running only the new turns' tokens. The models' Python
environment needs jinja2 (siren-deploy's `agent` extra) to render the template.
"""

_STREAM_README = """
## Streaming: `siren_stream`

A sequence-batched model: send the text of one stream piece by piece as requests of one
sequence (`sequence_id` = your stream id, `sequence_start=True` on the first piece,
`sequence_end=True` on the last). Input `DELTA` (TYPE_STRING, dims [1]) is the new text;
output `SCORE` is the score of the whole text so far, equal to scoring the prefix at once,
computed incrementally from the stream's KV cache. Concurrent sequences are stepped together.
A sequence idle longer than `max_sequence_idle_microseconds` is dropped (state freed).
"""

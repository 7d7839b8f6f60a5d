"""The typed bundle contract: every malformed manifest field is a BundleError naming the
field (never AttributeError/KeyError/OverflowError/RecursionError or an ORT error), and old
bundles load or are refused by version."""
from __future__ import annotations

import copy
import json
import math
import shutil
import warnings

import pytest

from siren_runtime import BundleError, SirenGuard
from siren_runtime.bundle import MANIFEST_NAME, read_bundle

ALLOWED = (BundleError, FileNotFoundError)


@pytest.fixture(scope="module")
def pristine(all_layers, tmp_path_factory):
    dst = tmp_path_factory.mktemp("contract") / "bundle"
    shutil.copytree(all_layers.bundle, dst)
    return dst, json.loads((dst / MANIFEST_NAME).read_text())


def _write(bundle, manifest):
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest) if not isinstance(manifest, str) else manifest)


def _set(manifest, path, value):
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


_DELETE = object()
BAD = [
    (("files", "model.onnx.data"), "abc"), (("files", "model.onnx.data"), None),
    (("files", "model.onnx.data", "sha256"), 5), (("files", "model.onnx.data", "bytes"), -1),
    (("files",), {}), (("files",), []), (("files", "step.onnx"), _DELETE), (("files", "tokenizer.json"), _DELETE),
    (("model", "path"), _DELETE), (("model", "path"), "."), (("model", "path"), "step.onnx"),
    (("model", "path"), None), (("model", "external_data"), "nope.data"), (("model", "dtype"), "int3"),
    (("inference", "max_length"), _DELETE), (("inference", "max_length"), -1), (("inference", "max_length"), 0),
    (("inference", "max_length"), 10 ** 30), (("inference", "max_length"), "64"), (("inference", "max_length"), 6.5),
    (("inference", "pad_token_id"), 10 ** 20), (("inference", "pad_token_id"), -3),
    (("inference", "default_threshold"), math.nan), (("inference", "default_threshold"), 5),
    (("inference", "default_threshold"), 10 ** 400), (("inference", "default_threshold"), True),
    (("tokenizer", "path"), "model.onnx"), (("tokenizer", "path"), "."), (("tokenizer", "path"), "../x.json"),
    (("tokenizer",), "tokenizer.json"), (("streaming", "path"), _DELETE), (("streaming", "path"), "model.onnx"),
    (("streaming", "kv_layers"), 3), (("streaming", "kv_heads"), 0), (("streaming", "feature_dim"), 7),
    (("streaming", "head_dim"), "16"), (("streaming", "kv_dtype"), "fp8"),
    (("streaming",), 5), (("engines",), {"a": 1}), (("engines",), [{"path": "engines/x.plan", "profiles": []}]),
    (("engines",), [7]), (("inference",), None), (("format_version",), 99), (("format_version",), True),
    (("format",), "other"),
]


@pytest.mark.parametrize("path,value", BAD, ids=[f"{'.'.join(p)}={str(v)[:12]}" for p, v in BAD])
def test_malformed_field_is_a_bundle_error(pristine, path, value):
    bundle, manifest = pristine
    broken = copy.deepcopy(manifest)
    _set(broken, path, value)
    _write(bundle, broken)
    try:
        with pytest.raises(ALLOWED) as info:
            SirenGuard.from_pretrained(bundle, device="cpu")
        if isinstance(info.value, BundleError) and path[0] not in ("format", "format_version", "files"):
            assert path[0] in str(info.value) or path[-1] in str(info.value), str(info.value)
    finally:
        _write(bundle, manifest)


def test_random_field_fuzz(pristine):
    """Every leaf of the manifest replaced by values of the wrong kind: the guard either
    loads and scores, or refuses with a BundleError / FileNotFoundError."""
    import random
    bundle, manifest = pristine
    leaves = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list) and path[-1] not in ("inputs", "outputs", "selected_layers"):
            for i, v in enumerate(node):
                walk(v, path + (i,))
        else:
            leaves.append(path)
    walk(manifest, ())
    rng = random.Random(3)
    values = [None, -1, 0, 10 ** 30, "", "x", [], {}, math.inf, True, "model.onnx", "step.onnx"]
    for path in rng.sample(leaves, min(60, len(leaves))):
        broken = copy.deepcopy(manifest)
        _set(broken, path, rng.choice(values))
        _write(bundle, broken)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_bundle(bundle)
                if path[0] in _RUNTIME_SECTIONS:   # a field the runtime reads: load and score too
                    guard = SirenGuard.from_pretrained(bundle, device="cpu")
                    assert 0.0 <= guard.score("hello").score <= 1.0
        except ALLOWED:
            pass
        finally:
            _write(bundle, manifest)


#: top-level manifest sections the runtime reads (the rest is provenance: source, tools, parity)
_RUNTIME_SECTIONS = {"format", "format_version", "model", "tokenizer", "streaming", "inference", "files", "engines"}


def test_deeply_nested_manifest(pristine):
    bundle, manifest = pristine
    _write(bundle, '{"format": "siren-bundle", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    try:
        with pytest.raises(BundleError):
            SirenGuard.from_pretrained(bundle, device="cpu")
    finally:
        _write(bundle, manifest)


def test_format_1_bundle_loads_without_incremental_streaming(pristine):
    bundle, manifest = pristine
    old = copy.deepcopy(manifest)
    old["format_version"] = 1
    _write(bundle, old)
    try:
        with pytest.warns(RuntimeWarning, match="bundle format 1"):
            guard = SirenGuard.from_pretrained(bundle, device="cpu")
        assert not guard.incremental_streaming
        assert abs(guard.score_streaming("hello there").score - guard.score("hello there").score) <= 1e-6
    finally:
        _write(bundle, manifest)


def test_contract_round_trip(pristine):
    bundle, _ = pristine
    contract = read_bundle(bundle)
    assert contract.model.io.inputs == ("input_ids", "attention_mask")
    assert contract.streaming.graph.io.outputs == ("score", "new_kv", "sums")
    assert set(contract.model.files()) | {contract.tokenizer_path} | set(contract.streaming.graph.files()) \
        <= set(contract.files)


def test_graph_axes_are_declared_once_and_size_every_tensor(pristine):
    """SCORE_IO / STEP_IO carry each tensor's axes: the runners' batch tensors, the engine
    profiles and the exporter's dynamic shapes are read from them, and what they give agrees
    with the exported graph's own declared shapes."""
    import onnx
    from siren_runtime.bundle import DYNAMIC_AXES, SCORE_IO, STEP_IO
    bundle, _ = pristine
    contract = read_bundle(bundle)
    spec = contract.streaming
    for io in (SCORE_IO, STEP_IO):
        assert set(io.axes) == set(io.inputs) | set(io.outputs)
    sizes = spec.sizes(batch=3, past=5, new=2)
    assert STEP_IO.shape("past_kv", **sizes) == (spec.kv_layers, 2, 3, spec.kv_heads, 5, spec.head_dim)
    assert STEP_IO.shape("sums", **sizes) == (3, 2, spec.feature_dim)
    assert STEP_IO.dynamic("past_kv") == {2: "batch", 4: "past"}
    with pytest.raises(KeyError, match="past"):
        STEP_IO.shape("past_kv", batch=1, kv_layers=1, kv_heads=1, head_dim=1)
    for path, io, dims in ((contract.model.path, SCORE_IO, {}), (spec.graph.path, STEP_IO, sizes)):
        graph = onnx.load(str(bundle / path), load_external_data=False).graph
        for value in list(graph.input) + list(graph.output):
            declared = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            axes = io.axes[value.name]
            assert len(declared) == len(axes), value.name
            for have, axis in zip(declared, axes):
                if axis in DYNAMIC_AXES:
                    assert isinstance(have, str), (value.name, axis, have)       # dynamic in the graph
                elif isinstance(axis, int):
                    assert have == axis, (value.name, axis, have)
                else:
                    assert have == dims[axis], (value.name, axis, have)
    from siren_engines.profiles import step_profiles
    [profile] = step_profiles(64, spec.kv_layers, spec.kv_heads, spec.head_dim, spec.feature_dim, max_batch=8)
    assert profile.shapes["past_kv"]["max"] == list(STEP_IO.shape("past_kv", **spec.sizes(batch=8, past=64)))
    assert profile.shapes["past_kv"]["min"][4] == 1 and profile.shapes["input_ids"]["max"] == [8, 64]


def test_section_writers_are_the_readers_inverse(pristine, tmp_path):
    """set_model / set_streaming write a section from its typed view: read, write, read gives
    the same view, and what a writer changes is what the reader then sees; record_engine adds
    an engine (its file recorded) only when the section's reader accepts it."""
    import dataclasses
    from siren_runtime.bundle import EngineRecord, record_engine, set_model, set_streaming, write_manifest
    bundle = tmp_path / "bundle"
    shutil.copytree(pristine[0], bundle)
    contract = read_bundle(bundle)
    manifest = contract.raw()
    set_model(manifest, contract.model)
    set_streaming(manifest, contract.streaming)
    assert manifest == contract.raw()                        # the inverse: nothing else moves
    step = dataclasses.replace(contract.streaming.graph, tensor_dtypes={
        **contract.streaming.graph.tensor_dtypes, "past_kv": "float16"})
    set_model(manifest, dataclasses.replace(contract.model, batch_invariant=False), opset=99)
    set_streaming(manifest, dataclasses.replace(contract.streaming, kv_dtype="fp16", graph=step))
    write_manifest(bundle, manifest)
    again = read_bundle(bundle)
    assert again.model.batch_invariant is False and again.raw()["model"]["opset"] == 99
    assert again.streaming.kv_dtype == "fp16" and again.streaming.graph.tensor_dtypes["past_kv"] == "float16"
    assert again.streaming.graph.files() == contract.streaming.graph.files() and again.model.dtype == contract.model.dtype
    (bundle / "engines").mkdir()
    (bundle / "engines" / "model-x.plan").write_bytes(b"plan")
    before = (bundle / MANIFEST_NAME).read_bytes()
    with pytest.raises(BundleError, match="graph"):
        record_engine(bundle, EngineRecord(graph="neither", path="engines/model-x.plan",
                                           record={"profiles": []}))
    assert (bundle / MANIFEST_NAME).read_bytes() == before            # refused: nothing written
    record_engine(bundle, EngineRecord(graph="model", path="engines/model-x.plan", record={"profiles": []}))
    [engine] = read_bundle(bundle).engines
    assert engine.graph == "model" and read_bundle(bundle).files["engines/model-x.plan"].bytes == 4

"""The bundle contract: `siren_bundle.json` as small typed objects, read and written here only.

Every stage talks through this module: the export writes the manifest with
:func:`write_manifest`, `siren build` adds engine records, the runtime opens a bundle with
:func:`read_bundle`. The reader validates every field the runtime uses and raises
:class:`BundleError` naming the field, so a malformed manifest is refused before any
session exists. Graph tensor names and axes are defined once, in :data:`SCORE_IO` and
:data:`STEP_IO` (dynamic axes and their bounds: :data:`DYNAMIC_AXES`), for the exporter,
the runners, the parity checks and the engine profiles. The files themselves (hashing,
staging, publishing) are :mod:`siren_runtime.bundle_files`.

Format history (the version moves only when the files on disk change):
  1: step graph with one shared past length per batch (inputs input_ids, past_kv,
     past_sums, past_count). Still loads; its step graph is not used (no incremental
     streaming) and a warning says to re-export.
  2: batched step graph with per-row past and new lengths (:data:`STEP_IO`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import os
import posixpath
import re
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from .errors import BundleError
from . import private_copy
# the files of a bundle (hashing, safe paths, staging and publishing) live in bundle_files; the
# names stages use are re-exported here, beside the manifest they describe
from .bundle_files import (Staging, describe_file, is_staging_name, lock_if_idle, publish,  # noqa: F401
                           read_into_memory, remove_stale_staging, safe_relative_path, sha256_file)

MANIFEST_NAME = "siren_bundle.json"
FORMAT_NAME = "siren-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_LENGTH_LIMIT = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DTYPES = ("fp32", "fp16", "bf16")
#: files at least this large say when they are read and hashed (an 8 GB weights file takes seconds)
PROGRESS_MIN_BYTES = 256 * 1024 * 1024

log = logging.getLogger("siren_runtime.bundle")


#: the axes a graph takes at any size, and the range each may take: the exporter marks them
#: dynamic with these bounds, engine profiles choose ranges inside them, runners size them
DYNAMIC_AXES = {"batch": (1, 4096), "sequence": (1, MAX_LENGTH_LIMIT), "new": (1, MAX_LENGTH_LIMIT),
                "past": (0, MAX_LENGTH_LIMIT)}


@dataclass(frozen=True)
class GraphIO:
    """Tensor names of one graph, in the graph's input/output order, and each tensor's axes:
    a dynamic axis (:data:`DYNAMIC_AXES`), a model dimension the bundle sizes ("kv_layers",
    "kv_heads", "head_dim", "features") or a fixed size."""
    inputs: tuple
    outputs: tuple
    axes: dict = field(default_factory=dict, compare=False, hash=False)

    def shape(self, tensor: str, **sizes) -> tuple:
        """`tensor`'s shape, each named axis sized from `sizes`."""
        try:
            return tuple(a if isinstance(a, int) else int(sizes[a]) for a in self.axes[tensor])
        except KeyError as e:
            raise KeyError(f"{tensor}: no size given for axis {e.args[0]!r}") from None

    def dynamic(self, tensor: str) -> dict:
        """{axis index: axis name} of `tensor`'s dynamic axes."""
        return {i: a for i, a in enumerate(self.axes[tensor]) if a in DYNAMIC_AXES}


#: full scoring graph: right-padded ids + mask -> score (and the two logits)
SCORE_IO = GraphIO(inputs=("input_ids", "attention_mask"), outputs=("score", "logits"), axes={
    "input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence"),
    "score": ("batch",), "logits": ("batch", 2)})
#: batched streaming step graph: input_ids int64 (right-padded), new_lengths / past_lengths
#: int64, past_kv (each row's past right-padded to the longest), past_sums float32 -> score
#: float32, new_kv, sums float32 (the running sums after each new token)
STEP_IO = GraphIO(inputs=("input_ids", "new_lengths", "past_lengths", "past_kv", "past_sums"),
                  outputs=("score", "new_kv", "sums"), axes={
    "input_ids": ("batch", "new"), "new_lengths": ("batch",), "past_lengths": ("batch",),
    "past_kv": ("kv_layers", 2, "batch", "kv_heads", "past", "head_dim"), "past_sums": ("batch", "features"),
    "score": ("batch",), "new_kv": ("kv_layers", 2, "batch", "kv_heads", "new", "head_dim"),
    "sums": ("batch", "new", "features")})
#: the shortest past_kv a runner hands the step graph: TensorRT may clamp an empty profile
#: minimum to 1, so a batch of first feeds carries one zeroed position that past_lengths (0) masks
STEP_MIN_PAST = 1


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest atomically, stamping the format fields (the one writer)."""
    manifest = dict(manifest)
    manifest["format"] = FORMAT_NAME
    manifest["format_version"] = FORMAT_VERSION
    path = Path(bundle_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- typed sections --------------------------------------------------------------------
@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle and the weights file it reads."""
    path: str
    external_data: Optional[str]
    dtype: str
    io: GraphIO
    #: the exporter's word that a text's score does not depend on its batch companions on the
    #: CPU (running-sum pooling, a two-row head; bundles from before it and int8 ones: False)
    batch_invariant: bool = False
    #: each input's and output's element type as the manifest declares it ("int64", "float32",
    #: "float16", "bfloat16"); empty for bundles that do not declare them
    tensor_dtypes: dict = field(default_factory=dict)

    def files(self) -> tuple:
        return tuple(f for f in (self.path, self.external_data) if f)

    def external_name(self) -> Optional[str]:
        """The weights file's name as the graph refers to it (relative to the graph's folder)."""
        if not self.external_data:
            return None
        return posixpath.relpath(self.external_data, posixpath.dirname(self.path) or ".")


@dataclass(frozen=True)
class StreamingSpec:
    """The step graph and the shape of one stream's KV cache."""
    graph: GraphSpec
    kv_layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str
    feature_dim: int

    def sizes(self, **dynamic) -> dict:
        """The model dimensions of STEP_IO's axes (and `dynamic` ones): what STEP_IO.shape takes."""
        return {"kv_layers": self.kv_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "features": self.feature_dim, **dynamic}


@dataclass(frozen=True)
class PrefixHeadSpec:
    """The MLP head's weights on their own (an .npz of w0, b0, w1, b1, ...: Linear, ReLU
    between), so the score of every token prefix can be read off the step graph's running
    sums in one pass (see siren_runtime.prefixes)."""
    path: str
    layers: int
    feature_dim: int


@dataclass(frozen=True)
class SignedTwinSpec:
    """An int8 bundle's u8 x s8 twins (quantize/signed_twin.py): per graph, a graph that reads
    the same weights file as int8 once `flip`'s byte ranges have their top bit flipped."""
    graphs: dict            # graph path -> twin graph path
    weights: str            # the weights file the ranges are in
    flip: tuple             # ((offset, length), ...), sorted, disjoint


#: guard kinds: a content guard scores text, a trajectory guard an agent's trajectory
GUARD_KINDS = ("content", "trajectory")


@dataclass(frozen=True)
class GuardSpec:
    """Which guard the bundle is and what its graph reads (the manifest's `guard` section;
    bundles from before it are content guards with mean pooling).

    pooling: "mean" (content: masked mean of selected neurons over the tokens, into an MLP)
    or "last" (trajectory: the last real token's state into a linear readout); block: the
    decoder blocks the state is read after (trajectory); norm: whether the final norm is
    applied to it; chat_template / special_tokens: what a trajectory is rendered with."""
    kind: str = "content"
    pooling: str = "mean"
    block: Optional[int] = None
    norm: Optional[bool] = None
    chat_template: Optional[str] = None
    special_tokens: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class InferenceSpec:
    max_length: int
    default_threshold: float
    pad_token_id: int


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built by `siren build` (its raw record keeps the build details)."""
    graph: str
    path: str
    record: dict = field(compare=False, repr=False)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: typed views of what the stages use, plus the raw manifest."""
    directory: Path
    format_version: int
    inference: InferenceSpec
    model: GraphSpec
    tokenizer_path: str
    streaming: Optional[StreamingSpec]
    files: dict
    engines: tuple
    manifest: dict = field(compare=False, repr=False)
    #: the head alone, for prefix scores (bundles exported before it have none)
    prefix_head: Optional[PrefixHeadSpec] = None
    #: the oldest release of a backend that runs the graphs ({"onnxruntime": (1, 19)}): the ops
    #: an int8 bundle uses load, or fail only at the first run, on older ones
    requires: dict = field(default_factory=dict, compare=False)
    #: int8 dynamic bundles: the u8 x s8 twins a CPU with exact u8 x s8 dot products loads
    signed_twin: Optional[SignedTwinSpec] = field(default=None, compare=False)
    #: hash the files runners load (False: trusted paths, see trusting())
    check_files: bool = field(default=True, compare=False)
    #: the guard's kind and readout (content guards when the manifest predates the section)
    guard: GuardSpec = field(default_factory=GuardSpec, compare=False)
    _loaded: "weakref.WeakValueDictionary" = field(default_factory=lambda: weakref.WeakValueDictionary(),
                                                   compare=False, repr=False)

    def path(self, rel: str) -> Path:
        return safe_relative_path(self.directory, rel)

    def engines_for(self, graph: str) -> list:
        return [e for e in self.engines if e.graph == graph]

    def verify(self, only=None, contents: bool = True) -> None:
        """Check that every listed file exists with its recorded size and (with `contents`)
        sha256. The runtime itself checks sizes here and hashes each file it loads as it
        reads it (:meth:`read_verified`); stages that hand paths to other tools hash here."""
        for rel, record in self.files.items():
            if only is not None and rel not in only:
                continue
            path = self.path(rel)
            if not path.is_file():
                raise FileNotFoundError(f"{self.directory}: bundle file {rel} is missing")
            size = path.stat().st_size
            if size != record.bytes:
                raise BundleError(f"{path}: size {size} differs from the manifest's "
                                  f"{record.bytes} (truncated or altered file)")
            if contents and sha256_file(path) != record.sha256:
                raise BundleError(f"{path}: sha256 does not match the manifest (altered or corrupted file)")

    def without_engines(self) -> "Bundle":
        """This bundle with its TensorRT engines left out (a Hub download that did not fetch
        them): the engine records and their files leave the typed view together."""
        engine_files = {e.path for e in self.engines}
        return replace(self, engines=(), files={k: v for k, v in self.files.items() if k not in engine_files})

    def trusting(self) -> "Bundle":
        """This bundle with hashing of the files it loads switched off (``verify=False``:
        trusted, read-only paths only). The bytes are still read once and owned in memory."""
        return replace(self, check_files=False)

    def read_verified(self, rel: str, flip: tuple = ()):
        """A listed file's contents as a read-only uint8 array, read once and hashed while
        read: what is checked is exactly what is used, and a file changed or truncated later
        cannot reach a loaded guard. Arrays are shared while alive (the weights file read by
        both graphs is read once). Files of MAP_MIN_BYTES or more are mapped from a private
        copy (:mod:`siren_runtime.private_copy`): only the pages a session reads are resident.

        flip: ((offset, length), ...) whose bytes get their top bit flipped in this process's
        own copy, once hashed (an int8 bundle's weight codes read as u8 x s8: see
        SignedTwinSpec); such a copy is shared under its own key."""
        key = rel + ("|signed" if flip else "")
        cached = self._loaded.get(key)
        if cached is not None:
            return cached
        record = self.files.get(rel)
        if record is None:
            raise BundleError(f"{self.directory}: {rel} is not listed in the manifest's files")
        path = self.path(rel)
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory}: bundle file {rel} is missing")
        digest = hashlib.sha256() if self.check_files else None
        started = time.perf_counter()
        if record.bytes >= PROGRESS_MIN_BYTES:
            log.info("reading%s %s (%.2f GB) ...", " and hashing" if digest else "", rel, record.bytes / 1e9)
        data, recoded = None, False
        if record.bytes >= private_copy.MAP_MIN_BYTES:
            copy_digest = hashlib.sha256() if digest is not None else None
            try:
                data = private_copy.hashed_copy(path, record.bytes, copy_digest, flip=flip)
                if data is not None:
                    digest, recoded = copy_digest, True
            except ValueError:
                raise BundleError(f"{path}: size differs from the manifest's {record.bytes} bytes (truncated or "
                                  "altered file)") from None
        if data is None:
            data = read_into_memory(path, record.bytes, digest)
        if digest is not None and digest.hexdigest() != record.sha256:
            raise BundleError(f"{path}: sha256 does not match the manifest (altered or corrupted file)")
        if flip and not recoded:                # after the check: what was hashed is the file
            private_copy.flip_top_bits(data, flip)
        if data.flags.writeable:
            data.flags.writeable = False
        if record.bytes >= PROGRESS_MIN_BYTES:
            seconds = time.perf_counter() - started
            log.info("%s: %.1f s (%.2f GB/s)%s", rel, seconds, record.bytes / 1e9 / max(seconds, 1e-9),
                     ", sha256 matches the manifest" if digest else "")
        self._loaded[key] = data
        return data

    def raw(self) -> dict:
        """A deep copy of the manifest, for a stage that adds to it and writes it back."""
        return copy.deepcopy(self.manifest)


# -- the reader ------------------------------------------------------------------------
class _Fields:
    """Typed field access that names the field in every error."""

    def __init__(self, source: Path):
        self.source = source

    def fail(self, where: str, what: str):
        raise BundleError(f"{self.source}: manifest field {where} {what}")

    def section(self, parent: dict, key: str, where: str = "") -> dict:
        value = parent.get(key)
        if not isinstance(value, dict):
            self.fail(where + key, "is missing or not an object")
        return value

    def integer(self, parent: dict, key: str, where: str, low: int, high: int) -> int:
        value = parent.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where + key, f"must be an integer, got {_short(value)}")
        if not low <= value <= high:
            self.fail(where + key, f"must be in [{low}, {high}], got {_short(value)}")
        return value

    def number(self, parent: dict, key: str, where: str, low: float, high: float) -> float:
        value = parent.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where + key, f"must be a number, got {_short(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isnan(number) or not low <= number <= high:
            self.fail(where + key, f"must be in [{low}, {high}], got {_short(value)}")
        return number

    def text(self, parent: dict, key: str, where: str, optional: bool = False) -> Optional[str]:
        value = parent.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            self.fail(where + key, f"must be a non-empty string, got {_short(value)}")
        return value

    def choice(self, parent: dict, key: str, where: str, choices: tuple) -> str:
        value = parent.get(key)
        if value not in choices:
            self.fail(where + key, f"must be one of {', '.join(choices)}, got {_short(value)}")
        return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: manifest is not valid JSON ({e})") from None
    except RecursionError:
        raise BundleError(f"{path}: manifest is nested too deeply to be a bundle manifest") from None


def read_bundle(bundle_dir) -> Bundle:
    """Open and validate a bundle's manifest (no file hashing: see :meth:`Bundle.verify`)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.exists():
        raise FileNotFoundError(f"bundle not found: {bundle_dir} does not exist")
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle directory (it is a file)")
    if is_staging_name(bundle_dir.resolve().name):
        fd = lock_if_idle(bundle_dir)
        if fd is not None:          # no run is writing it: an interrupted export or quantize left it
            os.close(fd)
            raise BundleError(f"{bundle_dir} is an unfinished bundle left by an interrupted `siren export` or "
                              "`siren quantize`, not a bundle (the next run for that output removes it)")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{bundle_dir} is not a SIREN bundle: {MANIFEST_NAME} is missing "
            "(create one with `siren export`)")
    manifest = _load_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise BundleError(
            f"{path}: bundle format version {_short(version)} is not supported by this runtime "
            f"(reads {', '.join(map(str, READABLE_VERSIONS))}); re-export the bundle with a matching `siren`")
    f = _Fields(path)
    for name in ("backbone", "siren", "source"):
        if name in manifest and not isinstance(manifest[name], dict):
            f.fail(name, "is not an object")
    files = _read_files(f, bundle_dir, manifest)

    inference = f.section(manifest, "inference")
    vocab = _vocab_size(manifest)
    spec = InferenceSpec(
        max_length=f.integer(inference, "max_length", "inference.", 1, MAX_LENGTH_LIMIT),
        default_threshold=f.number(inference, "default_threshold", "inference.", 0.0, 1.0),
        pad_token_id=f.integer(inference, "pad_token_id", "inference.", 0, vocab - 1))
    model = _read_graph(f, bundle_dir, f.section(manifest, "model"), "model.", SCORE_IO, files)
    tokenizer = f.text(f.section(manifest, "tokenizer"), "path", "tokenizer.")
    _listed(f, bundle_dir, tokenizer, "tokenizer.path", files)
    if tokenizer in model.files():
        f.fail("tokenizer.path", f"points at the model graph's file {tokenizer!r}")

    streaming = None
    if manifest.get("streaming") is not None:
        streaming = _read_streaming(f, bundle_dir, manifest, version, files, model)
    engines = _read_engines(f, bundle_dir, manifest, files)
    prefix_head = _read_prefix_head(f, bundle_dir, manifest, files, model, streaming, tokenizer)
    guard = _read_guard(f, bundle_dir, manifest, files, model, tokenizer)
    if guard.kind == "trajectory" and prefix_head is not None:
        f.fail("guard.kind", "is 'trajectory', but the manifest has a content guard's prefix head")
    if guard.kind == "trajectory" and streaming is not None and streaming.feature_dim != 1:
        # a trajectory step graph carries one value per token, the readout's logit
        f.fail("streaming.feature_dim", f"is {streaming.feature_dim}; a trajectory guard's step graph has 1 "
                                        "(the readout's logit per token)")
    return Bundle(directory=bundle_dir, format_version=version, inference=spec, model=model,
                  tokenizer_path=tokenizer, streaming=streaming, files=files, engines=engines,
                  manifest=manifest, requires=_read_requires(f, manifest), prefix_head=prefix_head,
                  signed_twin=_read_signed_twin(f, bundle_dir, manifest, files, model, streaming), guard=guard)


def _read_guard(f, bundle_dir: Path, manifest: dict, files: dict, model: GraphSpec, tokenizer: str) -> GuardSpec:
    section = manifest.get("guard")
    if section is None:
        return GuardSpec()
    if not isinstance(section, dict):
        f.fail("guard", "is not an object")
    kind = f.choice(section, "kind", "guard.", GUARD_KINDS)
    readout = f.section(section, "readout", "guard.")
    if kind == "content":
        f.choice(readout, "pooling", "guard.readout.", ("mean",))
        return GuardSpec()
    f.choice(readout, "pooling", "guard.readout.", ("last",))
    block = f.integer(readout, "block", "guard.readout.", 1, 4096)
    norm = readout.get("norm")
    if norm is not False:
        f.fail("guard.readout.norm", f"must be false (the state is read before the final norm), got {_short(norm)}")
    render = f.section(section, "render", "guard.")
    f.choice(render, "tools", "guard.render.", ("rich",))
    f.choice(render, "truncation", "guard.render.", ("head_tail",))
    template = f.section(section, "chat_template", "guard.")
    path = f.text(template, "path", "guard.chat_template.")
    _listed(f, bundle_dir, path, "guard.chat_template.path", files)
    if path in set(model.files()) | {tokenizer}:
        f.fail("guard.chat_template.path", f"points at another bundle file {path!r}")
    special = template.get("special_tokens", {})
    if not isinstance(special, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in special.items()):
        f.fail("guard.chat_template.special_tokens", "must map token names to strings")
    return GuardSpec(kind=kind, pooling="last", block=block, norm=False, chat_template=path, special_tokens=special)


def _read_signed_twin(f, bundle_dir: Path, manifest: dict, files: dict, model: GraphSpec,
                      streaming: Optional[StreamingSpec]) -> Optional[SignedTwinSpec]:
    quantization = manifest.get("quantization")
    section = quantization.get("signed_twin") if isinstance(quantization, dict) else None
    if section is None:
        return None
    where = "quantization.signed_twin."
    if not isinstance(section, dict) or not isinstance(section.get("graphs"), dict):
        f.fail("quantization.signed_twin", "is not an object with `graphs`")
    weights = f.text(section, "weights", where)
    _listed(f, bundle_dir, weights, where + "weights", files)
    ours = {model.path: model} | ({streaming.graph.path: streaming.graph} if streaming else {})
    graphs = {}
    for graph, twin in section["graphs"].items():
        if graph not in ours or ours[graph].external_data != weights:
            f.fail(where + "graphs", f"names {_short(graph)}, not a graph of this bundle that reads {weights!r}")
        if not isinstance(twin, str):
            f.fail(where + "graphs", f"maps {graph!r} to {_short(twin)}")
        _listed(f, bundle_dir, twin, where + "graphs", files)
        graphs[graph] = twin
    raw, size, end, flip = section.get("flip"), files[weights].bytes, 0, []
    if not isinstance(raw, list):
        f.fail(where + "flip", "is not a list of [offset, length]")
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                  for v in item)
                or item[0] < end or item[1] < 1 or item[0] + item[1] > size):
            f.fail(where + "flip", f"has {_short(item)}: ranges must be sorted, disjoint and inside {weights}")
        flip.append((item[0], item[1]))
        end = item[0] + item[1]
    return SignedTwinSpec(graphs=graphs, weights=weights, flip=tuple(flip))


def _read_prefix_head(f, bundle_dir: Path, manifest: dict, files: dict, model: GraphSpec,
                      streaming: Optional[StreamingSpec], tokenizer: str) -> Optional[PrefixHeadSpec]:
    section = manifest.get("prefix_head")
    if section is None:
        return None
    if not isinstance(section, dict):
        f.fail("prefix_head", "is not an object")
    path = f.text(section, "path", "prefix_head.")
    _listed(f, bundle_dir, path, "prefix_head.path", files)
    taken = set(model.files()) | {tokenizer} | (set(streaming.graph.files()) if streaming else set())
    if path in taken:
        f.fail("prefix_head.path", f"points at another bundle file {path!r}")
    head = PrefixHeadSpec(path=path, layers=f.integer(section, "layers", "prefix_head.", 1, 64),
                          feature_dim=f.integer(section, "feature_dim", "prefix_head.", 1, 1 << 24))
    if streaming is not None and head.feature_dim != streaming.feature_dim:
        f.fail("prefix_head.feature_dim", f"is {head.feature_dim}, streaming.feature_dim is {streaming.feature_dim}")
    return head


_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")


def parse_version(text: str) -> Optional[tuple]:
    """(major, minor, patch) of "1.19" / "1.22.1" / "1.23.0.dev2025"; None if it is not one."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _read_requires(f, manifest: dict) -> dict:
    raw = manifest.get("requires")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        f.fail("requires", "must be an object of backend -> minimum version")
    out = {}
    for name, version in raw.items():
        if not isinstance(version, str) or not _VERSION.match(version):
            f.fail(f"requires.{name}", f"must be a version like \"1.19\", got {_short(version)}")
        out[name] = parse_version(version)
    return out


def _vocab_size(manifest: dict) -> int:
    vocab = (manifest.get("backbone") or {}).get("vocab_size")
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and 0 < vocab < 1 << 31 else 1 << 31


def _read_files(f: _Fields, bundle_dir: Path, manifest: dict) -> dict:
    files = f.section(manifest, "files")
    out = {}
    for rel, meta in files.items():
        safe_relative_path(bundle_dir, rel)
        if not isinstance(meta, dict):
            f.fail(f"files[{rel!r}]", f"must be an object with sha256 and bytes, got {_short(meta)}")
        sha = meta.get("sha256")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            f.fail(f"files[{rel!r}].sha256", f"must be 64 lowercase hex digits, got {_short(sha)}")
        out[rel] = FileRecord(sha256=sha, bytes=f.integer(meta, "bytes", f"files[{rel!r}].", 0, 1 << 50))
    return out


def _listed(f: _Fields, bundle_dir: Path, rel: str, where: str, files: dict) -> None:
    safe_relative_path(bundle_dir, rel)
    if rel not in files:
        f.fail(where, f"names {rel!r}, which is not listed (and checksummed) in `files`")


def _read_graph(f: _Fields, bundle_dir: Path, section: dict, where: str, io: GraphIO, files: dict) -> GraphSpec:
    graph_path = f.text(section, "path", where)
    _listed(f, bundle_dir, graph_path, where + "path", files)
    data = f.text(section, "external_data", where, optional=True)
    if data is not None:
        _listed(f, bundle_dir, data, where + "external_data", files)
        if data == graph_path:
            f.fail(where + "external_data", "is the graph file itself")
    dtype = f.choice(section, "dtype", where, DTYPES) if "dtype" in section else "fp32"
    inputs = section.get("inputs")
    if inputs is not None:
        names = tuple(i.get("name") for i in inputs if isinstance(i, dict)) if isinstance(inputs, list) else None
        if names != io.inputs:
            f.fail(where + "inputs", f"must name {list(io.inputs)}, got {_short(names)}")
    invariant = section.get("batch_invariant", False)
    if not isinstance(invariant, bool):
        f.fail(where + "batch_invariant", f"must be true or false, got {_short(invariant)}")
    declared = [t for key in ("inputs", "outputs") if isinstance(section.get(key), list)
                for t in section[key] if isinstance(t, dict)]
    dtypes = {t["name"]: t["dtype"] for t in declared
              if isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)}
    return GraphSpec(path=graph_path, external_data=data, dtype=dtype, io=io, batch_invariant=invariant,
                     tensor_dtypes=dtypes)


def _read_streaming(f: _Fields, bundle_dir: Path, manifest: dict, version: int, files: dict,
                    model: GraphSpec) -> Optional[StreamingSpec]:
    section = f.section(manifest, "streaming")
    if version < 2:
        warnings.warn(f"{bundle_dir}: bundle format {version} has a step graph from before batched streaming; "
                      "score_streaming rescores the prefix (re-export with `siren export` to stream incrementally)",
                      RuntimeWarning, stacklevel=3)
        return None
    graph = _read_graph(f, bundle_dir, section, "streaming.", STEP_IO, files)
    weights = section.get("weights")
    if graph.external_data is None and isinstance(weights, dict) and weights.get("shared_bytes"):
        # exports before the step graph named the weights file it shares with the model graph
        graph = replace(graph, external_data=model.external_data)
    if graph.path in model.files():
        f.fail("streaming.path", f"points at the model graph's file {graph.path!r}")
    if graph.path == model.path or graph.path == manifest["tokenizer"].get("path"):
        f.fail("streaming.path", f"points at another bundle file {graph.path!r}")
    return StreamingSpec(
        graph=graph,
        kv_layers=f.integer(section, "kv_layers", "streaming.", 1, 4096),
        kv_heads=f.integer(section, "kv_heads", "streaming.", 1, 4096),
        head_dim=f.integer(section, "head_dim", "streaming.", 1, 65536),
        kv_dtype=f.choice(section, "kv_dtype", "streaming.", DTYPES),
        feature_dim=f.integer(section, "feature_dim", "streaming.", 1, 1 << 24))


# -- the writers: each section as its typed view says, beside the reader of that section --
def _write_graph(section: dict, graph: GraphSpec) -> dict:
    """A graph's section as `graph` says (the inverse of :func:`_read_graph`): the fields the
    reader reads come from `graph`, the section's other recorded fields (opset, shapes, the
    exporter's notes) are kept."""
    out = {**section, "path": graph.path, "external_data": graph.external_data}
    if "dtype" in section or graph.dtype != "fp32":
        out["dtype"] = graph.dtype
    if "batch_invariant" in section or graph.batch_invariant:
        out["batch_invariant"] = graph.batch_invariant
    for key in ("inputs", "outputs"):
        if isinstance(section.get(key), list):
            out[key] = [{**t, "dtype": graph.tensor_dtypes[t["name"]]}
                        if isinstance(t, dict) and t.get("name") in graph.tensor_dtypes else t for t in section[key]]
    return out


def set_model(manifest: dict, graph: GraphSpec, **recorded) -> None:
    """Write the `model` section from `graph` (and `recorded` fields such as the opset)."""
    manifest["model"] = {**_write_graph(manifest.get("model") or {}, graph), **recorded}


def set_streaming(manifest: dict, streaming: StreamingSpec, **recorded) -> None:
    """Write the `streaming` section from `streaming` (and `recorded` fields)."""
    section = _write_graph(manifest.get("streaming") or {}, streaming.graph)
    section.update(kv_layers=streaming.kv_layers, kv_heads=streaming.kv_heads, head_dim=streaming.head_dim,
                   kv_dtype=streaming.kv_dtype, feature_dim=streaming.feature_dim, **recorded)
    manifest["streaming"] = section


def record_engine(bundle_dir, engine: EngineRecord) -> None:
    """Add `engine` to the bundle's `engines` (replacing one at its path) with its file's
    record, written atomically once the section's reader accepts it (else nothing changes)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_bundle(bundle_dir).raw()
    entry = {**engine.record, "graph": engine.graph, "path": engine.path}
    manifest["engines"] = [e for e in manifest.get("engines") or [] if e.get("path") != engine.path] + [entry]
    manifest["files"][engine.path] = describe_file(bundle_dir, engine.path)
    fields = _Fields(bundle_dir / MANIFEST_NAME)
    _read_engines(fields, bundle_dir, manifest, _read_files(fields, bundle_dir, manifest))
    write_manifest(bundle_dir, manifest)


def _read_engines(f: _Fields, bundle_dir: Path, manifest: dict, files: dict) -> tuple:
    entries = manifest.get("engines") or []
    if not isinstance(entries, list):
        f.fail("engines", "must be a list")
    out = []
    for i, entry in enumerate(entries):
        where = f"engines[{i}]."
        if not isinstance(entry, dict):
            f.fail(f"engines[{i}]", "must be an object")
        rel = f.text(entry, "path", where)
        _listed(f, bundle_dir, rel, where + "path", files)
        graph = entry.get("graph", "model")
        if graph not in ("model", "streaming"):
            f.fail(where + "graph", f"must be 'model' or 'streaming', got {_short(graph)}")
        if not isinstance(entry.get("profiles"), list):
            f.fail(where + "profiles", "must be a list")
        out.append(EngineRecord(graph=graph, path=rel, record=entry))
    return tuple(out)


__all__ = ["Bundle", "GuardSpec", "GraphIO", "GraphSpec", "StreamingSpec", "InferenceSpec", "EngineRecord", "FileRecord",
           "SCORE_IO", "STEP_IO", "DYNAMIC_AXES", "set_model", "set_streaming", "record_engine", "MANIFEST_NAME", "FORMAT_NAME", "FORMAT_VERSION", "read_bundle",
           "write_manifest", "publish", "Staging", "remove_stale_staging", "describe_file", "sha256_file", "safe_relative_path"]

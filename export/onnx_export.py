"""Writing the scorer modules as ONNX graphs with external data.

Tensor names and axes of both graphs are the bundle contract's
(``siren_runtime.bundle.SCORE_IO`` / ``STEP_IO``); its dynamic axes are dynamic here, with
the contract's bounds (``DYNAMIC_AXES``).
Weights always go to one external data file per graph: a 4B graph exceeds protobuf's 2 GB.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

from siren_runtime.bundle import DYNAMIC_AXES, SCORE_IO, STEP_IO

OPSET = 18


def export_scorer(module, path: Path, progress=None, example_batch: int = 2, example_seq: int = 8) -> dict:
    """The full graph: padded batch in, score out."""
    import torch

    ids = torch.randint(0, 1000, (example_batch, example_seq), dtype=torch.long)
    mask = torch.ones(example_batch, example_seq, dtype=torch.long)
    mask[-1, example_seq // 2:] = 0
    return _export(module, (ids, mask), SCORE_IO, path, progress)


def export_step(module, path: Path, kv_layers: int, kv_heads: int, head_dim: int, features: int,
                kv_dtype, progress=None) -> dict:
    """The batched streaming step graph: per-row new tokens + past KV/sums in, new KV,
    running sums and score out."""
    import torch

    sizes = {"kv_layers": kv_layers, "kv_heads": kv_heads, "head_dim": head_dim, "features": features,
             "batch": 3, "new": 5, "past": 4}
    ids = torch.randint(0, 1000, STEP_IO.shape("input_ids", **sizes), dtype=torch.long)
    new_lengths = torch.tensor([5, 2, 1], dtype=torch.long)
    past_lengths = torch.tensor([4, 0, 2], dtype=torch.long)
    past_kv = torch.randn(STEP_IO.shape("past_kv", **sizes)).to(kv_dtype)
    sums = torch.randn(STEP_IO.shape("past_sums", **sizes))
    return _export(module, (ids, new_lengths, past_lengths, past_kv, sums), STEP_IO, path, progress)


def dynamic_shapes(graph_io) -> tuple:
    """torch.export's dynamic shapes of `graph_io`'s inputs, from the contract's axes: one Dim per
    dynamic axis name (so every tensor's "batch" is the same), bounded as DYNAMIC_AXES says."""
    from torch.export import Dim
    dims = {name: Dim(name, min=low, max=high) for name, (low, high) in DYNAMIC_AXES.items()}
    return tuple({i: dims[a] for i, a in graph_io.dynamic(name).items()} for name in graph_io.inputs)


def _export(module, inputs, graph_io, path: Path, progress=None) -> dict:
    """Trace, then write graph + `<name>.data` (the exporter streams initializers to the file
    one at a time); the graph is re-read without its weights, so no second copy is made."""
    import onnx
    import torch

    path = Path(path)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=OPSET,
            input_names=list(graph_io.inputs), output_names=list(graph_io.outputs),
            dynamic_shapes=dynamic_shapes(graph_io), optimize=True, verify=False, report=False)
    if progress is not None:
        progress.note(f"traced {path.name}")
    for p in (path, path.parent / (path.name + ".data")):
        if p.exists():
            os.remove(p)
    with warnings.catch_warnings():
        # torch's own deprecation, raised while the exporter walks its modules: not the user's to act on
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)
        program.save(str(path), external_data=True)
        del program
        release_exporter_state()
    if progress is not None:
        progress.note(f"wrote {path.name} and its weights")
    data_name = path.name + ".data"
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False)
    return {
        "opset": OPSET,
        "external_data": data_name if (path.parent / data_name).exists() else None,
        "inputs": [_describe(v) for v in graph.graph.input],
        "outputs": [_describe(v) for v in graph.graph.output],
    }


def release_exporter_state() -> None:
    """Let go of the traced module's weights once its graph is written.

    onnxscript's rewrite rules are module-level objects whose matchers keep their last match
    (nodes -> values -> the exporter's TorchTensor -> the module's parameters), so without
    this the torch weights stay pinned for the process's life and the export's check cannot
    free them before ONNX Runtime loads the graph (fp32 Qwen3-4B would need two copies of
    14.5 GB). Only memory is at stake: if onnxscript's internals change, this does nothing."""
    import gc

    try:
        from onnxscript.rewriter import _basics, _matcher
    except ImportError:
        return
    gc.collect()
    matcher = getattr(_matcher, "PatternMatcher", _matcher.SimplePatternMatcher)
    for obj in gc.get_objects():
        if isinstance(obj, matcher):
            for name in ("_current_node", "_graph", "_tracer"):
                if hasattr(obj, name):
                    setattr(obj, name, None)
            if hasattr(obj, "_match"):
                obj._match = _basics.MatchResult()
    gc.collect()


def _describe(value) -> dict:
    import onnx
    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _external_tensors(model):
    """(tensor proto, location, offset, length) of every initializer stored as external data."""
    from onnx.external_data_helper import uses_external_data
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            yield tensor, info["location"], int(info.get("offset", 0)), int(info["length"])


#: tensors are hashed and copied in pieces of this size: a whole 1.56 GB embedding table read
#: as one bytes object was the top of a Qwen3-4B fp32 export's memory
CHUNK = 64 << 20


def _chunks(f, offset: int, length: int):
    f.seek(offset)
    while length > 0:
        piece = f.read(min(CHUNK, length))
        if not piece:
            raise ValueError(f"{f.name}: a tensor runs past the end of the file")
        length -= len(piece)
        yield piece


def _digest(f, offset: int, length: int) -> str:
    import hashlib
    h = hashlib.sha256()
    for piece in _chunks(f, offset, length):
        h.update(piece)
    return h.hexdigest()


#: the graphs' file names in a bundle (the exporters of both guard kinds write these)
MODEL_FILE = "model.onnx"
STEP_FILE = "step.onnx"


def export_shared_step(module, staging: Path, kv: dict, torch_dtype, model_graph: dict, progress=None) -> dict:
    """The step graph beside the scoring graph, its weights pointed into the scoring graph's
    weights file (share_weights): the manifest's streaming section, but its parity. A graph
    that would read from two weights files is refused (the manifest names one per graph)."""
    import gc
    from siren_runtime.private_copy import trim_heap

    step_graph = export_step(module, staging / STEP_FILE, kv["kv_layers"], kv["kv_heads"], kv["head_dim"],
                             kv["feature_dim"], torch_dtype, progress)
    gc.collect()
    trim_heap()
    sharing = share_weights(staging / MODEL_FILE, staging / STEP_FILE)
    if sharing["shared_bytes"] and sharing["own_bytes"]:
        raise RuntimeError(f"the step graph shares {sharing['shared_bytes']} bytes of weights with {MODEL_FILE} but "
                           f"stores {sharing['own_bytes']} of its own (the two graphs traced the weights differently); "
                           "this is an exporter bug, please report it")
    if not (staging / (STEP_FILE + ".data")).exists():    # every weight is in the model's file
        step_graph["external_data"] = model_graph["external_data"] if sharing["shared_bytes"] else None
    return {"path": STEP_FILE, **kv, **step_graph, "weights": sharing}


def share_weights(primary: Path, secondary: Path) -> dict:
    """Point `secondary`'s initializers at identical tensors already stored in `primary`'s
    external data file, so the streaming graph does not duplicate the backbone on disk.
    Works one piece of one tensor at a time (memory: CHUNK, never a whole tensor).
    Returns byte counts for the manifest/progress."""
    import onnx

    primary, secondary = Path(primary), Path(secondary)
    index: dict[tuple, tuple[str, int, int]] = {}
    model = onnx.load(str(primary), load_external_data=False)
    with open(primary.parent / (primary.name + ".data"), "rb") as data:
        for tensor, location, offset, length in _external_tensors(model):
            index[(tensor.data_type, tuple(tensor.dims), _digest(data, offset, length))] = (location, offset, length)
    del model

    step = onnx.load(str(secondary), load_external_data=False)
    old_data = secondary.parent / (secondary.name + ".data")
    new_name = secondary.name + ".data"
    new_data = secondary.parent / (new_name + ".tmp")
    shared = own = 0
    with open(old_data, "rb") as src, open(new_data, "wb") as dst:
        for tensor, location, offset, length in _external_tensors(step):
            key = (tensor.data_type, tuple(tensor.dims), _digest(src, offset, length))
            if key in index:
                location, offset, length = index[key]
                shared += length
            else:
                start = dst.tell()
                for piece in _chunks(src, offset, length):
                    dst.write(piece)
                location, offset = new_name, start
                own += length
            del tensor.external_data[:]
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
            tensor.data_location = onnx.TensorProto.EXTERNAL
    os.replace(new_data, old_data)
    if own == 0:
        os.remove(old_data)
    onnx.save_model(step, str(secondary))
    onnx.checker.check_model(str(secondary))
    return {"shared_bytes": shared, "own_bytes": own}

"""Writing the scorer modules as ONNX graphs with external data.

Tensor names and shapes of both graphs are the bundle contract's
(``siren_runtime.bundle.SCORE_IO`` / ``STEP_IO``); batch and sequence axes are dynamic.
Weights always go to one external data file per graph: a 4B graph exceeds protobuf's 2 GB.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

from siren_runtime.bundle import SCORE_IO, STEP_IO

OPSET = 18


def export_scorer(module, path: Path, example_batch: int = 2, example_seq: int = 8) -> dict:
    """The full graph: padded batch in, score out."""
    import torch
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=1 << 20)
    ids = torch.randint(0, 1000, (example_batch, example_seq), dtype=torch.long)
    mask = torch.ones(example_batch, example_seq, dtype=torch.long)
    mask[-1, example_seq // 2:] = 0
    return _export(module, (ids, mask), SCORE_IO.inputs, SCORE_IO.outputs,
                   ({0: batch, 1: seq}, {0: batch, 1: seq}), path)


def export_step(module, path: Path, kv_layers: int, kv_heads: int, head_dim: int, features: int,
                kv_dtype) -> dict:
    """The batched streaming step graph: per-row new tokens + past KV/sums in, new KV,
    running sums and score out."""
    import torch
    from torch.export import Dim

    batch, new, past = Dim("batch", min=1, max=4096), Dim("new", min=1, max=1 << 20), Dim("past", min=0, max=1 << 20)
    ids = torch.randint(0, 1000, (3, 5), dtype=torch.long)
    new_lengths = torch.tensor([5, 2, 1], dtype=torch.long)
    past_lengths = torch.tensor([4, 0, 2], dtype=torch.long)
    past_kv = torch.randn(kv_layers, 2, 3, kv_heads, 4, head_dim).to(kv_dtype)
    sums = torch.randn(3, features)
    shapes = ({0: batch, 1: new}, {0: batch}, {0: batch}, {2: batch, 4: past}, {0: batch})
    return _export(module, (ids, new_lengths, past_lengths, past_kv, sums), STEP_IO.inputs, STEP_IO.outputs,
                   shapes, path)


def _export(module, inputs, input_names, output_names, dynamic_shapes, path: Path) -> dict:
    import onnx
    import torch

    path = Path(path)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=OPSET,
            input_names=list(input_names), output_names=list(output_names),
            dynamic_shapes=dynamic_shapes, optimize=True, verify=False, report=False)
    program.save(str(path), external_data=True)
    data_name = path.name + ".data"
    # Normalise the external-data location to one predictable file name.
    model = onnx.load(str(path), load_external_data=True)
    for p in (path, path.parent / data_name):
        if p.exists():
            os.remove(p)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    del model
    graph = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path))
    return {
        "opset": OPSET,
        "external_data": data_name,
        "inputs": [_describe(v) for v in graph.graph.input],
        "outputs": [_describe(v) for v in graph.graph.output],
    }


def _describe(value) -> dict:
    import onnx
    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "dtype": dtype, "shape": shape}


def share_weights(primary: Path, secondary: Path) -> dict:
    """Point `secondary`'s initializers at identical tensors already stored in `primary`'s
    external data file, so the streaming graph does not duplicate the backbone on disk.
    Returns byte counts for the manifest/progress."""
    import hashlib

    import onnx
    from onnx.external_data_helper import uses_external_data

    primary, secondary = Path(primary), Path(secondary)
    index: dict[tuple, tuple[str, int, int]] = {}
    model = onnx.load(str(primary), load_external_data=False)
    with open(primary.parent / (primary.name + ".data"), "rb") as data:
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                continue
            info = {e.key: e.value for e in tensor.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"])
            data.seek(offset)
            digest = hashlib.sha256(data.read(length)).hexdigest()
            index[(tensor.data_type, tuple(tensor.dims), digest)] = (info["location"], offset, length)
    del model

    step = onnx.load(str(secondary), load_external_data=True)
    shared = own = 0
    for tensor in step.graph.initializer:
        if not tensor.HasField("raw_data"):
            continue
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).hexdigest())
        if key in index:
            location, offset, length = index[key]
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
            shared += length
        else:
            own += len(tensor.raw_data)
    data_name = secondary.name + ".data"
    os.remove(secondary)
    os.remove(secondary.parent / data_name)
    onnx.save_model(step, str(secondary), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(secondary))
    return {"shared_bytes": shared, "own_bytes": own}

"""Writing the scorer module as one ONNX graph with external data.

Inputs `input_ids` / `attention_mask` (int64 [batch, sequence]), outputs `score`
(float32 [batch]) and `logits` (float32 [batch, 2]); batch and sequence are dynamic.
Weights always go to one external data file: a 4B graph exceeds protobuf's 2 GB.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("score", "logits")
OPSET = 18


def export_onnx(module, path: Path, example_batch: int = 2, example_seq: int = 8) -> dict:
    """Export `module` to `path` (+ `path.name + '.data'`); returns graph facts for the manifest."""
    import onnx
    import torch
    from torch.export import Dim

    path = Path(path)
    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=1 << 20)
    ids = torch.randint(0, 1000, (example_batch, example_seq), dtype=torch.long)
    mask = torch.ones(example_batch, example_seq, dtype=torch.long)
    mask[-1, example_seq // 2:] = 0
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, (ids, mask), dynamo=True, opset_version=OPSET,
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            optimize=True, verify=False, report=False)
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

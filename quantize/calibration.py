"""Per-channel activation ranges of a graph's MatMul inputs on calibration texts.

Both outlier treatments need them: smoothing divides big channels down, the outlier split
computes them in fp32. They come from the fp32 scoring graph on ONNX Runtime CPU, one text at
a time so no padding reaches the ranges. ONNX Runtime reads the weights from a read-only
mapping of the source's file, used in place (at Qwen3-4B dims, 16 GB that need not be read into
memory; ONNX Runtime refuses a link to a file outside the graph's folder).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def activation_ranges(source_dir: Path, graph_path: str, weights_file: str, activations: list,
                      token_ids: list) -> dict:
    """{activation: per-channel max |x| over every token of every text}."""
    from siren_runtime.backends.onnxruntime_loader import open_session
    source_dir = Path(source_dir)
    model = onnx.load(str(source_dir / graph_path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    for name in activations:
        if name not in known:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    ranges = {name: None for name in activations}
    data = np.memmap(source_dir / weights_file, dtype=np.uint8, mode="r")
    session = open_session(model.SerializeToString(), "cpu", external={Path(weights_file).name: data})
    del model
    for ids in token_ids:
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        for name, value in zip(activations, session.run(activations, feeds)):
            amax = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            ranges[name] = amax if ranges[name] is None else np.maximum(ranges[name], amax)
    del session, data
    return ranges

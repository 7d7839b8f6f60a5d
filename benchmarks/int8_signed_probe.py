"""What a u8 x s8 weight coding would buy an int8 `dynamic` bundle on this CPU, end to end.

The dynamic scheme stores weights as uint8 around 128 (u8 x u8), exact on every CPU. On CPUs
with AVX-512 VNNI or AVX-VNNI, ONNX Runtime's u8 x s8 integer GEMM is exact too and faster; on
AVX2 it saturates. This probe rewrites a copy of the bundle's scoring graph to u8 x s8 (each
weight code minus 128, i.e. its top bit flipped, read as int8; weight zero point 0: the same
integers) and times both graphs side by side on the bench texts, with the scores' difference.
Nothing in the runtime changes: it measures whether building that path is worth it.

    python benchmarks/int8_signed_probe.py INT8_BUNDLE [--repeat 3] [--batch 12]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feed_cost import cpu_isa  # noqa: E402


def signed_copy(model_path: Path, out: Path) -> int:
    """Write the u8 x s8 twin of `model_path` to `out`; returns the MatMuls rewritten."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(model_path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    weights, zero_points = set(), set()
    for node in model.graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            weights.add(node.input[1])
            zero_points.add(node.input[5])
    if not weights:
        raise SystemExit(f"{model_path}: no MatMulIntegerToFloat (not a dynamic int8 bundle)")
    for name in weights:
        codes = numpy_helper.to_array(inits[name])
        if codes.dtype != np.uint8:
            raise SystemExit(f"{name}: weights are {codes.dtype}, expected uint8")
        inits[name].CopyFrom(numpy_helper.from_array((codes ^ 0x80).view(np.int8), name))
    for name in zero_points:
        if int(numpy_helper.to_array(inits[name])) != 128:
            raise SystemExit(f"{name}: weight zero point is not 128")
        inits[name].CopyFrom(numpy_helper.from_array(np.array(0, np.int8), name))
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return len(weights)


def timed(session, feeds: dict, repeat: int) -> tuple[float, np.ndarray]:
    scores = session.run(["score"], feeds)[0]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(["score"], feeds)
        best = min(best, time.perf_counter() - start)
    return best, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=12)
    args = parser.parse_args()
    import onnxruntime as ort
    from siren_export.bench import default_texts
    from siren_runtime.bundle import read_bundle
    from siren_runtime.text import clean_text
    from siren_runtime.tokenization import TextEncoder

    bundle = read_bundle(args.bundle)
    encoder = TextEncoder.for_bundle(bundle)
    ids, mask = encoder.pad(encoder.token_ids([clean_text(t) for t in default_texts(args.batch)]))
    feeds = {"input_ids": ids, "attention_mask": mask}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        twin = Path(tmp) / "model.s8.onnx"
        rewritten = signed_copy(bundle.path(bundle.model.path), twin)
        rows = []
        for label, path in (("u8 x u8 (as stored)", bundle.path(bundle.model.path)), ("u8 x s8 (twin)", twin)):
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            rows.append((label, *timed(session, feeds, args.repeat)))
            del session
    print(f"{args.bundle}: {rewritten} MatMuls, {ids.shape[0]} texts, {int(mask.sum())} tokens; CPU {cpu_isa()}; "
          f"ONNX Runtime {ort.__version__}; best of {args.repeat}")
    base_time, base_scores = rows[0][1], rows[0][2]
    print(f"{'coding':24s} {'batch s':>8s} {'x u8u8':>7s} {'max |Δscore| vs u8u8':>21s}")
    for label, seconds, scores in rows:
        print(f"{label:24s} {seconds:8.3f} {base_time / seconds:6.2f}x {np.abs(scores - base_scores).max():21.2e}")


if __name__ == "__main__":
    main()

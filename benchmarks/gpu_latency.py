"""GPU check: build engines, verify them, and time TensorRT / ONNX Runtime CUDA / llm-siren.

Run through benchmarks/gpu_check.sh on a machine with an NVIDIA GPU and TensorRT. Prints a
latency/throughput table for batch 1/8/32 x sequence 64/256, and one for 1/16/64 concurrent
streams (feed_batch on the step engine vs rescoring every prefix, vs llm-siren rescoring)
on the same weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _models import SIZES  # noqa: E402

SHAPES = [(b, s) for b in (1, 8, 32) for s in (64, 256)]


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def prepare(size: str, workdir: Path) -> tuple[Path, Path, Path]:
    """(artifact, fp32 bundle, bf16 bundle with engines)."""
    from siren_export.pipeline import export_bundle
    from siren_export.synthetic import make_backbone, make_head
    dims = SIZES[size]
    root = workdir / size
    if not (root / "backbone" / "config.json").is_file():
        make_backbone(root / "backbone", **dims)
    if not (root / "artifact" / "siren.safetensors").is_file():
        make_head(root / "artifact", root / "backbone", num_layers=dims["num_layers"], width=dims["hidden_size"],
                  selected_layers=list(range(dims["num_layers"])), neurons_per_layer=32, layer_dims=(256, 64),
                  max_length=512)
    fp32, bf16 = root / "bundle-fp32", root / "bundle-bf16"
    for bundle, dtype in ((fp32, "fp32"), (bf16, "bf16")):
        if not (bundle / "siren_bundle.json").is_file():
            export_bundle(str(root / "artifact"), bundle, dtype=dtype, overwrite=True, streaming=True)
    sh("siren", "build", str(fp32), "--max-batch", "32", "--max-seq", "512", "--stream-batch", "64")
    sh("siren", "build", str(bf16), "--max-batch", "32", "--max-seq", "512", "--stream-batch", "64",
       "--reference-bundle", str(fp32))
    sh("siren", "verify", str(bf16), "--backend", "tensorrt", "--reference-bundle", str(fp32))
    return root / "artifact", fp32, bf16


def time_calls(fn, repeat: int = 20) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sorted(times)[int(0.95 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/siren-gpu")
    parser.add_argument("--full", action="store_true", help="also a random-weight model at Qwen3-4B dimensions")
    args = parser.parse_args()
    import torch
    from siren_guard import SirenGuard as Reference
    from siren_runtime import SirenGuard

    sizes = ["tiny"] + (["qwen3-4b"] if args.full else [])
    rows, stream_rows = [], []
    for size in sizes:
        artifact, fp32, bf16 = prepare(size, Path(args.workdir))
        impls = {"tensorrt bf16": SirenGuard.from_pretrained(bf16, backend="tensorrt", device="cuda"),
                 "tensorrt fp32": SirenGuard.from_pretrained(fp32, backend="tensorrt", device="cuda")}
        try:
            impls["onnxruntime-cuda fp32"] = SirenGuard.from_pretrained(fp32, backend="onnxruntime", device="cuda")
        except Exception as e:  # onnxruntime-gpu absent
            print(f"onnxruntime CUDA skipped: {e}")
        reference = Reference.from_pretrained(str(artifact), device="cuda", dtype=torch.bfloat16)
        for batch, seq in SHAPES:
            texts = [" hello" * seq] * batch  # " hello" is one Qwen3 token
            for name, guard in impls.items():
                p50, p95 = time_calls(lambda: guard.score_batch(texts))
                rows.append((size, name, batch, seq, p50, p95))

            def ref_call():
                reference.score_batch(texts)
                torch.cuda.synchronize()
            p50, p95 = time_calls(ref_call)
            rows.append((size, "llm-siren torch-cuda bf16", batch, seq, p50, p95))
        for streams in (1, 16, 64):
            for name, guard in impls.items():
                seconds, tokens = time_streams(guard, streams)
                stream_rows.append((size, streams, f"{name} feed_batch", seconds, tokens))
                seconds = time_rescoring(guard.score_batch, streams)
                stream_rows.append((size, streams, f"{name} rescoring", seconds, tokens))

            def ref_batch(texts):
                reference.score_batch(texts)
                torch.cuda.synchronize()
            stream_rows.append((size, streams, "llm-siren rescoring", time_rescoring(ref_batch, streams), 16 * streams))
    print_table(rows)
    print(f"\n{'size':<9} {'streams':>7} {'implementation':<34} {'ms/round':>9} {'new tok/s':>10}")
    for size, streams, name, seconds, tokens in stream_rows:
        print(f"{size:<9} {streams:>7} {name:<34} {1e3 * seconds:>9.2f} {tokens / seconds:>10.0f}")


def time_streams(guard, streams: int, rounds: int = 8, delta: str = " hello" * 16) -> tuple[float, int]:
    """(seconds per feed_batch round, new tokens per round) for `streams` sessions."""
    sessions = [guard.stream() for _ in range(streams)]
    guard.feed_batch(sessions, ["Write a story about a dragon."] * streams)
    started = time.perf_counter()
    for _ in range(rounds):
        guard.feed_batch(sessions, [delta] * streams)
    return (time.perf_counter() - started) / rounds, 16 * streams


def time_rescoring(score_batch, streams: int, rounds: int = 8, delta: str = " hello" * 16) -> float:
    texts = ["Write a story about a dragon."] * streams
    started = time.perf_counter()
    for _ in range(rounds):
        texts = [t + delta for t in texts]
        score_batch(texts)
    return (time.perf_counter() - started) / rounds


def print_table(rows) -> None:
    print(f"\n{'size':<9} {'implementation':<26} {'batch':>5} {'seq':>5} {'p50 ms':>8} {'p95 ms':>8} {'tokens/s':>10}")
    for size, name, batch, seq, p50, p95 in rows:
        print(f"{size:<9} {name:<26} {batch:>5} {seq:>5} {1e3 * p50:>8.2f} {1e3 * p95:>8.2f} "
              f"{batch * seq / p50:>10.0f}")


if __name__ == "__main__":
    main()

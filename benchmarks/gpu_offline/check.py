"""The offline GPU check: what a CUDA box without TensorRT, onnxruntime-gpu or network can
say about the GPU path, in one table, in a few minutes.

    python check.py [--kit DIR] [--cpu-substitute] [--full] [--json OUT]

Run by run.sh from the kit that `make gpu-kit` writes (it installs the kit's wheels first).
On the GPU it checks:
- the device-KV streaming path (runtime/backends/device_kv.py) with the real cuda-bindings:
  every stream's KV cache in device memory, gathered and scattered by the runtime's own copies,
  with ONNX Runtime on the CPU standing in for the step engine (its inputs are read back from
  the device and its outputs written there); each stream's score against score(text) of the
  same bundle, host calls per step (they must not grow with streams), device memory held;
- the same runner with torch as the engine (torch_engine.py): the exporter's own step module run
  on the runner's CUDA stream over its bound buffers, at Qwen3-0.6B dims (random weights made on
  the box), fp32 and bf16 KV, 1/16/64 streams, every copy path (3-D batch, row batch, 2-D);
  scores against llm-siren on the same GPU, every stream's KV read back against a whole-prefix
  recompute, host calls and copy entries per step, copy host ms, the engine call's GPU ms (CUDA events),
  memory held and after close;
- llm-siren on torch+CUDA as the GPU anchor: bf16 latency at batch 1/8/32 x 64/256 tokens, a
  saturated batch of 256 x 64 and 64 streams rescored, at Qwen3-0.6B dims (Qwen3-4B with
  --full);
- with TensorRT installed: the kit bundle's engines built as `siren build` builds them (parity
  gate, step engine check), and score_batch timed on TensorRT next to ONNX Runtime CPU.
With --cpu-substitute the CUDA and TensorRT calls go to the test suite's CPU stand-in
(tests/trt_standin.py, in the kit) and llm-siren runs on the CPU at the kit's tiny dims, so the
logic of every step runs in CI; without it, no visible GPU is a clear refusal (exit 2).
Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torch_engine import ALLOCATION_CALLS, CountingRuntime, print_rows, torch_engine_check

KIT = Path(__file__).resolve().parent
STREAM_COUNTS = (1, 8, 64)
TOLERANCE = 1e-5                  # fp32 bundle, fp32 graph on both sides


def real_runtime():
    """(cuda-bindings' runtime module, None) or (None, why there is no GPU to check), in the
    runtime's own words (a driver older than this cuda-bindings names the matching pair)."""
    from siren_runtime.backends.cuda_env import cudart, gpu_problem
    rt = cudart()
    problem = gpu_problem() if rt is not None else "cuda-bindings (cuda-python) is not installed"
    return (None, problem) if problem else (rt, None)


def host_engine_runner(rt, raw_rt, bundle, session, max_batch: int):
    """The runtime's DeviceStepRunner with the step engine call done by ONNX Runtime on the
    CPU: inputs read back from the device, outputs written to it, on a stream of its own
    (its calls are the substitute's, not the runner's, and are not counted)."""
    import numpy as np
    from siren_runtime.backends.cuda_env import check
    from siren_runtime.backends.cuda_memory import CudaStream
    from siren_runtime.backends.device_kv import DeviceStepRunner
    from siren_runtime.bundle import STEP_IO

    kv = {"fp32": np.float32, "fp16": np.float16}[bundle.streaming.kv_dtype]
    types = {"input_ids": np.int64, "new_lengths": np.int64, "past_lengths": np.int64, "past_kv": kv,
             "past_sums": np.float32, "score": np.float32, "new_kv": kv, "sums": np.float32}

    class HostEngineStep(DeviceStepRunner):
        name = "onnxruntime-cpu-as-engine"

        def __init__(self):
            super().__init__(rt, bundle.streaming, bundle.inference.max_length, max_batch)
            self._io = CudaStream(raw_rt)

        def _execute(self, shapes, out_shapes, addresses):
            check(raw_rt.cudaStreamSynchronize(self.stream.handle), "cudaStreamSynchronize")   # the runner's copies
            feeds = {}
            for name in STEP_IO.inputs:
                feeds[name] = np.empty(shapes[name], dtype=types[name])
                if feeds[name].nbytes:
                    self._io.download(feeds[name], addresses[name])
            self._io.synchronize()
            outputs = session.run(list(STEP_IO.outputs), feeds)
            for name, value in zip(STEP_IO.outputs, outputs):
                value = np.ascontiguousarray(value, dtype=types[name])
                assert value.shape == tuple(out_shapes[name]), (name, value.shape, out_shapes[name])
                if value.nbytes:
                    self._io.upload(addresses[name], value)
            self._io.synchronize()

        def _release_engine(self):
            self._io.close()

    return HostEngineStep()


def device_kv_check(bundle_dir: Path, rt, raw_rt, device_bytes) -> list[dict]:
    """Streams fed together through the device-KV runner: exactness, host calls, memory."""
    from siren_runtime import SirenGuard
    from siren_runtime.backends import Runners, open_runners
    from siren_runtime.backends.onnxruntime_loader import open_session
    from siren_runtime.bundle import read_bundle

    contract = read_bundle(bundle_dir)
    words = ("the quick brown fox jumps over a lazy dog while someone asks how to pick a lock "
             "and then about baking bread with friends at the weekend").split()
    rows = []
    with SirenGuard.from_pretrained(bundle_dir, device="cpu", incremental_streaming=False) as reference:
        for streams in STREAM_COUNTS:
            session = open_session(contract.path(contract.streaming.graph.path), "cpu", spinning=False)
            step = host_engine_runner(rt, raw_rt, contract, session, max_batch=64)
            per_step, original = [], step.step

            def counted_step(step_rows, original=original):
                before = dict(rt.calls)
                out = original(step_rows)
                per_step.append(sum(n - before.get(k, 0) for k, n in rt.calls.items() if k not in ALLOCATION_CALLS))
                return out
            step.step = counted_step
            score = open_runners(contract, backend="onnxruntime", device="cpu", streaming=False).score
            rng = random.Random(streams)
            held_before = device_bytes()
            worst, started, feeds = 0.0, time.perf_counter(), 0
            with SirenGuard(contract, Runners(score, step)) as guard:
                sessions = [guard.stream() for _ in range(streams)]
                for _ in range(6):
                    chunks = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in sessions]
                    guard.feed_batch(sessions, chunks)
                    feeds += 1
                    for s in sessions:
                        worst = max(worst, abs(s.score.score - reference.score(s.text).score))
                held = device_bytes() - held_before
                elapsed = time.perf_counter() - started
            rows.append({"streams": streams, "layers": contract.streaming.kv_layers, "max_abs_diff": worst,
                         "host_calls_per_step": sorted(set(per_step[1:])), "steps": len(per_step),
                         "device_mib_held": held / 2 ** 20, "ms_per_feed": 1000 * elapsed / feeds,
                         "passed": worst <= TOLERANCE})
    # constant: the most calls a step made is the same at 8 and 64 streams; a step may make one
    # fewer (no zero-fill when every past is as long as the longest), and one stream no more
    most = {max(r["host_calls_per_step"]) for r in rows if r["streams"] > 1}
    for r in rows:
        r["calls_constant"] = len(most) == 1 and max(r["host_calls_per_step"]) <= max(most) and \
            min(r["host_calls_per_step"]) >= max(most) - 1
    return rows


def anchor_artifact(kit: Path, work: Path, size: str) -> tuple[Path, str]:
    """(artifact for llm-siren, what it is): random Qwen3 weights at `size` dims made here,
    with the kit bundle's tokenizer (the real Qwen3 one)."""
    from _models import SIZES                 # benchmarks/_models.py, carried in the kit
    from siren_export.synthetic import make_head, make_large_backbone
    dims = SIZES[size]
    make_large_backbone(work / "backbone", **dims, dtype="bf16", tokenizer_cache=kit / "bundle" / "tokenizer.json")
    make_head(work / "artifact", work / "backbone", num_layers=dims["num_layers"], width=dims["hidden_size"],
              selected_layers=list(range(dims["num_layers"])), neurons_per_layer=min(32, dims["hidden_size"] // 2),
              layer_dims=(256, 64), max_length=512)
    return work / "artifact", f"random Qwen3 at {size} dims"


def anchor_check(artifact: Path, cpu: bool) -> list[dict]:
    """llm-siren's latency: batch 1/8/32 x 64/256 tokens, and 64 streams rescored."""
    import torch
    from siren_guard import SirenGuard as Reference
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    guard = Reference.from_pretrained(str(artifact), device=device, dtype=dtype)

    def text(tokens: int) -> str:
        return " ".join(["word"] * tokens)

    def timed(fn, repeat: int) -> float:
        fn()
        if not cpu:
            torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            if not cpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows = []
    for batch in (1, 8, 32):
        for tokens in (64, 256):
            texts = [text(tokens)] * batch
            ms = 1000 * timed(lambda: guard.score_batch(texts), 3 if cpu else 10)
            rows.append({"what": f"batch {batch} x {tokens} tokens", "ms": ms, "texts_per_s": batch / ms * 1000})
    if not cpu:                                  # a batch that fills the GPU
        texts = [text(64)] * 256
        ms = 1000 * timed(lambda: guard.score_batch(texts), 5)
        rows.append({"what": "batch 256 x 64 tokens (saturated)", "ms": ms, "texts_per_s": 256 / ms * 1000})
    prefixes = [text(16 + 4 * i) for i in range(64)]
    ms = 1000 * timed(lambda: guard.score_batch(prefixes), 2 if cpu else 5)
    rows.append({"what": "64 streams rescored (16-268 tokens)", "ms": ms, "texts_per_s": 64 / ms * 1000})
    return rows


def tensorrt_check(bundle_dir: Path, work: Path) -> dict:
    """With TensorRT installed (or the stand-in's, with --cpu-substitute): build the kit
    bundle's engines as `siren build` does (the parity gate and the step engine's own check
    included), then time score_batch on TensorRT next to ONNX Runtime CPU (batch 1/8/32 x 64
    tokens) and compare the scores."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return {"ran": False, "why": "TensorRT is not installed (the tensorrt-cu12 or -cu13 extra)"}
    from siren_engines.build import build_engines
    from siren_runtime import SirenGuard
    target = work / "trt-bundle"
    shutil.copytree(bundle_dir, target)
    started = time.perf_counter()
    result = build_engines(target, max_batch=32, show_progress=False)
    built = {e["graph"]: e for e in result["engines"]}
    out = {"ran": True, "engines": sorted(built), "build_seconds": time.perf_counter() - started,
           "verify_passed": bool(built.get("model", {}).get("verify", {}).get("passed")),
           "warnings": result["warnings"], "rows": []}
    with SirenGuard.from_pretrained(target, backend="tensorrt", device="cuda") as engine, \
            SirenGuard.from_pretrained(target, device="cpu") as cpu:
        for batch in (1, 8, 32):
            texts = [" ".join(["word"] * 64)] * batch
            got = [r.score for r in engine.score_batch(texts)]
            want = [r.score for r in cpu.score_batch(texts)]
            row = {"batch": batch, "max_abs_diff": max(abs(a - b) for a, b in zip(got, want))}
            for name, guard in (("tensorrt_ms", engine), ("cpu_ms", cpu)):
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    guard.score_batch(texts)
                    times.append(time.perf_counter() - t0)
                row[name] = 1000 * statistics.median(times)
            out["rows"].append(row)
    out["passed"] = out["verify_passed"] and "streaming" in built and all(r["max_abs_diff"] <= 1e-3 for r in out["rows"])
    return out


class _Install:
    """What StandIn.install needs of pytest's monkeypatch: put the stand-in modules in place."""

    def setitem(self, mapping, name, value):
        mapping[name] = value


def environment(cpu: bool, rt) -> dict:
    from importlib import metadata
    import onnxruntime
    env = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
           "siren-deploy": metadata.version("siren-deploy")}
    try:
        import torch
        env["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
    except ImportError:
        env["torch"] = "not installed"
    if cpu:
        env["device"] = "CPU substitute (tests/trt_standin.py for cuda-bindings)"
    else:
        from siren_runtime.backends.cuda_env import gpu_info
        info = gpu_info() or {}
        env["device"] = f"{info.get('name', '?')} (compute capability {info.get('compute_capability', '?')})"
        env["cuda runtime / driver"] = f"{rt.cudaRuntimeGetVersion()[1]} / {rt.cudaDriverGetVersion()[1]}"
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", default=str(KIT), help="the kit folder (bundle/, trt_standin.py)")
    parser.add_argument("--cpu-substitute", action="store_true",
                        help="no GPU: CUDA calls go to the CPU stand-in, llm-siren runs on the CPU (tests the logic)")
    parser.add_argument("--full", action="store_true", help="the llm-siren anchor at Qwen3-4B dims (0.6B default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    kit = Path(args.kit).resolve()
    sys.path.insert(0, str(kit))              # trt_standin.py and _models.py
    started = time.perf_counter()

    if args.cpu_substitute:
        from trt_standin import StandIn
        standin = StandIn()
        raw_rt = standin.cudart
        device_bytes = standin.gpu.live_bytes
    else:
        raw_rt, why = real_runtime()
        if raw_rt is None:
            print(f"gpu check: {why}. This check runs on an NVIDIA GPU; to test its logic on a CPU, "
                  "run it with --cpu-substitute.", file=sys.stderr)
            return 2

        def device_bytes() -> int:
            from siren_runtime.backends.cuda_env import check
            free, total = check(raw_rt.cudaMemGetInfo(), "cudaMemGetInfo")
            return int(total) - int(free)
    rt = CountingRuntime(raw_rt)
    results = {"environment": environment(args.cpu_substitute, raw_rt)}
    with tempfile.TemporaryDirectory(prefix="siren-gpu-check-") as tmp:
        work = Path(tmp)
        results["device_kv"] = device_kv_check(kit / "bundle", rt, raw_rt, device_bytes)
        size = "micro" if args.cpu_substitute else ("qwen3-4b" if args.full else "qwen3-0.6b")
        artifact, what = anchor_artifact(kit, work, size)
        # on the CPU substitute 1/4/16 streams: the stand-in's copies and CPU torch cost seconds per step
        results["torch_engine"] = torch_engine_check(artifact, raw_rt, device_bytes,
                                                     standin if args.cpu_substitute else None,
                                                     (1, 4, 16) if args.cpu_substitute else (1, 16, 64))
        results["anchor"] = {"model": what, "device": "cpu fp32" if args.cpu_substitute else "cuda bf16",
                             "rows": anchor_check(artifact, args.cpu_substitute)}
        if args.cpu_substitute:
            standin.install(_Install())          # `tensorrt` and cuda.bindings.runtime: the stand-in's
        results["tensorrt"] = tensorrt_check(kit / "bundle", work)
    results["seconds"] = time.perf_counter() - started
    passed = all(r["passed"] and r["calls_constant"] for r in results["device_kv"]) and \
        results["torch_engine"]["passed"] and (
        not results["tensorrt"]["ran"] or results["tensorrt"]["passed"])
    results["passed"] = passed
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if passed else 1


def print_table(results: dict) -> None:
    print("\n| environment | |\n|---|---|")
    for k, v in results["environment"].items():
        print(f"| {k} | {v} |")
    print("\n| device-KV streaming (engine call: ONNX Runtime CPU) | layers | max abs diff vs score(text) "
          "| host calls per step | device MiB held | ms per feed | result |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results["device_kv"]:
        ok = "PASS" if r["passed"] and r["calls_constant"] else "FAIL"
        calls = "/".join(str(c) for c in r["host_calls_per_step"])
        print(f"| {r['streams']} streams, 6 feeds | {r['layers']} | {r['max_abs_diff']:.2e} | {calls} | "
              f"{r['device_mib_held']:.2f} | {r['ms_per_feed']:.1f} | {ok} |")
    print_rows(results["torch_engine"])
    a = results["anchor"]
    print(f"\n| llm-siren anchor: {a['model']}, {a['device']} | ms | texts/s |\n|---|---:|---:|")
    for r in a["rows"]:
        print(f"| {r['what']} | {r['ms']:.1f} | {r['texts_per_s']:.1f} |")
    t = results["tensorrt"]
    if not t["ran"]:
        print(f"\nTensorRT: skipped ({t['why']})")
    else:
        print(f"\n| TensorRT: engines {', '.join(t['engines'])} built in {t['build_seconds']:.0f} s, parity gate "
              f"{'PASS' if t['verify_passed'] else 'FAIL'} | TensorRT ms | ONNX Runtime CPU ms | max abs diff |")
        print("|---|---:|---:|---:|")
        for r in t["rows"]:
            print(f"| batch {r['batch']} x 64 tokens | {r['tensorrt_ms']:.1f} | {r['cpu_ms']:.1f} | "
                  f"{r['max_abs_diff']:.2e} |")
        for w in t["warnings"]:
            print(f"warning: {w}")
    print(f"\n{'PASS' if results['passed'] else 'FAIL'} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

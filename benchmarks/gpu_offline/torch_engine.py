"""Torch as the step engine: the runtime's own device-KV runner (runtime/backends/device_kv.py)
with real cuda-bindings, its engine call done by the exporter's own step module
(``siren_export.step_scorer.SirenStepScorer``) on the runner's CUDA stream.

This is the contract TensorRT has, kept on a box with no TensorRT: the runner binds device
buffers and queues its copies on its stream; the "engine" reads those buffers as torch
tensors on that same stream and writes its outputs into the bound output buffers in place,
with no host synchronization (the runner downloads the score after it, on its stream). So
the gather, the scatter, stream-ordered allocation and every copy path run for real, and
each stream's score and KV cache can be checked against llm-siren and a whole-prefix
recompute on the same GPU. Step time is host wall time (the runner synchronizes on the
score); the engine call's GPU time comes from CUDA events around it on the runner's stream;
memory is the device's in-use bytes less torch's own allocator (which grows on that stream).

Lives in the GPU check kit only: the runtime never imports torch.
"""
from __future__ import annotations

import collections
import random
import statistics
import time
from pathlib import Path

#: host-side ways to move KV, as the runtime picks them: the binding calls each path needs hidden
COPY_PATHS = {"3-D batch": (), "row batch": ("cudaMemcpy3DBatchAsync",),
              "2-D copies": ("cudaMemcpy3DBatchAsync", "cudaMemcpyBatchAsync")}
#: copy calls: how many copies each hands the binding (the rest count one)
_ENTRY_COUNT = {"cudaMemcpyBatchAsync": lambda args: int(args[3]), "cudaMemcpy3DBatchAsync": lambda args: int(args[0])}
_COPY_CALLS = {"cudaMemcpyAsync", "cudaMemcpy2DAsync", "cudaMemcpyBatchAsync", "cudaMemcpy3DBatchAsync"}
ALLOCATION_CALLS = {"cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync", "cudaMallocHost", "cudaFreeHost"}
#: step score and KV against their references, per KV precision. The copies are exact (the fp32
#: rows show it, to ~1e-6); what differs is the module's own arithmetic in another batch shape
#: and order: bf16 keeps 8 mantissa bits, so a recomputed deep layer's keys/values differ by a
#: few of its ulps (~2e-2 of the largest value, measured on the CPU substitute)
TOLERANCE = {"fp32": {"score": 1e-4, "kv": 1e-4}, "bf16": {"score": 3e-2, "kv": 6e-2}}


class CountingRuntime:
    """cuda-bindings' runtime module seen by one runner: each call and copy entry counted,
    and `hidden` calls absent (as on an older binding), so every copy path can be run."""

    def __init__(self, rt, hidden=()):
        self._rt, self._hidden = rt, set(hidden)
        self.calls = collections.Counter()
        self.entries = 0

    def __getattr__(self, name):
        if name in self._hidden:
            raise AttributeError(name)
        value = getattr(self._rt, name)
        if not callable(value) or isinstance(value, type):       # enums and structs pass through
            return value

        def counted(*args):
            self.calls[name] += 1
            if name in _COPY_CALLS:
                self.entries += _ENTRY_COUNT.get(name, lambda a: 1)(args)
            return value(*args)
        return counted


class DeviceTensors:
    """Device addresses seen as torch tensors: on a GPU through __cuda_array_interface__
    (no copy, no synchronization), on the CPU substitute through the stand-in's memory."""

    _TYPESTR = {"float32": "<f4", "int64": "<i8", "bfloat16": "<i2", "float16": "<f2"}

    def __init__(self, standin=None):
        self.standin = standin

    def at(self, address: int, shape, dtype):
        import numpy as np
        import torch
        name = str(dtype).replace("torch.", "")
        if self.standin is not None:
            raw = np.dtype(self._TYPESTR[name])
            view = self.standin.gpu.device_view(address, int(np.prod(shape)) * raw.itemsize, "torch engine")
            tensor = torch.from_numpy(view.view(raw).reshape(shape))
        else:
            class Interface:
                __cuda_array_interface__ = {"shape": tuple(int(d) for d in shape), "typestr": self._TYPESTR[name],
                                            "data": (int(address), False), "version": 3, "strides": None,
                                            "stream": None}
            tensor = torch.as_tensor(Interface(), device="cuda")
            # the buffer itself, never a copy (as_tensor copies a pointer of another device)
            assert tensor.data_ptr() == int(address), "torch copied the device buffer instead of viewing it"
        return tensor.view(torch.bfloat16) if name == "bfloat16" else tensor


def torch_engine_runner(rt, spec, module, tensors: DeviceTensors, max_length: int, max_batch: int, cuda: bool):
    """A DeviceStepRunner whose engine is `module` run on the runner's own stream."""
    import torch
    from siren_runtime.backends.device_kv import DeviceStepRunner

    kv = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.kv_dtype]
    types = {"input_ids": torch.int64, "new_lengths": torch.int64, "past_lengths": torch.int64, "past_kv": kv,
             "past_sums": torch.float32, "score": torch.float32, "new_kv": kv, "sums": torch.float32}

    class TorchEngineStep(DeviceStepRunner):
        name = "torch-as-engine"

        def __init__(self):
            super().__init__(rt, spec, max_length, max_batch)
            self.torch_stream = torch.cuda.ExternalStream(int(self.stream.handle)) if cuda else None
            self.engine_events = []               # (start, stop) CUDA events around each engine call

        def _execute(self, shapes, out_shapes, addresses):
            inputs = [tensors.at(addresses[n], shapes[n], types[n])
                      for n in ("input_ids", "new_lengths", "past_lengths", "past_kv", "past_sums")]
            outputs = [tensors.at(addresses[n], out_shapes[n], types[n]) for n in ("score", "new_kv", "sums")]
            with torch.no_grad(), (torch.cuda.stream(self.torch_stream) if cuda else _nothing()):
                if cuda:
                    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    events[0].record(self.torch_stream)
                for name, out, value in zip(("score", "new_kv", "sums"), outputs, module(*inputs)):
                    if tuple(value.shape) != tuple(out.shape):    # copy_ would broadcast a wrong shape
                        raise AssertionError(f"{name}: the step module gave {tuple(value.shape)}, the runner "
                                             f"bound {tuple(out.shape)}")
                    out.copy_(value)                   # in place, queued on the runner's stream
                if cuda:
                    events[1].record(self.torch_stream)
                    self.engine_events.append(events)

    return TorchEngineStep()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_module(artifact: Path, dtype: str, device: str):
    """The exporter's step module for `artifact` (as `siren export` traces it), on `device`."""
    from siren_export.artifact import load_artifact
    from siren_export.backbone import load_backbone
    from siren_export.step_scorer import SirenStepScorer
    art = load_artifact(str(artifact))
    loaded = load_backbone(art.base_model_id, None, art.deepest_layer + 1, dtype=dtype)
    module = SirenStepScorer(loaded.model, loaded.num_layers, art, readout="runtime").eval().to(device)
    attn = loaded.model.layers[0].self_attn
    return module, {"kv_layers": art.deepest_layer + 1, "kv_heads": int(loaded.config.num_key_value_heads),
                    "head_dim": int(attn.head_dim), "feature_dim": art.feature_dim, "max_length": art.max_length}


def _texts(count: int, seed: int) -> list[str]:
    words = ("the quick brown fox jumps over a lazy dog while someone asks how to pick a lock "
             "and then about baking bread with friends at the weekend").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(24, 60))) for _ in range(count)]


def _read_cache(runner, state, spec, cuda: bool, standin):
    """A stream's KV cache read back: [layers * 2, kv_heads, length, head_dim] (numpy, fp32)."""
    import numpy as np
    raw = np.dtype({"fp32": "<f4", "bf16": "<u2", "fp16": "<f2"}[spec.kv_dtype])
    shape = (spec.kv_layers * 2, spec.kv_heads, state.capacity, spec.head_dim)
    host = np.empty(shape, dtype=raw)
    if standin is not None:
        host[...] = standin.gpu.device_view(state.ptr, host.nbytes, "cache").view(raw).reshape(shape)
    else:
        runner.stream.download(host, state.ptr)
        runner.stream.synchronize()
    host = host[:, :, :state.length]
    if spec.kv_dtype == "bf16":
        return (host.astype(np.uint32) << 16).view(np.float32)
    return host.astype(np.float32)


def _whole_prefix_kv(module, token_lists, spec, device):
    """Every stream's keys/values recomputed from its whole prefix, in one module call."""
    import torch
    kv = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.kv_dtype]
    width = max(len(t) for t in token_lists)
    ids = torch.zeros((len(token_lists), width), dtype=torch.int64)
    for b, t in enumerate(token_lists):
        ids[b, :len(t)] = torch.tensor(t)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)
    past = torch.zeros((spec.kv_layers, 2, len(token_lists), spec.kv_heads, 1, spec.head_dim), dtype=kv)
    with torch.no_grad():
        _, new_kv, _ = module(ids.to(device), lengths.to(device), torch.zeros_like(lengths).to(device),
                              past.to(device), torch.zeros((len(token_lists), spec.feature_dim)).to(device))
    new_kv = new_kv.float().cpu().numpy()           # [layers, 2, B, heads, width, head_dim]
    return [new_kv[:, :, b, :, :len(t)].reshape(spec.kv_layers * 2, spec.kv_heads, len(t), spec.head_dim)
            for b, t in enumerate(token_lists)]


def run_config(raw_rt, path: str, module, reference, spec, streams: int, max_length: int, device_bytes,
               standin=None, feeds: int = 6) -> dict:
    """`streams` streams fed `feeds` times through the torch-engine runner on one copy path."""
    import numpy as np
    import torch
    from siren_runtime.backends.base import StepRow
    cuda = standin is None
    rt = CountingRuntime(raw_rt, COPY_PATHS[path])
    def runner_bytes() -> int:
        """Device memory in use less torch's own (its allocator grows on the runner's stream)."""
        if not cuda:
            return device_bytes()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        return device_bytes() - torch.cuda.memory_reserved()
    before = runner_bytes()
    runner = torch_engine_runner(rt, spec, module, DeviceTensors(standin), max_length, max_batch=max(streams, 1),
                                 cuda=cuda)
    runner.copy_ms = 0.0
    copy_blocks = runner.stream.copy_blocks               # every KV copy the runner queues goes here

    def timed(copies):
        t0 = time.perf_counter()
        copy_blocks(copies)
        runner.copy_ms += 1000 * (time.perf_counter() - t0)
    runner.stream.copy_blocks = timed
    texts = _texts(streams, seed=streams)
    tokens = [reference._tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    rng = random.Random(streams * 7 + len(path))
    cuts = [sorted(rng.sample(range(1, len(t)), feeds - 1)) + [len(t)] for t in tokens]
    states = [runner.new_state() for _ in tokens]
    sums = [np.zeros(spec.feature_dim, np.float32) for _ in tokens]
    held = [0] * len(tokens)
    per_step = []
    scores = [0.0] * len(tokens)
    for feed in range(feeds):
        rows = []
        for j, t in enumerate(tokens):
            end = cuts[j][feed]
            rows.append(StepRow(states[j], held[j], list(t[held[j]:end]), sums[j]))
        calls, entries, copy_ms = dict(rt.calls), rt.entries, runner.copy_ms
        t0 = time.perf_counter()
        out = runner.step(rows)
        host_ms = 1000 * (time.perf_counter() - t0)
        engine_ms = None
        if cuda:                       # the engine call's GPU time, from events around it on the stream
            start, stop = runner.engine_events.pop()
            stop.synchronize()
            engine_ms = start.elapsed_time(stop)
        per_step.append({"calls": sum(n - calls.get(k, 0) for k, n in rt.calls.items() if k not in ALLOCATION_CALLS),
                         "entries": rt.entries - entries, "copy_host_ms": runner.copy_ms - copy_ms,
                         "step_ms": host_ms, "engine_ms": engine_ms})
        for j, o in enumerate(out):
            sums[j] = o.sums[-1]
            held[j] = cuts[j][feed]
            scores[j] = o.score
    want = [r.score for r in reference.score_batch(texts)]
    score_diff = max(abs(a - b) for a, b in zip(scores, want))
    caches = [_read_cache(runner, s, spec, cuda, standin) for s in states]
    recomputed = _whole_prefix_kv(module, tokens, spec, "cuda" if cuda else "cpu")
    scale = max(float(np.abs(r).max()) for r in recomputed) or 1.0
    kv_diff = max(float(np.abs(c - r).max()) for c, r in zip(caches, recomputed)) / scale
    held_bytes = runner_bytes() - before
    runner.close()
    after = runner_bytes() - before
    steady = per_step[1:]                          # the first step has no past to gather
    tol = TOLERANCE[spec.kv_dtype]
    return {"path": path, "streams": streams, "kv_dtype": spec.kv_dtype, "layers": spec.kv_layers,
            "score_diff_vs_llm_siren": score_diff, "kv_rel_diff_vs_recompute": kv_diff,
            "host_calls_per_step": sorted({s["calls"] for s in steady}),
            "entries_per_step": statistics.median(s["entries"] for s in steady),
            "copy_host_ms_per_step": statistics.median(s["copy_host_ms"] for s in steady),
            "step_ms": statistics.median(s["step_ms"] for s in steady),
            "engine_ms": statistics.median(s["engine_ms"] for s in steady) if cuda else None,
            "device_mib_held": held_bytes / 2 ** 20, "device_mib_after_close": after / 2 ** 20,
            "passed": score_diff <= tol["score"] and kv_diff <= tol["kv"]}


def torch_engine_check(artifact: Path, raw_rt, device_bytes, standin=None, stream_counts=(1, 16, 64)) -> dict:
    """Every KV precision x stream count x copy path; llm-siren on the same device as reference."""
    import torch
    from siren_guard import SirenGuard as Reference
    from siren_runtime.bundle import STEP_IO, GraphSpec, StreamingSpec
    device = "cpu" if standin is not None else "cuda"
    rows = []
    for kv_dtype in ("fp32", "bf16"):
        module, dims = step_module(artifact, kv_dtype, device)
        spec = StreamingSpec(graph=GraphSpec(path="step.onnx", external_data=None, dtype=kv_dtype, io=STEP_IO),
                             kv_layers=dims["kv_layers"], kv_heads=dims["kv_heads"], head_dim=dims["head_dim"],
                             kv_dtype=kv_dtype, feature_dim=dims["feature_dim"])
        reference = Reference.from_pretrained(str(artifact), device=device,
                                              dtype=torch.float32 if kv_dtype == "fp32" else torch.bfloat16)
        for streams in stream_counts:
            for path in COPY_PATHS:
                rows.append(run_config(raw_rt, path, module, reference, spec, streams, dims["max_length"],
                                       device_bytes, standin))
        del module, reference
        if standin is None:
            torch.cuda.empty_cache()
    # entries grow with streams only on the 3-D path (one per stream per gather/scatter)
    for r in rows:
        r["entries_o_streams"] = r["path"] != "3-D batch" or r["entries_per_step"] <= 3 * r["streams"] + 6
    return {"rows": rows, "passed": all(r["passed"] and r["entries_o_streams"] for r in rows)}


def print_rows(result: dict) -> None:
    print("\n| torch as the step engine | KV | layers | max abs diff vs llm-siren | KV rel diff vs recompute "
          "| host calls/step | copy entries/step | copy host ms/step | step ms | engine GPU ms | MiB held "
          "| MiB after close | result |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        ok = "PASS" if r["passed"] and r["entries_o_streams"] else "FAIL"
        device = f"{r['engine_ms']:.2f}" if r["engine_ms"] is not None else "n/a"
        calls = "/".join(str(c) for c in r["host_calls_per_step"])
        print(f"| {r['streams']} streams, {r['path']} | {r['kv_dtype']} | {r['layers']} | "
              f"{r['score_diff_vs_llm_siren']:.2e} | {r['kv_rel_diff_vs_recompute']:.2e} | {calls} | "
              f"{r['entries_per_step']:.0f} | {r['copy_host_ms_per_step']:.2f} | {r['step_ms']:.1f} | {device} | "
              f"{r['device_mib_held']:.1f} | {r['device_mib_after_close']:.1f} | {ok} |")

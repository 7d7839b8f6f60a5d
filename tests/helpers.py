"""Helpers shared by the test modules: the fp32 tolerance against llm-siren, and guards
built from injected runners (fakes go in through the constructor, never by patching)."""
from __future__ import annotations

import random

#: fp32 scores agree with llm-siren (and with each other across paths) within this
TOL = 1e-5


def guard_with(bundle_dir, wrap_score=None, wrap_step=None, device="cpu", **guard_options):
    """A SirenGuard on `bundle_dir` whose runners are wrapped by the given callables."""
    from siren_runtime import SirenGuard
    from siren_runtime.backends import open_runners
    from siren_runtime.guard import DEFAULT_STREAM_CACHE, DEFAULT_STREAM_CACHE_BYTES
    from siren_runtime.bundle import read_bundle
    from siren_runtime.streaming import StreamCache

    bundle = read_bundle(bundle_dir)
    bundle.verify()
    cache_options = {k: guard_options.pop(k) for k in ("stream_cache_size", "stream_cache_bytes")
                     if k in guard_options}
    runners = open_runners(bundle, device=device)
    if wrap_score is not None:
        runners.score = wrap_score(runners.score)
    if wrap_step is not None and runners.step is not None:
        runners.step = wrap_step(runners.step)
    cache = StreamCache(cache_options.get("stream_cache_size", DEFAULT_STREAM_CACHE),
                        cache_options.get("stream_cache_bytes", DEFAULT_STREAM_CACHE_BYTES))
    return SirenGuard(bundle, runners, stream_cache=cache, **guard_options)


def chunk(text, sizes):
    """`text` cut into pieces of the given sizes (the rest as one last piece)."""
    out, i = [], 0
    for size in sizes:
        if i >= len(text):
            break
        out.append(text[i:i + size])
        i += size
    if i < len(text):
        out.append(text[i:])
    return out


def random_chunks(text, rng: random.Random, low=1, high=9):
    return chunk(text, [rng.randint(low, high) for _ in range(len(text))])


def build_trajectory_bundle(root, template, llama=False, blocks=3, layers=4, max_length=128, seed=11):
    """A tiny random Qwen3 (or Llama-3) backbone with `template`, an Agent-SIREN head on it, its
    bundle, and llm-siren's AgentSirenGuard (fp32) on the same weights -> (bundle, reference)."""
    import torch
    from siren_export.pipeline import export_bundle
    from siren_export.synthetic import make_backbone, make_llama_backbone, make_trajectory_head, set_chat_template
    from siren_guard import AgentSirenGuard as Reference
    if llama:
        backbone = make_llama_backbone(root / "backbone", num_layers=layers, hidden_size=64, intermediate_size=128,
                                       num_heads=4, num_kv_heads=1, head_dim=16, seed=seed)
    else:
        backbone = make_backbone(root / "backbone", num_layers=layers, hidden_size=64, intermediate_size=128,
                                 num_heads=4, num_kv_heads=2, head_dim=16, seed=seed,
                                 tokenizer_cache=root.parent / "qwen3-tokenizer.json"
                                 if (root.parent / "qwen3-tokenizer.json").exists() else None)
    set_chat_template(backbone, template)
    artifact = make_trajectory_head(root / "head", backbone, width=64, blocks=blocks, max_length=max_length, seed=seed)
    bundle = export_bundle(str(artifact), root / "bundle", show_progress=False)
    reference = Reference.from_pretrained(str(artifact), device="cpu", dtype=torch.float32)
    return bundle, reference


def run_concurrently(worker, count: int) -> None:
    """`worker(i)` for i in range(count), each on its own thread, all joined."""
    import threading
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

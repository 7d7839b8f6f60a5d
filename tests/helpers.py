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

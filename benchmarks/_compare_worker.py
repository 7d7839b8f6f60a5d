"""One side of benchmarks/compare.py: loads a bundle with whichever `siren_runtime` is on
PYTHONPATH (the current tree's or a baseline commit's) and runs named workloads on request.

Protocol: one JSON object per line on stdin ({"workload": name}), one per line on stdout
({"seconds": s, "value": checksum} or {"skip": why}); "rss" answers the peak RSS so far.
The same script drives both sides, so the workloads are identical; a workload that needs an
API the side lacks answers "skip".
"""
from __future__ import annotations

import json
import random
import resource
import sys
import time

from streaming import RESPONSE  # noqa: E402  (the streaming benchmark's response, same workload)
WORDS = RESPONSE.split()


def _texts(seed: int, n: int, low: int = 3, high: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


SINGLE = _texts(1, 12)
BATCH = _texts(2, 48)
PREFIX_TEXTS = _texts(3, 8, 20, 80)
STEPS = [RESPONSE[:i] for i in range(12, 12 * 200, 12)][:199]


def _streams(seed: int = 4, n: int = 16) -> list[list[str]]:
    """16 streams cut into random 1-24 character chunks, ending at different rounds."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        text = " ".join(_texts(100 + k, 1, 30, 90 - 3 * k))
        chunks, i = [], 0
        while i < len(text):
            size = rng.randint(1, 24)
            chunks.append(text[i:i + size])
            i += size
        out.append(chunks)
    return out


STREAMS = _streams()


def single(guard):
    return sum(guard.score(t).score for t in SINGLE)


def batch(guard):
    return sum(r.score for r in guard.score_batch(BATCH))


def stream(guard):
    guard.stream_cache.clear()
    return sum(guard.score_streaming(p).score for p in STEPS)


def _feed_rounds(guard, together: bool) -> float:
    sessions = [guard.stream() for _ in STREAMS]
    total = 0.0
    for r in range(max(len(c) for c in STREAMS)):
        live = [(s, c[r]) for s, c in zip(sessions, STREAMS) if r < len(c)]
        if together:
            total += sum(x.score for x in guard.feed_batch([s for s, _ in live], [d for _, d in live]))
        else:
            total += sum(guard.feed_batch([s], [d])[0].score for s, d in live)
    return total


def feed_batch(guard):
    return _feed_rounds(guard, True)


def feed_one_by_one(guard):
    return _feed_rounds(guard, False)


def prefixes(guard):
    if not hasattr(guard, "score_prefixes_batch"):
        raise NotImplementedError("score_prefixes_batch")
    return float(sum(p.scores[-1] for p in guard.score_prefixes_batch(PREFIX_TEXTS)))


WORKLOADS = {"single": single, "batch": batch, "stream": stream, "feed_batch": feed_batch,
             "feed_one_by_one": feed_one_by_one, "prefixes": prefixes}


def main() -> None:
    from siren_runtime import SirenGuard
    guard = SirenGuard.from_pretrained(sys.argv[1], device="cpu")
    guard.score("warm up")
    import siren_runtime
    print(json.dumps({"ready": True, "rss_mib": _peak_mib(), "runtime": siren_runtime.__file__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        name = request["workload"]
        if name == "rss":
            print(json.dumps({"rss_mib": _peak_mib()}), flush=True)
            continue
        try:
            started = time.perf_counter()
            value = WORKLOADS[name](guard)
            print(json.dumps({"seconds": time.perf_counter() - started, "value": float(value)}), flush=True)
        except (NotImplementedError, AttributeError, TypeError) as e:
            print(json.dumps({"skip": f"{type(e).__name__}: {e}"}), flush=True)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()

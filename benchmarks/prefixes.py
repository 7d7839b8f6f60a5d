"""What `score_prefixes` costs: every prefix's score of a ~500-token text in one pass, next to
one `score()` of the text and to rescoring every prefix (what a guard without the step
graph's running sums would do). One bundle, one run (random weights; CPU; fp32).

    python benchmarks/prefixes.py [--size tiny|mid] [--workdir DIR] [--repeat N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _models import build  # noqa: E402
from feed_cost import cpu_isa  # noqa: E402
from streaming import RESPONSE  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--workdir", help="where the bundle is built (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from siren_runtime import SirenGuard
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="siren-prefixes-"))
    _, bundle = build(args.size, workdir, max_length=1024)
    guard = SirenGuard.from_pretrained(bundle, device="cpu")
    ids = guard.token_ids(RESPONSE)
    text = RESPONSE
    while len(ids) < 500:
        text += " " + RESPONSE
        ids = guard.token_ids(text)
    ids = ids[:500]
    text = guard._encoder._tokenizer.decode(ids)
    n = len(guard.token_ids(text))
    guard.score(text)                       # warm up both graphs
    guard.score_prefixes(text)
    one = best(lambda: guard.score(text), args.repeat)
    prefixes = best(lambda: guard.score_prefixes(text), args.repeat)
    sample = list(range(0, n, max(1, n // 25)))      # rescoring every prefix, timed on a sample
    t0 = time.perf_counter()
    for k in sample:
        guard.score_token_ids([ids[:k + 1]])
    per = (time.perf_counter() - t0) / len(sample)
    every = per * n
    print(f"CPU: {cpu_isa()}, {os.cpu_count()} cores; {args.size} random Qwen3, fp32, ONNX Runtime CPU; "
          f"a {n}-token text, best of {args.repeat}")
    print("| what | seconds | vs one score() |")
    print("|---|---:|---:|")
    print(f"| score(text) | {one:.4f} | 1.00 |")
    print(f"| score_prefixes(text): all {n} prefix scores + spans | {prefixes:.4f} | {prefixes / one:.2f} |")
    print(f"| rescoring every prefix ({len(sample)} timed, x{n}) | {every:.2f} | {every / one:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fp32 against int8 in both weight codings, in interleaved rounds in one process.

A `dynamic` int8 bundle loads its u8 x s8 twin on CPUs with AVX-512 VNNI / AVX-VNNI and its
stored u8 x u8 graphs elsewhere (README "Why u8 x u8, and u8 x s8 on VNNI CPUs"). On a shared
machine the speed of one process drifts by tens of percent over minutes, so separate
processes timed one after another (`siren bench`) compare a drift as much as the codings:
here the guards are loaded side by side and each round times one score_batch of each in
turn; the ratios are the medians of the per-round ratios. Memory is `siren bench`'s job.

    python benchmarks/int8_coding.py FP32_BUNDLE INT8_BUNDLE [--rounds 7] [--batch 12] [--prepack]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from siren_export.bench import cpu_isa, default_texts
from siren_runtime import SirenGuard
from siren_runtime.cpu_features import CODING_ENV, exact_u8s8

STORED = "int8 u8 x u8 (stored)"
TWIN = "int8 u8 x s8 (twin)"


def load(bundle: str, coding: str | None, prepack: bool = False) -> SirenGuard:
    """A guard with `coding` forced through the environment while it loads (read at load only)."""
    before = os.environ.get(CODING_ENV)
    if coding:
        os.environ[CODING_ENV] = coding
    try:
        return SirenGuard.from_pretrained(bundle, device="cpu", incremental_streaming=False,
                                          prepack_weights=prepack)
    finally:
        os.environ.pop(CODING_ENV, None)
        if before is not None:
            os.environ[CODING_ENV] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fp32")
    parser.add_argument("int8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--prepack", action="store_true", help="also each int8 coding with prepack_weights=True")
    args = parser.parse_args()
    guards = {"fp32": load(args.fp32, None), STORED: load(args.int8, "u8u8")}
    if exact_u8s8():
        guards[TWIN] = load(args.int8, None)
        if guards[TWIN].runners.score.int8_coding != "u8 x s8":
            raise SystemExit(f"{args.int8}: the u8 x s8 twin did not load (not a dynamic int8 bundle?)")
    if args.prepack:
        for name in [n for n in guards if n.startswith("int8")]:
            guards[name + ", prepacked"] = load(args.int8, "u8u8" if name == STORED else None, prepack=True)
    if not exact_u8s8():
        print(f"this CPU ({cpu_isa()}) has no exact u8 x s8 dot product (no VNNI): the twin is not measured")
    texts = default_texts(args.batch)
    scores = {name: [r.score for r in guard.score_batch(texts)] for name, guard in guards.items()}   # warm-up
    times = {name: [] for name in guards}
    for _ in range(args.rounds):
        for name, guard in guards.items():
            start = time.perf_counter()
            guard.score_batch(texts)
            times[name].append(time.perf_counter() - start)
    print(f"{len(texts)} texts; CPU {cpu_isa()}, {os.cpu_count()} cores; {args.rounds} interleaved rounds")
    print(f"{'bundle':35s} {'median s':>9s} {'best s':>7s} {'x fp32':>7s} {'x u8u8':>7s} {'max |Δ| vs u8u8':>16s}")
    for name in guards:
        vs_fp32 = statistics.median(f / t for f, t in zip(times["fp32"], times[name]))
        vs_stored = statistics.median(u / t for u, t in zip(times[STORED], times[name]))
        diff = max(abs(a - b) for a, b in zip(scores[name], scores[STORED]))
        print(f"{name:35s} {statistics.median(times[name]):9.3f} {min(times[name]):7.3f} {vs_fp32:6.2f}x "
              f"{vs_stored:6.2f}x {diff:16.2e}")
    for guard in guards.values():
        guard.close()


if __name__ == "__main__":
    main()

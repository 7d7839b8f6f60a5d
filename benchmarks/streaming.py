"""Streaming moderation cost, one stream and many at once. Random weights; CPU; fp32.

Single stream: a response (~350 tokens, or ~550 with --long) fed in 12-character chunks;
every call scores the whole prefix: incremental step graph vs own full rescoring vs llm-siren
(the same numbers three ways, checked here). Total and per-call time, memory per stream.

Concurrent streams: 16 different responses of ~350 tokens fed in 12-character chunks, one
round = one chunk for every stream: `feed_batch` (one engine call per round) vs the same
16 sessions fed one by one vs llm-siren's score_streaming. Aggregate tokens/s, ms per round,
state memory, and the largest difference from score(prefix).

    python benchmarks/streaming.py [--sizes tiny mid] [--workdir DIR] [--long] [--skip-single]
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

from _models import SIZES, build  # noqa: E402

RESPONSE = (
    "Thanks for the question. Here is a detailed overview of how municipal water treatment works, "
    "from intake to your tap. First, raw water is drawn from rivers, lakes or aquifers and screened to "
    "remove debris such as leaves, plastic and fish. Next comes coagulation: chemicals like aluminium "
    "sulfate are added so that tiny suspended particles clump together into larger flocs. During "
    "flocculation the water is gently stirred so the flocs grow, and in the sedimentation basins they "
    "settle to the bottom as sludge. The clearer water above then passes through filters made of sand, "
    "gravel and activated carbon, which remove finer particles, some microorganisms, and compounds that "
    "affect taste and odour. Disinfection follows, usually with chlorine or chloramine, sometimes with "
    "ultraviolet light or ozone, to inactivate bacteria and viruses that survived filtration. Operators "
    "adjust the pH to limit pipe corrosion, and many utilities add fluoride for dental health. Finally "
    "the treated water is stored in reservoirs and towers and pumped through the distribution network, "
    "where residual disinfectant keeps it safe until it reaches homes, schools and hospitals. Let me know "
    "if you would like details about any individual stage, regulations, or testing schedules. Water "
    "quality is monitored continuously: samples are taken at the plant and throughout the network and "
    "analysed for turbidity, residual chlorine, coliform bacteria, lead, nitrates and dozens of other "
    "parameters. Results are reported to regulators, and most utilities publish an annual consumer "
    "confidence report that lists what was found and how it compares with the legal limits. If your "
    "local water tastes or smells unusual, contact the utility, which can test a sample from your home. "
    "Boiling advisories are issued when pressure drops or contamination is suspected."
)
CHUNK = 12


def prefixes(text: str, size: int) -> list[str]:
    return [text[:i] for i in range(size, len(text) + size, size)]


def timed_calls(fn, items):
    times, scores = [], []
    for item in items:
        t0 = time.perf_counter()
        scores.append(fn(item).score)
        times.append(time.perf_counter() - t0)
    return times, scores


def run_size(size: str, workdir: Path, response: str = RESPONSE) -> list[dict]:
    import torch
    from siren_guard import SirenGuard as ReferenceGuard
    from siren_runtime import SirenGuard

    artifact, bundle = build(size, workdir)
    steps = prefixes(response, CHUNK)
    incremental = SirenGuard.from_pretrained(bundle, device="cpu")
    rescoring = SirenGuard.from_pretrained(bundle, device="cpu", incremental_streaming=False)
    reference = ReferenceGuard.from_pretrained(str(artifact), device="cpu", dtype=torch.float32)
    n_tokens = len(incremental.token_ids(response))
    incremental.score_streaming("warm up"), rescoring.score_streaming("warm up"), reference.score("warm up")
    incremental.stream_cache.clear()

    rows, baseline = [], None
    for name, fn in (("incremental (step graph)", incremental.score_streaming),
                     ("own full rescoring", rescoring.score_streaming),
                     ("llm-siren score_streaming", reference.score_streaming)):
        with torch.inference_mode():
            times, scores = timed_calls(fn, steps)
        if baseline is None:
            baseline = scores
        quarter = len(times) // 4
        rows.append({"size": size, "impl": name, "calls": len(times), "total_s": sum(times),
                     "per_call_ms": 1e3 * sum(times) / len(times),
                     "first_q_ms": 1e3 * sum(times[:quarter]) / quarter,
                     "last_q_ms": 1e3 * sum(times[-quarter:]) / quarter,
                     "max_dscore": max(abs(a - b) for a, b in zip(scores, baseline))})
    state_bytes = incremental.stream_cache.nbytes
    for row in rows:
        row["tokens"] = n_tokens
        row["stream_kib"] = state_bytes / 1024 if row["impl"].startswith("incremental") else 0.0
    return rows


def stream_texts(count: int) -> list[str]:
    """`count` different ~350-token responses: the sentences of RESPONSE rotated."""
    sentences = [x.strip() + "." for x in RESPONSE.split(".") if x.strip()]
    return [" ".join(sentences[i:] + sentences[:i]) for i in range(count)]


def run_concurrent(size: str, workdir: Path, streams: int = 16, reference_streams: int = 1) -> list[dict]:
    import resource

    import torch
    from siren_guard import SirenGuard as ReferenceGuard
    from siren_runtime import SirenGuard

    artifact, bundle = build(size, workdir)
    guard = SirenGuard.from_pretrained(bundle, device="cpu")
    reference = ReferenceGuard.from_pretrained(str(artifact), device="cpu", dtype=torch.float32)
    texts = stream_texts(streams)
    pieces = [[t[i:i + CHUNK] for i in range(0, len(t), CHUNK)] for t in texts]
    rounds = max(len(p) for p in pieces)
    tokens = sum(len(guard.token_ids(t)) for t in texts)
    guard.score("warm up"), reference.score("warm up")

    def batched():
        sessions = [guard.stream() for _ in texts]
        times, last = [], None
        for r in range(rounds):
            active = [i for i in range(streams) if r < len(pieces[i])]
            t0 = time.perf_counter()
            last = guard.feed_batch([sessions[i] for i in active], [pieces[i][r] for i in active])
            times.append(time.perf_counter() - t0)
        return times, sessions, last

    def one_by_one():
        sessions = [guard.stream() for _ in texts]
        times = []
        for r in range(rounds):
            t0 = time.perf_counter()
            for i in range(streams):
                if r < len(pieces[i]):
                    sessions[i].feed(pieces[i][r])
            times.append(time.perf_counter() - t0)
        return times, sessions, None

    def llm_siren():
        times = []
        prefixes_ = [""] * reference_streams
        with torch.inference_mode():
            for r in range(rounds):
                t0 = time.perf_counter()
                for i in range(reference_streams):
                    if r < len(pieces[i]):
                        prefixes_[i] += pieces[i][r]
                        reference.score_streaming(prefixes_[i])
                times.append((time.perf_counter() - t0) * streams / reference_streams)
        return times, None, None

    rows = []
    impls = [("feed_batch (one call/round)", batched), ("sessions one by one", one_by_one)]
    if reference_streams:
        impls.append((f"llm-siren ({reference_streams} of {streams}, scaled)", llm_siren))
    for name, fn in impls:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times, sessions, _ = fn()
        row = {"size": size, "impl": name, "streams": streams, "rounds": rounds, "tokens": tokens,
               "total_s": sum(times), "round_ms": 1e3 * sum(times) / len(times),
               "tok_s": tokens / sum(times), "state_mib": 0.0, "max_dscore": float("nan"),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}
        if sessions is not None:
            row["state_mib"] = sum(s.state.nbytes for s in sessions) / 2 ** 20
            row["max_dscore"] = max(abs(s.score.score - guard.score(s.text).score) for s in sessions)
        rows.append(row)
    return rows


def print_concurrent(rows: list[dict]) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(f"\nconcurrent streams: {r0['streams']} responses of ~{r0['tokens'] // r0['streams']} tokens, "
          f"{CHUNK}-char chunks, {r0['rounds']} rounds\n")
    header = (f"{'size':<5} {'implementation':<30} {'total s':>8} {'ms/round':>9} {'tokens/s':>9} "
              f"{'vs 1-by-1':>9} {'state MiB':>9} {'peak RSS MiB':>12} {'max|Δ|':>8}")
    print(header)
    print("-" * len(header))
    for size in dict.fromkeys(r["size"] for r in rows):
        group = [r for r in rows if r["size"] == size]
        single = next(r for r in group if r["impl"].startswith("sessions"))
        for r in group:
            print(f"{r['size']:<5} {r['impl']:<30} {r['total_s']:>8.2f} {r['round_ms']:>9.1f} {r['tok_s']:>9.0f} "
                  f"{single['total_s'] / r['total_s']:>8.1f}x {r['state_mib']:>9.1f} {r['peak_rss_mib']:>12.0f} "
                  f"{r['max_dscore']:>8.1e}")
        print(f"{size}: feed_batch is {single['total_s'] / group[0]['total_s']:.1f}x the one-by-one sessions "
              f"(target >= 3x at tiny)")
    print("max|Δ| = largest difference of a stream's last score from score(whole text); llm-siren runs "
          "some streams and is scaled to all (each stream costs the same).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "siren-bench"))
    parser.add_argument("--long", action="store_true", help="single-stream response of ~550 tokens")
    parser.add_argument("--skip-single", action="store_true")
    parser.add_argument("--skip-concurrent", action="store_true")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--reference-streams", type=int, default=1,
                        help="streams llm-siren runs in the concurrent table (scaled to all; 0 skips it)")
    args = parser.parse_args()
    response = RESPONSE + " " + " ".join(stream_texts(2)[1].split(" ")[:150]) if args.long else RESPONSE
    concurrent = []
    if not args.skip_concurrent:
        for size in args.sizes:
            concurrent += run_concurrent(size, Path(args.workdir), args.streams, args.reference_streams)
        print_concurrent(concurrent)
    if args.skip_single:
        return
    rows = []
    for size in args.sizes:
        rows += run_size(size, Path(args.workdir), response)
    print(f"\nsingle stream: {len(response)} chars fed in {CHUNK}-char chunks; CPU, fp32, random weights; "
          f"threads: {os.cpu_count()}\n")
    header = (f"{'size':<5} {'implementation':<27} {'tokens':>6} {'calls':>5} {'total s':>8} {'ms/call':>8} "
              f"{'first¼ ms':>9} {'last¼ ms':>9} {'speedup':>8} {'state KiB':>9} {'max|Δ|':>8}")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        group = [r for r in rows if r["size"] == size]
        slowest = {r["impl"]: r["total_s"] for r in group}
        for r in group:
            speed = f"{group[-1]['total_s'] / r['total_s']:.1f}x"
            print(f"{r['size']:<5} {r['impl']:<27} {r['tokens']:>6} {r['calls']:>5} {r['total_s']:>8.2f} "
                  f"{r['per_call_ms']:>8.1f} {r['first_q_ms']:>9.1f} {r['last_q_ms']:>9.1f} {speed:>8} "
                  f"{r['stream_kib']:>9.0f} {r['max_dscore']:>8.1e}")
        inc, own, ref = (slowest[k] for k in ("incremental (step graph)", "own full rescoring",
                                              "llm-siren score_streaming"))
        print(f"{size}: incremental is {ref / inc:.1f}x faster than llm-siren (target >= 10x) and "
              f"{own / inc:.1f}x faster than own full rescoring (target >= 20x at mid over ~550 tokens)")
    print("\nspeedup = llm-siren total / this total; max|Δ| = largest score difference from the incremental run.")


if __name__ == "__main__":
    main()

"""Streaming moderation cost: incremental step graph vs own full rescoring vs llm-siren.

A ~350-token response is fed in 12-character chunks; every call scores the whole prefix
(the same number three ways, checked here). Prints total and per-call time, memory per
stream, and per-call time against prefix length. Random weights; CPU.

    python benchmarks/streaming.py [--sizes tiny mid] [--workdir DIR]
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


def run_size(size: str, workdir: Path) -> list[dict]:
    import torch
    from siren_guard import SirenGuard as ReferenceGuard
    from siren_runtime import SirenGuard

    artifact, bundle = build(size, workdir)
    steps = prefixes(RESPONSE, CHUNK)
    incremental = SirenGuard.from_pretrained(bundle, device="cpu")
    rescoring = SirenGuard.from_pretrained(bundle, device="cpu", incremental_streaming=False)
    reference = ReferenceGuard.from_pretrained(str(artifact), device="cpu", dtype=torch.float32)
    n_tokens = len(incremental._encoder.token_ids([RESPONSE])[0])
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
    state_bytes = max(s.nbytes for s in incremental.stream_cache._states.values())
    for row in rows:
        row["tokens"] = n_tokens
        row["stream_kib"] = state_bytes / 1024 if row["impl"].startswith("incremental") else 0.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "siren-bench"))
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        rows += run_size(size, Path(args.workdir))
    print(f"\nresponse: {len(RESPONSE)} chars fed in {CHUNK}-char chunks; CPU, fp32, random weights; "
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
              f"{own / inc:.1f}x faster than own full rescoring (target >= 5x)")
    print("\nspeedup = llm-siren total / this total; max|Δ| = largest score difference from the incremental run.")


if __name__ == "__main__":
    main()

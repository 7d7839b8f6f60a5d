"""A stream feed costs what its delta costs, not what the stream holds (issue 21, break 5).

One bundle (tiny random Qwen3, max_length 1024, fp32, ONNX Runtime CPU), one run:
  - 1 MB deltas into one session: the 1st feed vs the 40th (40 MB held);
  - 12-character feeds before max_length is reached: feeds 1-100 vs 201-300 (each runs the
    step graph; attention over the past grows, the text handling must not);
  - 3-character feeds past max_length: feeds 1-2000 vs 2001-4000, and after 40 MB held;
  - with --http, over `siren serve`: a 3-byte feed's latency (a stream not yet at max_length)
    alone vs while another client opens sessions and feeds each a first 1 MB delta, back to
    back (every feed shares the server's feeder).

    python benchmarks/feed_cost.py [--workdir DIR] [--http]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _models import build  # noqa: E402
from siren_export.bench import cpu_isa  # noqa: E402

WORDS = "The quick brown fox jumps over the lazy dog; then it asks how to sharpen a knife. "


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def in_process(bundle: Path) -> list[tuple]:
    from siren_runtime import SirenGuard
    guard = SirenGuard.from_pretrained(bundle, device="cpu")
    rows = []
    megabyte = (WORDS * (1 + (1 << 20) // len(WORDS)))[:1 << 20]
    big = guard.stream(keep_text=False)
    times = [timed(lambda: big.feed(megabyte)) for _ in range(40)]
    rows.append(("1 MB delta: feed 1 vs feed 40 (s)", times[0], times[39]))
    assert big.final and abs(big.score.score - guard.score(megabyte * 2).score) <= 1e-5

    small = guard.stream(keep_text=False)
    chunks = [WORDS[i % len(WORDS):][:12] or WORDS[:12] for i in range(0, 12 * 300, 12)]
    per = [timed(lambda c=c: small.feed(c)) for c in chunks]
    rows.append(("12-char feeds before max_length: mean of 1-100 vs 201-300 (ms)",
                 1e3 * statistics.mean(per[:100]), 1e3 * statistics.mean(per[200:300])))

    tiny = guard.stream(keep_text=False)
    tiny.feed(WORDS * 60)            # past 1024 tokens
    first = timed(lambda: [tiny.feed("ab ") for _ in range(2000)])
    second = timed(lambda: [tiny.feed("ab ") for _ in range(2000)])
    rows.append(("3-char feeds past max_length: 2000 feeds, then the next 2000 (s)", first, second))
    after = timed(lambda: [big.feed("ab ") for _ in range(2000)])
    rows.append(("3-char feeds: 2000 after 4 KB held vs after 40 MB held (s)", first, after))
    guard.close()
    return rows


def over_http(bundle: Path) -> list[tuple]:
    import httpx
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_process import ServeProcess
    rows = []
    with ServeProcess(bundle, "--max-body-bytes", str(2 << 20)) as server:
        def small_latencies(count: int) -> list[float]:
            with httpx.Client(timeout=60) as client:
                sid = client.post(server.url + "/v1/streams", json={}).json()["id"]
                client.post(f"{server.url}/v1/streams/{sid}", json={"delta": WORDS * 3})
                out = []
                for _ in range(count):
                    out.append(timed(lambda: client.post(f"{server.url}/v1/streams/{sid}", json={"delta": "ab "})))
                return out
        alone = small_latencies(50)
        stop = threading.Event()

        def flood():
            megabyte = (WORDS * (1 + (1 << 20) // len(WORDS)))[:1 << 20]
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():     # a new session each time: its first 1 MB is the costly one
                    sid = client.post(server.url + "/v1/streams", json={}).json()["id"]
                    client.post(f"{server.url}/v1/streams/{sid}", json={"delta": megabyte})
                    client.delete(f"{server.url}/v1/streams/{sid}")
        thread = threading.Thread(target=flood)
        thread.start()
        time.sleep(0.5)
        try:
            contended = small_latencies(50)
        finally:
            stop.set()
            thread.join()
    rows.append(("HTTP 3-byte feed p50, alone vs beside 1 MB feeds (ms)",
                 1e3 * statistics.median(alone), 1e3 * statistics.median(contended)))
    rows.append(("HTTP 3-byte feed max, alone vs beside 1 MB feeds (ms)", 1e3 * max(alone), 1e3 * max(contended)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the tiny bundle is built (default: a temporary folder)")
    parser.add_argument("--http", action="store_true", help="also measure over siren serve")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="siren-feed-cost-"))
    _, bundle = build("tiny", workdir, max_length=1024)
    rows = in_process(bundle)
    if args.http:
        rows += over_http(bundle)
    print(f"CPU: {cpu_isa()}, {os.cpu_count()} cores; tiny Qwen3, max_length 1024, fp32, ONNX Runtime CPU")
    print(f"| {'measure':<66} | {'first':>9} | {'later':>9} | later/first |")
    print(f"|{'-' * 68}|{'-' * 11}|{'-' * 11}|{'-' * 13}|")
    for name, a, b in rows:
        print(f"| {name:<66} | {a:9.4f} | {b:9.4f} | {b / a if a else float('nan'):11.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

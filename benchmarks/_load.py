"""One load generator for the server benchmarks: N threads, each with its own client (HTTP
clients are not thread-safe), sending single-text requests; req/s and p50/p95 latency."""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

TEXTS = [f"request {i}: " + "tell me about " * (i % 12) + ("chemistry" if i % 3 else "cooking") for i in range(64)]


def run_clients(open_client: Callable[[], object], send: Callable[[object, str], None], concurrency: int,
                requests: int) -> dict:
    latencies, errors = [], []

    def worker(w: int) -> None:
        client = open_client()
        for n in range(requests // concurrency):
            t0 = time.perf_counter()
            try:
                send(client, TEXTS[(w * 13 + n) % len(TEXTS)])
                latencies.append(time.perf_counter() - t0)
            except Exception as e:   # counted in the table
                errors.append(e)
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ordered = sorted(latencies)
    return {"rps": len(ordered) / wall, "p50_ms": 1e3 * statistics.median(ordered),
            "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))], "errors": len(errors), "n": len(ordered)}

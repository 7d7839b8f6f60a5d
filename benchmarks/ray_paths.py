"""The Ray paths next to the one-process paths on the same machine, bundle and inputs:
`siren score-corpus` (Ray Data, 1 and 2 actors) vs `siren score --input`, and
`siren serve-ray` (1 and 2 replicas) vs `siren serve`, in one run, one table.

    python benchmarks/ray_paths.py [--size mid] [--rows 6000] [--requests 640]

Corpus rows: end-to-end wall time (process start, Ray start, guard load, scoring, output)
and steady throughput (rows after the first answer / time from the first answer to the
last: what a long corpus sees). Serve rows: single-text POST /v1/moderations at
concurrency 8 and 32, dynamic batching on (max batch 16). Needs the ray extra.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")      # the local cluster on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _models import build  # noqa: E402
from serve_load import run_serve_load  # noqa: E402
from serve_process import ServeProcess, free_port  # noqa: E402

SIREN = [sys.executable, "-m", "siren_cli"]
WORDS = ("the committee reviewed how to make a bomb weather nice today kill people cook pasta hack bank "
         "account please help write poem about spring budget timeline staffing risk").split()


def write_corpus(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as out:
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 80)))
            out.write(json.dumps({"id": i, "text": text}) + "\n")


def time_siren_score(bundle: Path, corpus: Path, rows: int) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen([*SIREN, "score", str(bundle), "--input", str(corpus), "--json", "-q"],
                            stdout=subprocess.PIPE, text=True)
    first = last = None
    count = 0
    for _ in proc.stdout:
        last = time.perf_counter()
        first = first or last
        count += 1
    assert proc.wait() == 0 and count == rows
    return {"wall": time.perf_counter() - started, "steady": (count - 1) / (last - first)}


def time_score_corpus(bundle: Path, corpus: Path, rows: int, out: Path, actors: int, cpus: int) -> dict:
    started = time.perf_counter()
    shard = max(10, rows // 12)        # enough parts that every actor stays busy to the end
    subprocess.run([*SIREN, "score-corpus", str(bundle), str(corpus), "-o", str(out), "--overwrite",
                    "--actors", str(actors), "--cpus-per-actor", str(cpus), "--rows-per-shard", str(shard), "-q"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    parts = sorted(out.glob("part-*"), key=lambda p: p.stat().st_mtime)
    first, last = parts[0].stat().st_mtime, parts[-1].stat().st_mtime
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["rows"] == rows
    return {"wall": wall, "steady": (rows - shard) / (last - first)}


class RayServe:
    """`siren serve-ray` on a local cluster of its own, until SIGINT."""

    def __init__(self, bundle: Path, replicas: int, cpus: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*SIREN, "serve-ray", str(bundle), "--port", str(self.port), "--replicas", str(replicas),
                     "--cpus-per-replica", str(cpus), "--intra-op-threads", str(cpus), "--max-batch", "16"]
        self.log = log

    def __enter__(self):
        import httpx
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("serve-ray did not become healthy")

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid", choices=["tiny", "mid", "qwen3-0.6b"])
    parser.add_argument("--bundle", help="use this bundle instead of a random benchmark model")
    parser.add_argument("--rows", type=int, default=6000, help="corpus rows (default 6000)")
    parser.add_argument("--requests", type=int, default=640, help="requests per serve row (default 640)")
    parser.add_argument("--only", choices=["corpus", "serve"], help="run one half")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "siren-bench"))
    args = parser.parse_args()
    bundle = Path(args.bundle) if args.bundle else build(args.size, Path(args.workdir), max_length=512)[1]
    work = Path(tempfile.mkdtemp(prefix="siren-ray-bench-"))
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, args.rows)
    cores = os.cpu_count() or 1

    corpus_rows, serve_rows = [], []
    if args.only != "serve":
        corpus_rows.append(("siren score --input (one process)", time_siren_score(bundle, corpus, args.rows)))
        corpus_rows.append((f"siren score-corpus, 1 actor x {cores} CPUs",
                            time_score_corpus(bundle, corpus, args.rows, work / "out1", 1, cores)))
        if cores >= 2:
            corpus_rows.append((f"siren score-corpus, 2 actors x {cores // 2} CPU",
                                time_score_corpus(bundle, corpus, args.rows, work / "out2", 2, cores // 2)))
    if args.only != "corpus":
        serve_rows = serve_benchmark(bundle, args.requests, cores, work)
    report(bundle, args, cores, corpus_rows, serve_rows)


def serve_benchmark(bundle: Path, requests: int, cores: int, work: Path) -> list:
    serve_rows = []
    with ServeProcess(bundle, "--max-batch", "16", "-q") as server:
        run_serve_load(server.url, 8, 64)                                   # warm-up
        serve_rows.append(("siren serve (one process)", {c: run_serve_load(server.url, c, requests)
                                                         for c in (8, 32)}))
    for replicas in ((1, 2) if cores >= 2 else (1,)):
        with RayServe(bundle, replicas, max(1, cores // replicas), work / f"serve-ray-{replicas}.log") as app:
            run_serve_load(app.url, 8, 64)
            serve_rows.append((f"siren serve-ray, {replicas} replica(s) x {max(1, cores // replicas)} CPU",
                               {c: run_serve_load(app.url, c, requests) for c in (8, 32)}))
    return serve_rows


def report(bundle: Path, args, cores: int, corpus_rows: list, serve_rows: list) -> None:
    from siren_export.bench import cpu_isa
    print(f"\nbundle: {bundle}; ONNX Runtime CPU; {cores} cores ({cpu_isa()}); corpus {args.rows} rows of "
          f"8-80 words\n")
    if corpus_rows:
        print_corpus(corpus_rows, args.rows)
    if serve_rows:
        print_serve(serve_rows, args.requests)


def print_corpus(corpus_rows: list, rows: int) -> None:
    base = corpus_rows[0][1]
    print("| corpus path | wall s | rows/s end to end | steady rows/s | x one process (steady) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in corpus_rows:
        print(f"| {name} | {r['wall']:.1f} | {rows / r['wall']:.1f} | {r['steady']:.1f} | "
              f"{r['steady'] / base['steady']:.2f}x |")


def print_serve(serve_rows: list, requests: int) -> None:
    one = serve_rows[0][1]
    print(f"\n{requests} single-text POST /v1/moderations per row, dynamic batching on (max batch 16)\n")
    print("| server | conc. | req/s | p50 ms | p95 ms | errors | x siren serve |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, by_c in serve_rows:
        for c, r in by_c.items():
            print(f"| {name} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['errors']} | "
                  f"{r['rps'] / one[c]['rps']:.2f}x |")


if __name__ == "__main__":
    main()

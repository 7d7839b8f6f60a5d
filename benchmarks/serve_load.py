"""`siren serve` next to Triton on the same bundle: requests/s and p50/p95 latency at
concurrency 1/8/32, each with dynamic batching on and off, one HTTP client per thread,
one text per request (the guard-in-front-of-a-chat-server pattern).

    python benchmarks/serve_load.py [--size tiny|mid] [--bundle DIR] [--requests N] [--no-triton]

siren serve: POST /v1/moderations. Triton: the python-scorer ensemble (`siren triton`),
TEXT -> SCORE. Needs the serve extra, and `make triton-server` for the Triton rows.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _load import run_clients  # noqa: E402
from _models import build  # noqa: E402
from serve_process import ServeProcess  # noqa: E402
from triton_load import _disable_batching  # noqa: E402
from triton_load import run_load as run_triton_load  # noqa: E402
from triton_server import TritonServer, server_binary  # noqa: E402

CONCURRENCY = (1, 8, 32)


def run_serve_load(url: str, concurrency: int, requests: int) -> dict:
    import httpx
    return run_clients(lambda: httpx.Client(base_url=url, timeout=60),
                       lambda client, text: client.post("/v1/moderations", json={"input": text}).raise_for_status(),
                       concurrency, requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid", choices=["tiny", "mid", "qwen3-0.6b"],
                        help="random benchmark model (default mid: 8 layers, 512 wide)")
    parser.add_argument("--bundle", help="serve this bundle instead")
    parser.add_argument("--requests", type=int, default=320, help="requests per row")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "siren-bench"))
    args = parser.parse_args()
    bundle = Path(args.bundle) if args.bundle else build(args.size, Path(args.workdir), max_length=512)[1]
    rows = []
    for batching in (True, False):
        options = ["--max-batch", "16", "--max-wait-ms", "2"] + ([] if batching else ["--no-batching"])
        with ServeProcess(bundle, *options) as server:
            run_serve_load(server.url, 8, 64)                       # warm-up
            for c in CONCURRENCY:
                rows.append(("siren serve", batching, c, run_serve_load(server.url, c, args.requests)))
    if not args.no_triton and server_binary().is_file():
        from siren_serving.triton_repo import write_repository
        for batching in (True, False):
            repo = Path(tempfile.mkdtemp(prefix="siren-triton-repo-")) / "repo"
            write_repository(bundle, repo, scorer="python", max_batch=16)
            if not batching:
                _disable_batching(repo)
            with TritonServer(repo) as server:
                run_triton_load(server, 8, 64)                      # warm-up
                for c in CONCURRENCY:
                    rows.append(("Triton 2.51", batching, c, run_triton_load(server, c, args.requests)))
            shutil.rmtree(repo.parent, ignore_errors=True)
    print(f"\nbundle: {bundle}; ONNX Runtime CPU; {args.requests} single-text requests per row, "
          f"one HTTP client per thread\n")
    print("| server | dynamic batching | concurrency | req/s | p50 ms | p95 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, batching, c, r in rows:
        print(f"| {name} | {'on' if batching else 'off'} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['errors']} |")


if __name__ == "__main__":
    main()

"""Load against a local tritonserver serving the CPU (python-scorer) repository.

Requests/s and p50/p95 latency at concurrency 1/4/8, with the dynamic batcher on and off,
one HTTP client per thread. Needs `make triton-server` (or SIREN_TRITON_HOME).

    python benchmarks/triton_load.py [--bundle DIR] [--requests N]
"""
from __future__ import annotations

import argparse
import os
import re
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
from triton_server import TritonServer  # noqa: E402



def _disable_batching(repo: Path) -> None:
    for model in ("siren_tokenizer", "siren_scorer"):
        path = repo / model / "config.pbtxt"
        text = re.sub(r"dynamic_batching \{[^}]*\}\n", "", path.read_text())
        path.write_text(text)


def run_load(server: TritonServer, concurrency: int, requests: int) -> dict:
    import numpy as np
    import tritonclient.http as httpclient

    def send(client, text: str) -> None:
        tensor = httpclient.InferInput("TEXT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        client.infer("siren_guard", [tensor])
    return run_clients(lambda: httpclient.InferenceServerClient(server.http_url), send, concurrency, requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle to serve (default: the tiny random benchmark model)")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "siren-bench"))
    args = parser.parse_args()
    from siren_serving.triton_repo import write_repository
    bundle = Path(args.bundle) if args.bundle else build("tiny", Path(args.workdir))[1]
    rows = []
    for batching in (True, False):
        repo = Path(tempfile.mkdtemp(prefix="siren-triton-repo-")) / "repo"
        write_repository(bundle, repo, scorer="python", max_batch=16)
        if not batching:
            _disable_batching(repo)
        with TritonServer(repo) as server:
            run_load(server, 4, 40)  # warm-up
            for concurrency in (1, 4, 8):
                rows.append({"batching": batching, "concurrency": concurrency,
                             **run_load(server, concurrency, args.requests)})
        shutil.rmtree(repo.parent, ignore_errors=True)
    print(f"\nbundle: {bundle}; python scorer on CPU; {args.requests} requests per row, one HTTP client per thread\n")
    print(f"{'dynamic batching':<17} {'concurrency':>11} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}")
    for r in rows:
        print(f"{'on' if r['batching'] else 'off':<17} {r['concurrency']:>11} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} "
              f"{r['p95_ms']:>8.1f} {r['errors']:>6}")


if __name__ == "__main__":
    main()

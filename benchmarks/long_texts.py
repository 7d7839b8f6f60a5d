"""Long texts cost what their first max_length tokens cost (issue 38, findings 4 and 5).

One tiny bundle (max_length 1024, fp32, ONNX Runtime CPU); every measurement in a fresh
process so its peak RSS is its own:
  - score() of a 4 MB text, with and without an unclosed `<` early in it;
  - a stream fed 300 kB at a time (8 feeds), with and without an early `<`: seconds per feed;
  - score_prefixes (what `siren score --onset` runs) of a 50 MB line vs plain score() of it.
With --baseline REV the same runs use that commit's runtime too (its own export of the same
model), side by side.

    python benchmarks/long_texts.py [--baseline REV] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROBE = r'''
import json, random, resource, sys, time
from siren_runtime import SirenGuard
kind, bundle = sys.argv[1], sys.argv[2]
guard = SirenGuard.from_pretrained(bundle, device="cpu")
rng = random.Random(0)
words = "the cat sat on a mat and then it ran away quickly".split()
def body(chars):
    return " ".join(rng.choice(words) for _ in range(chars // 4))[:chars]
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {}
if kind in ("score-4mb", "score-4mb-lt"):
    text = ("if a < b then " if kind.endswith("lt") else "so a is b then ") + body(4_000_000)
    t = time.perf_counter(); guard.score(text); out["seconds"] = time.perf_counter() - t
elif kind in ("stream", "stream-lt"):
    session = guard.stream()
    session.feed("if a < b then " if kind.endswith("lt") else "so a is b then ")
    piece, feeds = body(300_000), []
    for _ in range(int(sys.argv[3])):
        t = time.perf_counter(); session.feed(piece); feeds.append(time.perf_counter() - t)
    out["feeds"] = feeds
    out["final"] = bool(getattr(session, "final", False))
elif kind in ("onset-50mb", "score-50mb"):
    text = body(50_000_000)
    t = time.perf_counter()
    guard.score_prefixes(text) if kind == "onset-50mb" else guard.score(text)
    out["seconds"] = time.perf_counter() - t
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["load_peak_mib"] = start
print(json.dumps(out))
'''


def probe(env: dict, kind: str, bundle: Path, *extra: str) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, kind, str(bundle), *extra], env=env, capture_output=True,
                         text=True, cwd=tempfile.gettempdir())
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    import compare
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="also run this commit's runtime (its own export)")
    parser.add_argument("--baseline-feeds", type=int, default=4, help="300 kB feeds for the baseline (default 4)")
    parser.add_argument("--workdir", help="default: $TMPDIR/siren-long-texts")
    args = parser.parse_args()
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "siren-long-texts")
    workdir.mkdir(parents=True, exist_ok=True)
    sides = {"current": compare.side_env(compare._import_root(compare.REPO, workdir / "import-current"))}
    if args.baseline:
        commit, source = compare.checkout(args.baseline, workdir)
        sides[f"baseline {commit[:12]}"] = compare.side_env(compare._import_root(source, workdir / f"import-{commit[:12]}"))
    artifact = compare.build_source_model("tiny", workdir)
    print(f"# {compare.isa()}; load average {os.getloadavg()[0]:.2f}")
    for side, env in sides.items():
        tag = "current-" + compare.tree_digest() if side == "current" else side.split()[1]
        bundle = compare.export_with(side, env, artifact, workdir / f"bundle-tiny-{tag}" / "bundle")
        feeds = "8" if side == "current" else str(args.baseline_feeds)
        rows = {kind: probe(env, kind, bundle, *([feeds] if kind.startswith("stream") else []))
                for kind in ("score-4mb", "score-4mb-lt", "stream", "stream-lt", "score-50mb", "onset-50mb")}
        print(f"\n## {side}\n")
        print("| run | seconds | peak RSS MiB (after load) |")
        print("|---|---:|---:|")
        for kind, row in rows.items():
            if "error" in row:
                print(f"| {kind} | error: {row['error'][:80]} | |")
                continue
            seconds = (" / ".join(f"{s:.2f}" for s in row["feeds"]) + (" (final)" if row.get("final") else "")
                       if "feeds" in row else f"{row['seconds']:.2f}")
            print(f"| {kind} | {seconds} | {row['peak_mib']:.0f} ({row['load_peak_mib']:.0f}) |")


if __name__ == "__main__":
    main()

"""`siren bench`: this runtime against llm-siren on the same weights, same texts, same run.

Each side runs in its own fresh process so peak RSS and import time are its own: the
runtime's process cannot import torch or transformers at all. With `--breakdown`, the
reference process also runs the exported torch module (truncated, no LM head) padded to
the longest text and then padding-aware, which splits the gain into truncation/LM head,
batching, and the engine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
from typing import Optional

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or had not "
         "but have one they all there been she their has who more when will would can if into some time "
         "only other new about two what could water people also first after way many most made over did "
         "down years because through where just any much same those very well back good how should long "
         "little world under great while might state never system city during without again place house "
         "number point country different since began group public form thought school course").split()


def default_texts(count: int = 12, min_words: int = 4, max_words: int = 160, seed: int = 0) -> list[str]:
    """Deterministic texts of evenly spread lengths (4 to 160 words by default)."""
    rng = random.Random(seed)
    sizes = [round(min_words + (max_words - min_words) * i / max(count - 1, 1)) for i in range(count)]
    rng.shuffle(sizes)
    return [" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "." for n in sizes]


def cpu_isa() -> str:
    """The vector ISA that decides CPU figures here (AVX2 / AVX-512 / VNNI), from /proc/cpuinfo."""
    from siren_runtime.cpu_features import cpu_flags
    flags = cpu_flags()
    has = [name for name, flag in (("AVX-512", "avx512f"), ("VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"),
                                   ("AVX2", "avx2")) if flag in flags]
    return "/".join(has) or "unknown"


# The worker measures one implementation in a fresh process and prints JSON.
_WORKER = r'''
import json, resource, sys, time
spec = json.loads(sys.stdin.read())
if spec["side"] == "runtime":
    import importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(name + " is blocked in the runtime benchmark process")
    sys.meta_path.insert(0, _Block())
t0 = time.perf_counter()
if spec["side"] == "runtime":
    import siren_runtime
else:
    import torch, siren_guard
import_s = time.perf_counter() - t0
texts, repeat = spec["texts"], spec["repeat"]

def measure(score_batch, score_one):
    score_batch(texts); score_one(texts[0])                           # warm-up
    batch_times = []
    for _ in range(repeat):
        t = time.perf_counter(); scores = score_batch(texts); batch_times.append(time.perf_counter() - t)
    single = []
    for _ in range(repeat):
        for text in texts:
            t = time.perf_counter(); score_one(text); single.append(time.perf_counter() - t)
    return scores, batch_times, single

out = {"import_s": import_s, "variants": {}}
runs = spec.get("kind") == "trajectory"       # an Agent-SIREN bundle: the items are agent runs
t0 = time.perf_counter()
if spec["side"] == "runtime":
    options = {"prepack_weights": False} if spec.get("prepack") else {}
    guard = siren_runtime.load_guard(spec["bundle"], device="cpu", backend=spec.get("backend"), **options)
    out["load_s"] = time.perf_counter() - t0
    out["tokens"] = sum(len(guard.token_ids(t)) for t in texts)
    batch = lambda ts: [r.score for r in guard.score_batch(ts)]
    one = (lambda t: guard.score_trajectory(messages=t["messages"], tools=t["tools"]).score) if runs else (
        lambda t: guard.score(t).score)
    coding = guard.runners.score.int8_coding or (
        "u8 x u8" if spec.get("label") == "int8-dynamic" else None)
    out["variants"]["siren_runtime " + spec.get("label", "") + (" " + coding if coding else "")
                    + (" in place (no pre-packing)" if spec.get("prepack") else "") + " (" + guard.backend + ")"] = measure(batch, one)
    if guard.incremental_streaming and runs:    # a run appended message by message
        session, feeds = guard.session(tools=texts[1]["tools"]), []
        for message in texts[1]["messages"]:
            t = time.perf_counter(); session.append(message); feeds.append(time.perf_counter() - t)
        out["feed_ms"] = 1e3 * sorted(feeds)[len(feeds) // 2]
    elif guard.incremental_streaming:     # a few feeds of a stream: the step graph is part of the footprint
        session, feeds = guard.stream(), []
        for i in range(0, min(len(texts[1]), 12 * 8), 12):
            t = time.perf_counter(); session.feed(texts[1][i:i + 12]); feeds.append(time.perf_counter() - t)
        out["feed_ms"] = 1e3 * sorted(feeds)[len(feeds) // 2]
elif runs:
    torch.set_grad_enabled(False)
    ref = siren_guard.AgentSirenGuard.from_pretrained(spec["artifact"], device="cpu", dtype=torch.float32)
    out["load_s"] = time.perf_counter() - t0
    run_of = lambda t: siren_guard.from_openai(t["messages"], t["tools"])
    batch = lambda ts: [r.score for r in ref.score_batch([run_of(t) for t in ts])]
    one = lambda t: ref.score_trajectory(run_of(t)).score
    out["variants"]["llm-siren AgentSirenGuard (torch)"] = measure(batch, one)
else:
    torch.set_grad_enabled(False)
    ref = siren_guard.SirenGuard.from_pretrained(spec["artifact"], device="cpu", dtype=torch.float32)
    out["load_s"] = time.perf_counter() - t0
    batch = lambda ts: [r.score for r in ref.score_batch(ts)]
    one = lambda t: ref.score(t).score
    out["variants"]["llm-siren (torch)"] = measure(batch, one)
    if spec.get("breakdown"):
        import numpy as np
        from siren_export.artifact import load_artifact
        from siren_export.backbone import load_backbone
        from siren_export.scorer import SirenScorer
        from siren_runtime.batching import length_groups
        from siren_runtime.text import clean_text
        from siren_runtime.tokenization import TextEncoder
        art = load_artifact(spec["artifact"])
        loaded = load_backbone(art.base_model_id, art.base_model_revision, art.deepest_layer + 1)
        module = SirenScorer(loaded.model, loaded.num_layers, art).eval()
        enc = TextEncoder(spec["bundle"] + "/tokenizer.json", art.max_length,
                          loaded.tokenizer.pad_token_id)
        def run_groups(ts, grouped):
            ids = enc.token_ids([clean_text(t) for t in ts])
            groups = (length_groups([len(i) for i in ids], 32, 16384, 0.25) if grouped
                      else [list(range(len(ids)))])
            scores = [0.0] * len(ids)
            for g in groups:
                a, m = enc.pad([ids[i] for i in g])
                s = module(torch.from_numpy(a), torch.from_numpy(m))[0].tolist()
                for i, v in zip(g, s):
                    scores[i] = v
            return scores
        out["variants"]["torch, truncated, no LM head"] = measure(lambda ts: run_groups(ts, False),
                                                                   lambda t: run_groups([t], False)[0])
        out["variants"]["torch, truncated + length groups"] = measure(lambda ts: run_groups(ts, True),
                                                                       lambda t: run_groups([t], True)[0])
def status_mb(field):
    # /proc/self/status: VmHWM is this process's own high-water mark (ru_maxrss inherits the
    # parent's across fork), VmRSS what it holds now
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["peak_rss_mb"] = status_mb("VmHWM")
out["steady_rss_mb"] = status_mb("VmRSS")
print(json.dumps(out))
'''


def _run_worker(spec: dict, env: Optional[dict] = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", _WORKER], input=json.dumps(spec), capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}, nothing on stderr"
        raise RuntimeError(f"{spec['side']} benchmark process failed: {last}\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _label(bundle: str) -> str:
    """fp32 / bf16 / int8-dynamic ...: what a bundle computes with, from its manifest."""
    from siren_runtime.bundle import read_bundle
    manifest = read_bundle(bundle).manifest
    quant = manifest.get("quantization")
    return f"int8-{quant['scheme']}" if quant else manifest["model"].get("dtype", "fp32")


def _codings(bundle: str) -> list:
    """The environments an int8 bundle is measured in: where this CPU loads its u8 x s8 twin
    (VNNI), also with the stored u8 x u8 coding, side by side in the same run."""
    from siren_runtime.bundle import read_bundle
    from siren_runtime.cpu_features import CODING_ENV, exact_u8s8
    if read_bundle(bundle).signed_twin is None or not exact_u8s8():
        return [None]
    return [None, {CODING_ENV: "u8u8"}]


def _weights_mb(bundle: str) -> float:
    """The scoring graph's weights file (what both graphs read), MiB."""
    from siren_runtime.bundle import read_bundle
    b = read_bundle(bundle)
    rel = b.model.external_data or b.model.path
    return b.files[rel].bytes / 2 ** 20


def _bundle_mb(bundle: str) -> float:
    from siren_runtime.bundle import read_bundle
    return sum(r.bytes for r in read_bundle(bundle).files.values()) / 1e6


def run_bench(bundle: str, reference: Optional[str] = None, texts_file: Optional[str] = None,
              batch: Optional[int] = None, repeat: int = 3, breakdown: bool = False,
              backend: Optional[str] = None, also: Optional[list] = None, prepack: bool = False) -> list[dict]:
    """`also`: more bundles of the same artifact (int8, bf16 ...) measured in the same run;
    `prepack`: each runtime bundle also with ``prepack_weights=False`` (weights read in place)."""
    if reference is not None and importlib.util.find_spec("siren_guard") is None:
        raise ModuleNotFoundError("--reference runs llm-siren, which is not installed here: "
                                  "pip install llm-siren==0.2.0 (or drop --reference)", name="siren_guard")
    from siren_runtime.bundle import read_bundle
    kind = read_bundle(bundle).guard.kind
    if kind == "trajectory" and breakdown:
        raise ValueError("--breakdown splits a content guard's gain (truncation, batching, engine); a trajectory "
                         "bundle is benchmarked without it")
    if texts_file:
        from siren_quantize.gate import read_texts
        texts = read_texts(texts_file, kind)          # a trajectory bundle's: JSON Lines agent runs
    else:
        from siren_runtime.calibration import agent_runs
        texts = agent_runs(default_texts()) if kind == "trajectory" else default_texts()
    if batch:
        texts = (texts * (batch // len(texts) + 1))[:batch]
    spec = {"bundle": str(bundle), "artifact": reference, "texts": texts, "repeat": repeat,
            "breakdown": breakdown, "backend": backend, "kind": kind}
    bundles = [str(bundle)] + [str(b) for b in (also or [])]
    sides = [(b, _run_worker({**spec, "bundle": b, "label": _label(b), "side": "runtime", "prepack": p}, env))
             for b in bundles for p in ((False, True) if prepack else (False,)) for env in _codings(b)]
    if reference:
        sides.insert(0, (None, _run_worker({**spec, "side": "reference"})))
    tokens = sides[-1][1]["tokens"]
    rows, reference_scores = [], None
    for source, side in sides:
        for name, (scores, batch_times, single) in side["variants"].items():
            reference_scores = reference_scores or scores
            best = min(batch_times)
            diffs = [abs(a - b) for a, b in zip(scores, reference_scores)]
            agree = {t: sum((a >= t) == (b >= t) for a, b in zip(scores, reference_scores)) / len(scores)
                     for t in (0.1, 0.5, 0.9)}
            rows.append({
                "bundle_mb": _bundle_mb(source) if source else None, "mean_dscore": sum(diffs) / len(diffs),
                "agreement": agree,
                "implementation": name, "texts_per_s": len(texts) / best, "tokens_per_s": tokens / best,
                "batch_s": best, "p50_ms": 1e3 * statistics.median(single), "p95_ms": 1e3 * _pct(single, 0.95),
                "peak_rss_mb": side["peak_rss_mb"], "import_s": side["import_s"], "load_s": side["load_s"],
                "steady_rss_mb": side["steady_rss_mb"], "feed_ms": side.get("feed_ms"),
                "weights_mb": _weights_mb(source) if source else None,
                "max_dscore": max(diffs),
            })
    return rows, texts, tokens


def size_mb(row: dict) -> str:
    return f"{row['bundle_mb']:.0f}" if row.get("bundle_mb") else "-"


def format_table(rows: list[dict], texts: list[str], tokens: int) -> str:
    base = rows[0]
    words = [len(t.split()) if isinstance(t, str) else sum(len(str(m.get("content") or "").split())
                                                            for m in t["messages"]) for t in texts]
    what = "texts" if isinstance(texts[0], str) else "agent runs"
    lines = [f"{len(texts)} {what}, {min(words)}-{max(words)} words, {tokens} tokens; best of repeats; "
             f"CPU ({cpu_isa()}, {os.cpu_count()} cores)",
             "", f"{'implementation':<44} {'texts/s':>8} {'tokens/s':>9} {'x thrpt':>7} {'p50 ms':>8} "
                 f"{'p95 ms':>8} {'x p50':>6} {'feed ms':>7} {'load s':>6} {'steady MiB':>10} {'peak MiB':>8} "
                 f"{'x weights':>9} {'x ref peak':>10} {'import s':>8} {'max|Δ|':>8} {'mean|Δ|':>8} "
                 f"{'agree .1/.5/.9':>15} {'bundle MB':>9}"]
    lines.append("-" * len(lines[-1]))
    reference = next((r for r in rows if r["implementation"].startswith("llm-siren")), None)
    for r in rows:
        weights = f"{r['peak_rss_mb'] / r['weights_mb']:.2f}x" if r.get("weights_mb") else "-"
        vs_ref = f"{r['peak_rss_mb'] / reference['peak_rss_mb']:.2f}x" if reference else "-"
        feed = f"{r['feed_ms']:.0f}" if r.get("feed_ms") else "-"
        lines.append(f"{r['implementation']:<44} {r['texts_per_s']:>8.2f} {r['tokens_per_s']:>9.0f} "
                     f"{r['texts_per_s'] / base['texts_per_s']:>6.2f}x {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
                     f"{base['p50_ms'] / r['p50_ms']:>5.2f}x {feed:>7} {r['load_s']:>6.1f} {r['steady_rss_mb']:>10.0f} "
                     f"{r['peak_rss_mb']:>8.0f} {weights:>9} {vs_ref:>10} {r['import_s']:>8.2f} "
                     f"{r['max_dscore']:>8.1e} {r['mean_dscore']:>8.1e} "
                     f"{'/'.join(f'{a * 100:.0f}' for a in r['agreement'].values()):>15} "
                     f"{size_mb(r):>9}")
    lines.append("")
    lines.append(f"x thrpt / x p50: relative to {base['implementation']}; RSS, load and import time are per process "
                 "(torch variants share the llm-siren process); runtime rows load the guard with from_pretrained's "
                 "defaults (on a CPU one pre-packed session of the step graph), score, then "
                 + ("append a run message by message" if what == "agent runs" else "feed a stream 12 characters at a time")
                 + " (feed ms: median); steady: RSS at the end; x weights: peak over the weights file; x ref peak: "
                 "peak over llm-siren's.")
    return "\n".join(lines)

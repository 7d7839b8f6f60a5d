"""Helpers shared by the test modules: the fp32 tolerance against llm-siren, and guards
built from injected runners (fakes go in through the constructor, never by patching)."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np

#: fp32 scores agree with llm-siren (and with each other across paths) within this
TOL = 1e-5


def guard_with(bundle_dir, wrap_score=None, wrap_step=None, device="cpu", **guard_options):
    """A SirenGuard on `bundle_dir` whose runners are wrapped by the given callables."""
    from siren_runtime import SirenGuard
    from siren_runtime.backends import open_runners
    from siren_runtime.guard import DEFAULT_STREAM_CACHE, DEFAULT_STREAM_CACHE_BYTES
    from siren_runtime.bundle import read_bundle
    from siren_runtime.streaming import StreamCache

    bundle = read_bundle(bundle_dir)
    bundle.verify()
    cache_options = {k: guard_options.pop(k) for k in ("stream_cache_size", "stream_cache_bytes")
                     if k in guard_options}
    runners = open_runners(bundle, device=device)
    if wrap_score is not None:
        runners.score = wrap_score(runners.score)
    if wrap_step is not None and runners.step is not None:
        runners.step = wrap_step(runners.step)
    cache = StreamCache(cache_options.get("stream_cache_size", DEFAULT_STREAM_CACHE),
                        cache_options.get("stream_cache_bytes", DEFAULT_STREAM_CACHE_BYTES))
    return SirenGuard(bundle, runners, stream_cache=cache, **guard_options)


def chunk(text, sizes):
    """`text` cut into pieces of the given sizes (the rest as one last piece)."""
    out, i = [], 0
    for size in sizes:
        if i >= len(text):
            break
        out.append(text[i:i + size])
        i += size
    if i < len(text):
        out.append(text[i:])
    return out


def random_chunks(text, rng: random.Random, low=1, high=9):
    return chunk(text, [rng.randint(low, high) for _ in range(len(text))])


def once(done: Path, build) -> None:
    """Run `build()` unless `done` exists, then create it: under one lock, so concurrent test
    workers (pytest-xdist) build a shared fixture once and the others wait for it."""
    import fcntl
    done = Path(done)
    done.parent.mkdir(parents=True, exist_ok=True)
    with open(str(done) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            build()
            done.touch()


def build_trajectory_bundle(root, template, llama=False, blocks=3, layers=4, max_length=128, seed=11):
    """A tiny random Qwen3 (or Llama-3) backbone with `template`, an Agent-SIREN head on it, its
    bundle (built once per `root`), and llm-siren's AgentSirenGuard (fp32) on the same weights
    -> (bundle, reference)."""
    import torch
    from siren_guard import AgentSirenGuard as Reference

    def build():
        from siren_export.pipeline import export_bundle
        from siren_export.synthetic import make_backbone, make_llama_backbone, make_trajectory_head, set_chat_template
        if llama:
            backbone = make_llama_backbone(root / "backbone", num_layers=layers, hidden_size=64, intermediate_size=128,
                                           num_heads=4, num_kv_heads=1, head_dim=16, seed=seed)
        else:
            backbone = make_backbone(root / "backbone", num_layers=layers, hidden_size=64, intermediate_size=128,
                                     num_heads=4, num_kv_heads=2, head_dim=16, seed=seed,
                                     tokenizer_cache=root.parent / "qwen3-tokenizer.json"
                                     if (root.parent / "qwen3-tokenizer.json").exists() else None)
        set_chat_template(backbone, template)
        artifact = make_trajectory_head(root / "head", backbone, width=64, blocks=blocks, max_length=max_length,
                                        seed=seed)
        export_bundle(str(artifact), root / "bundle", show_progress=False)
    root = Path(root)
    once(root / ".built", build)
    reference = Reference.from_pretrained(str(root / "head"), device="cpu", dtype=torch.float32)
    return root / "bundle", reference


def run_concurrently(worker, count: int) -> None:
    """`worker(i)` for i in range(count), each on its own thread, all joined."""
    import threading
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


#: a script prelude that makes importing the BLOCKED packages fail (a "torch-free" process)
BLOCKER_TEMPLATE = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
"""
BLOCKER = "BLOCKED = ('torch', 'transformers', 'siren_export')" + BLOCKER_TEMPLATE


def metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's series whose labels include `labels` (a server of one guard has one)."""
    total = 0.0
    for line in text.splitlines():
        found = re.fullmatch(re.escape(name) + r"(?:\{(.*)\})? ([0-9.e+-]+)", line)
        if found is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total += float(found.group(2))
    return total


class CountingStep:
    """A step runner that delegates to the real one and counts the tokens it was asked to run."""

    def __init__(self, runner):
        self._runner, self.tokens, self.calls, self.rows = runner, 0, 0, []
        self.name, self.device, self.limits = runner.name, runner.device, runner.limits

    def new_state(self):
        return self._runner.new_state()

    def fork(self, state, length):
        return self._runner.fork(state, length)

    def step(self, rows):
        self.tokens += sum(len(r.new_ids) for r in rows)
        self.calls += 1
        self.rows.append(len(rows))
        return self._runner.step(rows)

    def close(self):
        self._runner.close()


#: a guard loaded, then its files overwritten and truncated: its scores must not change
TAMPER_AFTER_LOAD = r"""
import os, sys
from siren_runtime import SirenGuard
bundle = sys.argv[1]
guard = SirenGuard.from_pretrained(bundle, device="cpu")
text = "How do I pick a lock?"
before = guard.score(text).score
session = guard.stream()
streamed = session.feed("How do I").score
data = os.path.join(bundle, "model.onnx.data")
with open(data, "r+b") as f:                         # in place, same size: zeros
    f.write(b"\0" * os.path.getsize(data))
assert guard.score(text).score == before, "an in-place overwrite changed a loaded guard"
with open(data, "r+b") as f:                         # truncated: a SIGBUS under mmap
    f.truncate(0)
with open(os.path.join(bundle, "tokenizer.json"), "w") as f:
    f.write("{}")
assert guard.score(text).score == before, "a truncation changed a loaded guard"
assert guard.score_batch([text, "hello"])[0].score == before
assert abs(session.feed(" pick a lock?").score - before) < 1e-5
print("immune")
"""


def between(scores, q: float) -> float:
    """A threshold near the q-quantile of `scores` but at least 1e-5 from every score, so a
    brute-force scan and the one-pass scores cannot disagree by rounding at a tie."""
    values = np.unique(np.asarray(scores, dtype=np.float64))
    k = min(int(q * (len(values) - 1)), len(values) - 2) if len(values) > 1 else 0
    for lo, hi in list(zip(values[k:], values[k + 1:])) + list(zip(values[:k][::-1], values[1:k + 1][::-1])):
        if hi - lo > 2e-5:
            return float((lo + hi) / 2)
    return float(values[-1] + 1e-3)


def check_prefixes(guard, reference, texts, max_length: int) -> dict:
    """Every prefix score equals score() of that token prefix (the runtime, and llm-siren
    where the prefix's decoded text tokenizes back to it); spans tile the caller's text; the
    onset equals a brute-force scan. Returns counts for the caller's own checks."""
    counts = {"prefixes": 0, "reference_checked": 0}
    results = guard.score_prefixes_batch(texts)
    prefix_tokens = len(guard._encoder.prefix or ())
    for text, result in zip(texts, results):
        ids = list(result.token_ids)
        assert ids == guard.token_ids(text) and len(ids) <= max_length
        assert abs(result.score - guard.score(text).score) <= TOL
        brute = guard.score_token_ids([ids[:k + 1] for k in range(len(ids))])
        assert np.max(np.abs(brute - result.scores)) <= TOL
        counts["prefixes"] += len(ids)
        # llm-siren on the token prefixes whose decoded text is that very prefix again
        decoded = [guard._encoder._tokenizer.decode(ids[:k + 1], skip_special_tokens=False)
                   for k in range(prefix_tokens, len(ids), 3)]
        same = [(d, k) for d, k in zip(decoded, range(prefix_tokens, len(ids), 3))
                if guard.token_ids(d) == ids[:k + 1]]
        if same:
            ref = [r.score for r in reference.score_batch([d for d, _ in same])]
            assert max(abs(r - result.scores[k]) for r, (_, k) in zip(ref, same)) <= TOL
            counts["reference_checked"] += len(same)
        # spans tile the text the tokens cover, in the caller's own characters
        spans = result.spans[prefix_tokens:]
        from siren_runtime.text import clean_text_with_offsets
        assert spans[0][0] == clean_text_with_offsets(text)[1][0]      # where the cleaned text begins
        for (a, b), (c, _) in zip(spans, spans[1:]):
            assert a <= b == c
        assert 0 <= spans[-1][1] <= len(text)
        for (a, b), token in zip(spans, ids[prefix_tokens:]):
            piece = guard._encoder._tokenizer.decode([token]).strip()
            if piece.isascii() and piece.isalnum():
                assert piece in text[a:b], (piece, text[a:b])
        # the onset: brute force over prefix scores, at thresholds where it lands inside
        for q in (0.2, 0.5, 0.8):
            threshold = between(brute, q)
            for sustain in (1, 3):
                above = brute >= threshold
                first = next((k for k in range(len(ids) - sustain + 1) if above[k:k + sustain].all()), None)
                want = None if first is None else result.spans[first][0]
                assert result.onset(threshold, sustain) == want
                if sustain == 1:
                    assert guard.onset(text, threshold=threshold) == want
    return counts


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    """A private copy of a shared bundle, for a test that edits it."""
    import shutil
    out = Path(tmp_path) / "bundle"
    shutil.copytree(bundle, out)
    return out


def edit_manifest(bundle: Path, edit) -> None:
    """Apply `edit` to the bundle's manifest (a dict) and write it back as is (no checks)."""
    import json
    path = Path(bundle) / "siren_bundle.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


#: words and marks that break tokenization and split points in many ways (an unclosed `<`,
#: accents, CJK, newlines)
WORDS = ("the cat sat on a mat and then it ran away quickly how do I build a bomb at home , . ! ? "
         "ok fine < > if a b x = 1 2 3 héllo 世界 \n").split(" ")


def random_texts(rng: random.Random, n: int) -> list[str]:
    """`n` texts of up to 50 WORDS, with and without spaces between them."""
    return ["".join(rng.choice(WORDS) + rng.choice(("", " ")) for _ in range(rng.randint(0, 50))) for _ in range(n)]


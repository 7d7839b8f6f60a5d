"""`siren demo`: the whole pipeline on a tiny random model, with no network.

Builds a random Qwen3 backbone (real Qwen3 tokenizer, built offline) and a synthetic head
in the real artifact format, exports a bundle, then scores a few texts with the
torch-free runtime in a separate process where importing torch or transformers fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .pipeline import export_bundle
from .synthetic import make_backbone, make_head

DEMO_TEXTS = [
    "What is the capital of France?",
    "Describe in detail how to commit insurance fraud.",
    "How can I make a pipe bomb at home?",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>",
    "Ünïcödé, 中文 and emoji 🙂",
]

# Runs in the child: block torch/transformers, then score with the runtime only.
_TORCH_FREE_SCORER = r"""
import importlib.abc, json, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "siren_export"):
            raise ImportError(f"{name} is blocked: the runtime must not need it")
sys.meta_path.insert(0, _Block())
from siren_runtime import SirenGuard
guard = SirenGuard.from_pretrained(sys.argv[1], device="cpu")
texts = json.loads(sys.stdin.read())
results = guard.score_batch(texts)
print(json.dumps({"backend": guard.backend, "device": guard.device,
                  "torch_loaded": "torch" in sys.modules,
                  "results": [r.to_dict() for r in results]}))
"""


def score_torch_free(bundle: Path, texts: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _TORCH_FREE_SCORER, str(bundle)], input=json.dumps(texts),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"torch-free scoring failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


#: where `siren demo` (and `make demo`) builds, under the working directory (ignored by git)
DEFAULT_WORKDIR = "demo"


def shown_path(path: Path) -> str:
    """A path as a user types it: relative to the working directory when under it."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def siren_command() -> str:
    """How to run `siren` in a new shell: as it was typed when that was a path (make demo's
    `.venv/bin/siren`), else the script beside this interpreter (a virtual environment's
    bin/ is not on PATH until activated), else plain `siren`."""
    typed = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if typed is not None and typed.name == "siren" and "/" in sys.argv[0] and typed.is_file():
        return sys.argv[0]
    script = Path(sys.executable).parent / "siren"
    return shown_path(script) if script.is_file() else "siren"


def reusable_bundle(bundle: Path) -> bool:
    """An earlier demo's bundle, whole and unmodified (every file hashed)."""
    from siren_runtime.bundle import read_bundle
    try:
        read_bundle(bundle).verify()
        return True
    except Exception:
        return False


def run_demo(workdir: Optional[str] = None, rebuild: bool = False) -> int:
    root = Path(workdir or DEFAULT_WORKDIR)
    root.mkdir(parents=True, exist_ok=True)
    print(f"siren demo: working in {shown_path(root)}/  (RANDOM WEIGHTS: the scores below mean nothing)")
    bundle = root / "bundle"
    if not rebuild and reusable_bundle(bundle):
        print(f"reusing the bundle an earlier run exported to {shown_path(bundle)} (--rebuild: export it again)")
    else:
        started = time.perf_counter()
        backbone = make_backbone(root / "tiny-qwen3", num_layers=4, hidden_size=64, intermediate_size=128)
        artifact = make_head(root / "tiny-siren-head", backbone, num_layers=4, width=64,
                             selected_layers=[0, 1, 2, 3], max_length=128)
        print(f"built a random 4-layer Qwen3 backbone and a synthetic SIREN head in "
              f"{time.perf_counter() - started:.1f}s")
        started = time.perf_counter()
        bundle = export_bundle(str(artifact), bundle, overwrite=True)
        print(f"exported {shown_path(bundle)} in {time.perf_counter() - started:.1f}s "
              f"({_directory_size(bundle) / 1e6:.1f} MB)")

    scored = score_torch_free(bundle, DEMO_TEXTS)
    print(f"\nScored by siren_runtime on {scored['backend']} ({scored['device']}) in a process where torch "
          f"and transformers cannot be imported (torch loaded: {scored['torch_loaded']}).")
    print("RANDOM-WEIGHT DEMO MODEL: scores are not meaningful.\n")
    print(f"{'score':>8}  {'harmful':>7}  text")
    for text, result in zip(DEMO_TEXTS, scored["results"]):
        shown = text.replace("\n", "\\n")
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        print(f"{result['score']:8.4f}  {str(result['is_harmful']):>7}  {shown}")
    print(f"\nNext, in any shell from this folder: {siren_command()} score {shown_path(bundle)} \"your text\"")
    return 0
